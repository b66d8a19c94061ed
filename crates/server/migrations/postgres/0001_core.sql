-- Times are microseconds since the Unix epoch; ids are UUID text.
CREATE TABLE workspaces (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE users (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE memberships (
    workspace_id TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    user_id      TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    PRIMARY KEY (workspace_id, user_id)
);

CREATE TABLE tokens (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    name         TEXT NOT NULL,
    secret_hash  TEXT NOT NULL UNIQUE,
    workspace_id TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    user_id      TEXT REFERENCES users (id) ON DELETE CASCADE,
    created_at   BIGINT NOT NULL,
    revoked_at   BIGINT
);
CREATE INDEX tokens_workspace ON tokens (workspace_id);

CREATE TABLE daemons (
    id                   TEXT PRIMARY KEY,
    workspace_id         TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    machine_id           TEXT NOT NULL,
    hostname             TEXT NOT NULL,
    version              TEXT NOT NULL,
    runtimes             TEXT NOT NULL,
    max_concurrent_tasks BIGINT NOT NULL,
    state                TEXT NOT NULL,
    created_at           BIGINT NOT NULL,
    last_seen_at         BIGINT NOT NULL,
    UNIQUE (workspace_id, machine_id)
);

CREATE TABLE tasks (
    id                TEXT PRIMARY KEY,
    workspace_id      TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    parent_id         TEXT REFERENCES tasks (id) ON DELETE CASCADE,
    depth             BIGINT NOT NULL,
    name              TEXT NOT NULL,
    plan              TEXT NOT NULL,
    status            TEXT NOT NULL,
    version           BIGINT NOT NULL,
    runtime           TEXT NOT NULL,
    repository        TEXT NOT NULL,
    branch            TEXT NOT NULL,
    daemon_id         TEXT,
    pinned_daemon_id  TEXT,
    attempt           BIGINT NOT NULL,
    status_reason     TEXT NOT NULL,
    agent_session_id  TEXT NOT NULL,
    working_directory TEXT NOT NULL,
    created_by        TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    queued_at         BIGINT,
    started_at        BIGINT,
    ended_at          BIGINT,
    last_seq          BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX tasks_workspace ON tasks (workspace_id, id);
CREATE INDEX tasks_parent ON tasks (parent_id);
CREATE INDEX tasks_daemon ON tasks (daemon_id);
CREATE INDEX tasks_queue ON tasks (workspace_id, queued_at) WHERE status = 'queued';

CREATE TABLE task_events (
    id          BIGSERIAL PRIMARY KEY,
    task_id     TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    from_status TEXT NOT NULL,
    to_status   TEXT NOT NULL,
    actor       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    attempt     BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX task_events_task ON task_events (task_id, id);

CREATE TABLE task_messages (
    task_id         TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq             BIGINT NOT NULL,
    kind            TEXT NOT NULL,
    content         TEXT NOT NULL,
    tool_name       TEXT NOT NULL,
    tool_input_json TEXT NOT NULL,
    attempt         BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (task_id, seq)
);

CREATE TABLE task_usage (
    task_id            TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    provider           TEXT NOT NULL,
    model              TEXT NOT NULL,
    input_tokens       BIGINT NOT NULL,
    output_tokens      BIGINT NOT NULL,
    cache_read_tokens  BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    PRIMARY KEY (task_id, provider, model)
);
