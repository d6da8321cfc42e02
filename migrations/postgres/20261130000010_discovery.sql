-- Authorization server metadata fetched from a provider's `issuer`, kept so
-- that a restart without network still knows the endpoints.
CREATE TABLE discovery (
    issuer      TEXT PRIMARY KEY,
    document    TEXT NOT NULL,
    fetched_at  BIGINT NOT NULL
);
