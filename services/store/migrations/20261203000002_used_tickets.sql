-- /notify tickets presented so far (each is good once, on any gateway), kept until they
-- expire.
CREATE TABLE IF NOT EXISTS used_tickets (
    ticket_id  TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS used_tickets_by_expiry ON used_tickets (expires_at);
