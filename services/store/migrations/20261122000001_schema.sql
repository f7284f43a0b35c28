-- quickim schema. One text for SQLite and PostgreSQL: keep to the types and syntax both take.

-- Facts about this database: its epoch (cursors from another database are refused) and its
-- number of log partitions (fixed at creation).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One row per log partition: the offset of its newest entry. Updating the row allocates
-- offsets and holds the partition's lock until commit, so entries become visible in order.
CREATE TABLE log_partitions (
    part INTEGER PRIMARY KEY,
    head BIGINT NOT NULL
);

CREATE TABLE conversations (
    conversation_id   TEXT PRIMARY KEY,
    conversation_type INTEGER NOT NULL,
    joinable          INTEGER NOT NULL,
    archived          INTEGER NOT NULL,
    created_at        BIGINT NOT NULL,
    last_msg_id       BIGINT NOT NULL,
    last_send_time    BIGINT NOT NULL,
    part              INTEGER NOT NULL,
    last_offset       BIGINT NOT NULL
);
CREATE INDEX conversations_by_activity ON conversations (last_send_time, conversation_id);

-- Members, current and former. A former member keeps its row (active = 0) with the msg_id
-- of the message that recorded its leaving; rejoining reuses the row.
CREATE TABLE members (
    conversation_id TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    role            TEXT NOT NULL,
    active          INTEGER NOT NULL,
    joined_msg_id   BIGINT NOT NULL,
    left_msg_id     BIGINT,
    read_msg_id     BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX members_by_user ON members (user_id, active, conversation_id);

CREATE TABLE messages (
    conversation_id TEXT NOT NULL,
    msg_id          BIGINT NOT NULL,
    part            INTEGER NOT NULL,
    log_offset      BIGINT NOT NULL,
    sender          TEXT NOT NULL,
    msg_type        INTEGER NOT NULL,
    content         TEXT NOT NULL,
    client_msg_id   TEXT,
    send_time       BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, msg_id)
);
-- Gap fill reads a partition by offset. (Resume walks the primary key: within a
-- conversation msg_ids and offsets grow together.)
CREATE UNIQUE INDEX messages_by_log ON messages (part, log_offset);

-- Idempotency keys: claimed in the same transaction as the message they name.
CREATE TABLE idempotency (
    sender          TEXT NOT NULL,
    client_msg_id   TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    msg_id          BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (sender, client_msg_id)
);

-- Token revocations from /inner/kick_user ('' platform = every platform).
CREATE TABLE revocations (
    user_id   TEXT NOT NULL,
    platform  TEXT NOT NULL,
    before_ms BIGINT NOT NULL,
    PRIMARY KEY (user_id, platform)
);

-- Log heads recorded now and then: the heads of `replay_retention` ago bound what a resume
-- may replay (older cursors get resync).
CREATE TABLE log_checkpoints (
    taken_at BIGINT PRIMARY KEY,
    heads    TEXT NOT NULL
);
