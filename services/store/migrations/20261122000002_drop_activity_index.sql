-- conversations_by_activity served no query (a user's conversations are listed through
-- members_by_user and sorted), and every stored message rewrote one of its entries.
DROP INDEX IF EXISTS conversations_by_activity;
