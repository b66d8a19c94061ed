-- What a reassigned or continued attempt starts from: the follow-up prompt
-- (continue) and the context rebuilt from recorded output. Read when the
-- attempt is claimed and sent in its SpawnTask.
CREATE TABLE attempt_inputs (
    task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt BIGINT NOT NULL,
    prompt  TEXT NOT NULL,
    context TEXT NOT NULL,
    PRIMARY KEY (task_id, attempt)
);
