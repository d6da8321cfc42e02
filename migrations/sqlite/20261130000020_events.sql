-- The history of every connection (SPEC 13): what happened and when, never
-- a secret. Keyed by provider/account names rather than the connection's
-- id, so the events of a forgotten connection stay readable by name.
CREATE TABLE events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    provider     TEXT    NOT NULL,
    account      TEXT    NOT NULL,
    at           INTEGER NOT NULL,
    kind         TEXT    NOT NULL,
    detail       TEXT,
    duration_ms  INTEGER
);
CREATE INDEX events_by_connection ON events (provider, account, id);
CREATE INDEX events_by_time ON events (at);
