-- Where a daemon keeps its tasks' directories, and the directories it
-- suggests as CloneWorktree targets (one a line).
ALTER TABLE daemons ADD COLUMN work_dir TEXT NOT NULL DEFAULT '';
ALTER TABLE daemons ADD COLUMN suggested_targets TEXT NOT NULL DEFAULT '';
