-- What an agent task runs with, and how many of its permission requests
-- wait for a person.
ALTER TABLE tasks ADD COLUMN model TEXT NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN permission_mode TEXT NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN pending_approvals BIGINT NOT NULL DEFAULT 0;

-- An approval message names its approval.
ALTER TABLE task_messages ADD COLUMN approval_id TEXT NOT NULL DEFAULT '';

-- Permissions agents asked for, and what a person (or the timeout) decided.
CREATE TABLE approvals (
    id                 TEXT PRIMARY KEY,
    task_id            TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt            BIGINT NOT NULL,
    request_id         TEXT NOT NULL,
    seq                BIGINT NOT NULL,
    tool_name          TEXT NOT NULL,
    tool_input_json    TEXT NOT NULL,
    state              TEXT NOT NULL,
    decided_by         TEXT NOT NULL DEFAULT '',
    message            TEXT NOT NULL DEFAULT '',
    updated_input_json TEXT NOT NULL DEFAULT '',
    created_at         BIGINT NOT NULL,
    decided_at         BIGINT,
    expires_at         BIGINT NOT NULL,
    UNIQUE (task_id, attempt, request_id)
);
CREATE INDEX approvals_by_state ON approvals (state, expires_at);

-- Usage per attempt: an agent reports its own totals, which restart with
-- each process; a task's usage is the sum over its attempts.
CREATE TABLE attempt_usage (
    task_id            TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt            BIGINT NOT NULL,
    provider           TEXT NOT NULL,
    model              TEXT NOT NULL,
    input_tokens       BIGINT NOT NULL,
    output_tokens      BIGINT NOT NULL,
    cache_read_tokens  BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    PRIMARY KEY (task_id, attempt, provider, model)
);
INSERT INTO attempt_usage (task_id, attempt, provider, model, input_tokens, output_tokens,
    cache_read_tokens, cache_write_tokens)
    SELECT task_id, 0, provider, model, input_tokens, output_tokens, cache_read_tokens,
        cache_write_tokens FROM task_usage;
DROP TABLE task_usage;

CREATE TABLE attempt_costs (
    task_id  TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt  BIGINT NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    turns    BIGINT NOT NULL,
    PRIMARY KEY (task_id, attempt)
);
