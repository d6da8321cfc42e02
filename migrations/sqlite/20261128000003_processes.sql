-- Daemons sharing this database, so each knows whether it is alone: a lone
-- daemon serves tokens from memory; with peers it checks storage first.
CREATE TABLE processes (
    owner    TEXT PRIMARY KEY,
    seen_at  INTEGER NOT NULL
);
