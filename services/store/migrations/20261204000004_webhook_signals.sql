-- Webhooks for live signals: read positions and presence changes, found by when they changed.
CREATE INDEX members_by_read_at ON members (read_at);
-- When the user last came online (its first connection on a node), and when either changed.
ALTER TABLE user_presence ADD COLUMN online_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE user_presence ADD COLUMN changed_at BIGINT NOT NULL DEFAULT 0;
CREATE INDEX user_presence_by_change ON user_presence (changed_at);
-- Each endpoint's watermarks for them (ms).
ALTER TABLE webhook_endpoints ADD COLUMN reads_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE webhook_endpoints ADD COLUMN presence_at BIGINT NOT NULL DEFAULT 0;
