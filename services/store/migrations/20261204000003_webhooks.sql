-- Outbound webhooks: each endpoint's position in the log (one offset per partition, JSON),
-- and the lease of the message service that delivers to it (one at a time in a cluster).
CREATE TABLE webhook_endpoints (
    endpoint_id TEXT PRIMARY KEY,
    position    TEXT NOT NULL,
    leased_by   TEXT NOT NULL,
    lease_until BIGINT NOT NULL
);
