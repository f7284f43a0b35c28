-- Whether any conversation has presence on, answered from an index of those that have.
CREATE INDEX conversations_with_presence ON conversations (presence) WHERE presence = 1;
