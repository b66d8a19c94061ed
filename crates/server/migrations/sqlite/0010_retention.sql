-- Retention (serve --retain-output / --retain-tasks): output with a seq up
-- to this was removed; the task, its events and its usage stay.
ALTER TABLE tasks ADD COLUMN output_pruned_seq BIGINT NOT NULL DEFAULT 0;
-- Ended tasks by when they ended: what retention looks for.
CREATE INDEX tasks_ended ON tasks (ended_at) WHERE ended_at IS NOT NULL;
-- Ended tasks whose output is still kept.
CREATE INDEX tasks_output_kept ON tasks (ended_at)
    WHERE ended_at IS NOT NULL AND last_seq > output_pruned_seq;
