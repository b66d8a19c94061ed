-- What happens to an agent's work in a repository when it completes.
ALTER TABLE tasks ADD COLUMN completion_action TEXT NOT NULL DEFAULT 'none';
ALTER TABLE tasks ADD COLUMN target_branch TEXT NOT NULL DEFAULT '';

-- What each attempt changed in its repository, and what its completion
-- action did. `files` is git's numstat: "added<TAB>deleted<TAB>path" a
-- line, "-" for both counts of a binary file.
CREATE TABLE attempt_changes (
    task_id           TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt           BIGINT NOT NULL,
    branch            TEXT NOT NULL,
    base_commit       TEXT NOT NULL,
    head_commit       TEXT NOT NULL,
    commits           BIGINT NOT NULL,
    files_changed     BIGINT NOT NULL,
    insertions        BIGINT NOT NULL,
    deletions         BIGINT NOT NULL,
    files             TEXT NOT NULL,
    patch             TEXT NOT NULL,
    patch_truncated   BIGINT NOT NULL,
    completion_state  TEXT NOT NULL DEFAULT '',
    completion_detail TEXT NOT NULL DEFAULT '',
    reported_at       BIGINT NOT NULL,
    PRIMARY KEY (task_id, attempt)
);
