-- Set when a stop was asked of a task on a daemon: its end becomes "cancelled".
ALTER TABLE tasks ADD COLUMN stop_requested_at BIGINT;

-- The durable command outbox: a command stays until its daemon acknowledges
-- it with a CommandResult; seq orders delivery.
CREATE TABLE commands (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT NOT NULL UNIQUE,
    daemon_id      TEXT NOT NULL REFERENCES daemons (id) ON DELETE CASCADE,
    task_id        TEXT NOT NULL,
    payload        BLOB NOT NULL,
    created_at     BIGINT NOT NULL,
    acked_at       BIGINT,
    result_status  TEXT NOT NULL DEFAULT '',
    result_message TEXT NOT NULL DEFAULT ''
);
CREATE INDEX commands_pending ON commands (daemon_id, seq) WHERE acked_at IS NULL;
