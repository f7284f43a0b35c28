-- Live signals: read receipts, presence and streaming messages.

-- When the member's read position last moved by a mark_read (ms; 0 never): a resume
-- delivers the positions that moved while the client was away.
ALTER TABLE members ADD COLUMN read_at BIGINT NOT NULL DEFAULT 0;
-- Whether members get each other's read receipts (1) or not (0; large groups).
ALTER TABLE conversations ADD COLUMN receipts INTEGER NOT NULL DEFAULT 1;

-- Presence: whether members get each other's online/offline events (0: no, the default).
ALTER TABLE conversations ADD COLUMN presence INTEGER NOT NULL DEFAULT 0;
-- When each user last went offline (its last connection on any gateway closed), ms.
CREATE TABLE user_presence (
    user_id   TEXT PRIMARY KEY,
    last_seen BIGINT NOT NULL
);

-- Streaming messages (state 3) not finished yet, for the sweep that cancels the abandoned.
CREATE INDEX messages_streaming ON messages (state, send_time) WHERE state = 3;
