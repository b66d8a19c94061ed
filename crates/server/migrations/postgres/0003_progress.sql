-- What the agent last said it is doing (ReportTaskProgress). Kept apart from
-- the versioned columns: progress does not change a task's version.
ALTER TABLE tasks ADD COLUMN progress_summary TEXT NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN progress_percent BIGINT NOT NULL DEFAULT -1;
