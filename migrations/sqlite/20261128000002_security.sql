-- Per-installation secrets (the fingerprint key, the encryption key check).
CREATE TABLE installation (
    name   TEXT PRIMARY KEY,
    value  BLOB NOT NULL
);

-- Keyed fingerprints (HMAC-SHA256) of current and rotated-out tokens, so a
-- refresh token presented as a bearer is recognised without keeping it.
CREATE TABLE token_fingerprints (
    id             INTEGER PRIMARY KEY,
    connection_id  INTEGER NOT NULL,
    kind           TEXT    NOT NULL,  -- 'refresh' | 'access'
    digest         BLOB    NOT NULL,
    created_at     INTEGER NOT NULL
);
CREATE INDEX token_fingerprints_connection ON token_fingerprints (connection_id, kind, id);
