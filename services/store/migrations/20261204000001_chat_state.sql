-- Chat state: message revisions, conversation metadata and roles, exact unread by rule.

-- A message's state: 0 as sent (or edited: edited_at set), 1 recalled, 2 deleted.
ALTER TABLE messages ADD COLUMN state INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN edited_at BIGINT;
-- How many messages of the conversation up to and including this one count as unread
-- (a prefix count: unread = counted at the newest message - counted at the read position).
ALTER TABLE messages ADD COLUMN counted BIGINT NOT NULL DEFAULT 0;

ALTER TABLE conversations ADD COLUMN title TEXT;
ALTER TABLE conversations ADD COLUMN avatar TEXT;
ALTER TABLE conversations ADD COLUMN ext TEXT;
-- Lowest role that may change title, avatar and ext (NULL: only the business system).
ALTER TABLE conversations ADD COLUMN meta_role TEXT;
-- `counted` of the newest message.
ALTER TABLE conversations ADD COLUMN counted BIGINT NOT NULL DEFAULT 0;
-- The newest message other than a revision (what a conversation list shows), 0 if none.
ALTER TABLE conversations ADD COLUMN preview_msg_id BIGINT NOT NULL DEFAULT 0;

-- `counted` at the member's read position.
ALTER TABLE members ADD COLUMN read_counted BIGINT NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN muted INTEGER NOT NULL DEFAULT 0;

-- Versions of edited messages (version 0 is the content as sent). Removed with the content
-- when the message is recalled or deleted. `entry_msg_id` is the revision entry that made
-- the version (its content is scrubbed too).
CREATE TABLE message_versions (
    conversation_id TEXT NOT NULL,
    msg_id          BIGINT NOT NULL,
    version         INTEGER NOT NULL,
    content         TEXT NOT NULL,
    made_at         BIGINT NOT NULL,
    entry_msg_id    BIGINT,
    PRIMARY KEY (conversation_id, msg_id, version)
);

-- Existing messages: every user and business message counted (the rule before this change
-- counted everything; system messages are left out as the new default says).
UPDATE messages SET counted = w.c
FROM (
    SELECT conversation_id AS cid, msg_id AS mid,
           SUM(CASE WHEN msg_type >= 0 THEN 1 ELSE 0 END) OVER (PARTITION BY conversation_id ORDER BY msg_id) AS c
    FROM messages
) AS w
WHERE messages.conversation_id = w.cid AND messages.msg_id = w.mid;

UPDATE conversations SET
    counted = COALESCE((SELECT m.counted FROM messages m
                        WHERE m.conversation_id = conversations.conversation_id
                        ORDER BY m.msg_id DESC LIMIT 1), 0),
    preview_msg_id = last_msg_id;

UPDATE members SET read_counted = COALESCE((SELECT m.counted FROM messages m
                                            WHERE m.conversation_id = members.conversation_id
                                              AND m.msg_id <= members.read_msg_id
                                            ORDER BY m.msg_id DESC LIMIT 1), 0);
