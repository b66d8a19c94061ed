-- The token a daemon registered with, and the one an admin cut it off
-- from (DisconnectDaemon): that token may not speak for this daemon again.
ALTER TABLE daemons ADD COLUMN token_id TEXT;
ALTER TABLE daemons ADD COLUMN blocked_token_id TEXT;

-- Bytes of each stored message, so readers page output by size.
ALTER TABLE task_messages ADD COLUMN size BIGINT NOT NULL DEFAULT 0;
UPDATE task_messages SET size = octet_length(content) + octet_length(tool_name)
    + octet_length(tool_input_json);
