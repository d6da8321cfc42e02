-- Connections: one authorized grant per provider/account.
-- Instants are UTC milliseconds since the Unix epoch (absolute, computed on receipt).
CREATE TABLE connections (
    id                       INTEGER PRIMARY KEY,
    provider                 TEXT    NOT NULL,
    account                  TEXT    NOT NULL,
    state                    TEXT    NOT NULL,
    access_token             TEXT    NOT NULL,
    refresh_token            TEXT,
    token_type               TEXT    NOT NULL DEFAULT 'Bearer',
    scope                    TEXT,
    expires_at               INTEGER NOT NULL,
    issued_at                INTEGER NOT NULL,
    refreshed_at             INTEGER,
    refresh_token_issued_at  INTEGER NOT NULL,
    -- Bumped on every write of the token pair: writes that follow a network
    -- call compare it, so a stale writer cannot overwrite a newer grant.
    generation               INTEGER NOT NULL DEFAULT 1,
    last_error               TEXT,
    failures                 INTEGER NOT NULL DEFAULT 0,
    next_attempt_at          INTEGER,
    -- Cross-process single-flight: who may call the provider for this grant.
    lease_owner              TEXT,
    lease_until              INTEGER,
    -- "Refresh started", committed before the provider is called.
    attempt_id               TEXT,
    attempt_started_at       INTEGER,
    -- Set when a started refresh never finished (the process died).
    interrupted_at           INTEGER,
    created_at               INTEGER NOT NULL,
    UNIQUE (provider, account)
);

-- Browser authorizations in progress, so a restart mid-flow does not break it.
CREATE TABLE pending_authorizations (
    state          TEXT    PRIMARY KEY,
    provider       TEXT    NOT NULL,
    account        TEXT    NOT NULL,
    pkce_verifier  TEXT,
    redirect_uri   TEXT    NOT NULL,
    browser_hash   TEXT    NOT NULL,
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL
);
