-- Gateways read revocations in pages, in (before_ms, user_id, platform) order, and poll the
-- newest ones: both go through this index.
CREATE INDEX IF NOT EXISTS revocations_by_time ON revocations (before_ms, user_id, platform);
