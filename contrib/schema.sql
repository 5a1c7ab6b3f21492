-- schema.sql: the "user" table resourced updates after an avatar upload (the chat services own it).
CREATE TABLE IF NOT EXISTS "user" (
    id     BIGSERIAL PRIMARY KEY,
    uid    BIGINT NOT NULL UNIQUE,
    name   VARCHAR(255) NOT NULL DEFAULT '',
    email  VARCHAR(255) NOT NULL DEFAULT '',
    pwd    VARCHAR(255) NOT NULL DEFAULT '',
    nick   VARCHAR(255) NOT NULL DEFAULT '',
    "desc" VARCHAR(255) NOT NULL DEFAULT '',
    sex    INTEGER NOT NULL DEFAULT 0,
    icon   VARCHAR(255) NOT NULL DEFAULT ''
);
