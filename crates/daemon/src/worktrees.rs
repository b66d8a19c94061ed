//! Task directories on this machine: one lock file each, held while a
//! task runs there, so that cleanup never touches a directory in use; the
//! sweep that removes those unused for `--keep-worktrees`; copying one
//! elsewhere (CloneWorktree), removing one (its task was deleted) and
//! looking a path up (CheckTargetExists).

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tracing::{debug, info, warn};

/// How long a run waits for its directory's lock (a sweep or a copy
/// holding it).
const LOCK_PATIENCE: Duration = Duration::from_secs(10);

/// `<work_dir>/<task_id>.lock`, beside the task's directory.
pub(crate) fn lock_path(work_dir: &Path, task_id: &str) -> PathBuf {
    work_dir.join(format!("{task_id}.lock"))
}

/// The lock on the file at `path` (created if missing), taken now, or
/// `None` while another holds it. The kernel lets go of it when the file is
/// dropped or the process ends, however it ends.
pub(crate) fn try_lock_file(path: &Path) -> io::Result<Option<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// The task directory's lock, taken now, or `None` while someone holds it.
pub(crate) fn try_lock(work_dir: &Path, task_id: &str) -> io::Result<Option<File>> {
    try_lock_file(&lock_path(work_dir, task_id))
}

/// `<work_dir>/<task_id>`, for a task id from the server: a UUID, so it
/// names a directory below the work dir and nothing else.
pub(crate) fn task_dir(work_dir: &Path, task_id: &str) -> Result<PathBuf, String> {
    match uuid::Uuid::parse_str(task_id) {
        Ok(_) => Ok(work_dir.join(task_id)),
        Err(_) => Err(format!("{task_id:?} is not a task id")),
    }
}

/// The lock for a run of the task, waiting briefly for a sweep or a copy
/// to let go; its modification time says when the directory was last used.
pub(crate) async fn lock_for_run(work_dir: &Path, task_id: &str) -> Result<File, String> {
    tokio::fs::create_dir_all(work_dir)
        .await
        .map_err(|e| format!("creating {} failed: {e}", work_dir.display()))?;
    let deadline = tokio::time::Instant::now() + LOCK_PATIENCE;
    loop {
        match try_lock(work_dir, task_id) {
            Ok(Some(file)) => {
                let _ = file.set_modified(SystemTime::now());
                return Ok(file);
            }
            Ok(None) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(None) => return Err(format!("the directory of task {task_id} stays in use")),
            Err(e) => {
                return Err(format!(
                    "locking the directory of task {task_id} failed: {e}"
                ));
            }
        }
    }
}

/// Parses `7d`, `12h`, `30m`, `45s`, or `never` (`Duration::MAX`: no
/// cleanup).
pub fn parse_keep(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "never" {
        return Ok(Duration::MAX);
    }
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit (s, m, h, d), or never"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(seconds)))
}

/// What one sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Swept {
    pub removed: usize,
    pub in_use: usize,
}

/// Removes task directories last used longer than `keep` ago, skipping
/// those whose lock is held (an agent runs there, or a copy is made).
pub(crate) fn sweep(work_dir: &Path, keep: Duration) -> Swept {
    let mut swept = Swept::default();
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return swept;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if uuid::Uuid::parse_str(&name).is_err() || !entry.path().is_dir() {
            continue;
        }
        let lock = match try_lock(work_dir, &name) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                swept.in_use += 1;
                continue;
            }
            Err(e) => {
                warn!(task_id = %name, error = %e, "cannot lock a task directory");
                continue;
            }
        };
        // A lock file made just now carries no history: the directory's
        // own time says when it was last changed.
        let used = [lock_path(work_dir, &name), entry.path()]
            .iter()
            .filter_map(|p| p.metadata().and_then(|m| m.modified()).ok())
            .min()
            .unwrap_or(now);
        if now.duration_since(used).unwrap_or_default() < keep {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => {
                info!(task_id = %name, "removed the task's directory (--keep-worktrees)");
                swept.removed += 1;
                let _ = std::fs::remove_file(lock_path(work_dir, &name));
            }
            Err(e) => warn!(task_id = %name, error = %e, "removing a task directory failed"),
        }
        drop(lock);
    }
    swept
}

/// Sweeps `work_dir` now and then for as long as the daemon runs.
pub(crate) async fn keep_sweeping(work_dir: PathBuf, keep: Duration) {
    let every = (keep / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        let dir = work_dir.clone();
        match tokio::task::spawn_blocking(move || sweep(&dir, keep)).await {
            Ok(Swept {
                removed: 0,
                in_use: 0,
            }) => debug!("worktree sweep: nothing to do"),
            Ok(s) => info!(removed = s.removed, in_use = s.in_use, "worktree sweep"),
            Err(e) => warn!(error = %e, "the worktree sweep failed"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Removes a deleted task's directory now, unless it is in use.
pub(crate) fn remove(work_dir: &Path, task_id: &str) -> Result<String, String> {
    let dir = task_dir(work_dir, task_id)?;
    let Some(lock) = try_lock(work_dir, task_id).map_err(|e| e.to_string())? else {
        return Err(format!("the directory of task {task_id} is in use"));
    };
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing {} failed: {e}", dir.display())),
    }
    let _ = std::fs::remove_file(lock_path(work_dir, task_id));
    drop(lock);
    info!(%task_id, "removed the deleted task's directory");
    Ok(format!("removed {}", dir.display()))
}

/// Copies the task's directory, git state and all, to `target` (absolute;
/// missing, or an empty directory).
pub(crate) async fn clone_to(
    work_dir: &Path,
    task_id: &str,
    target: &str,
) -> Result<String, String> {
    let source = task_dir(work_dir, task_id)?;
    let target = Path::new(target);
    if !target.is_absolute() {
        return Err(format!("{} is not an absolute path", target.display()));
    }
    if !source.is_dir() {
        return Err(format!(
            "this daemon has no directory for task {task_id} (it was cleaned up, or the task ran elsewhere)"
        ));
    }
    if target.exists() {
        let empty = std::fs::read_dir(target)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(format!(
                "{} exists and is not an empty directory",
                target.display()
            ));
        }
    }
    let Some(lock) = try_lock(work_dir, task_id).map_err(|e| e.to_string())? else {
        return Err(format!(
            "task {task_id} is running in its directory; copy it once it ends"
        ));
    };
    std::fs::create_dir_all(target)
        .map_err(|e| format!("creating {} failed: {e}", target.display()))?;
    let out = tokio::process::Command::new("cp")
        .arg("-a")
        .arg(source.join("."))
        .arg(target)
        .output()
        .await
        .map_err(|e| format!("running cp failed: {e}"))?;
    drop(lock);
    if !out.status.success() {
        return Err(format!(
            "copying to {} failed: {}",
            target.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    info!(%task_id, target = %target.display(), "copied the task's directory");
    Ok(format!(
        "copied task {task_id}'s directory to {}",
        target.display()
    ))
}

/// "directory", "file" or "missing".
pub(crate) fn look_up(path: &str) -> Result<String, String> {
    let path = Path::new(path);
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", path.display()));
    }
    Ok(match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => "directory",
        Ok(_) => "file",
        Err(_) => "missing",
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_takes_a_number_and_a_unit() {
        assert_eq!(parse_keep("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_keep("45s").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_keep("never").unwrap(), Duration::MAX);
        assert!(parse_keep("7").is_err());
        assert!(parse_keep("d").is_err());
        assert!(parse_keep("3w").is_err());
    }

    #[tokio::test]
    async fn only_task_directories_are_copied_or_removed() {
        let work = std::env::temp_dir().join(format!("taskmesh-paths-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(work.join("outside")).unwrap();
        let target = work.join("copy").display().to_string();
        let err = clone_to(&work, "../outside", &target).await.unwrap_err();
        assert!(err.contains("not a task id"), "{err}");
        assert!(!Path::new(&target).exists());
        assert!(
            remove(&work, "../outside")
                .unwrap_err()
                .contains("not a task id")
        );
        assert!(work.join("outside").is_dir());
        let _ = std::fs::remove_dir_all(&work);
    }

    #[test]
    fn a_sweep_skips_directories_in_use_and_removes_old_ones() {
        let work = std::env::temp_dir().join(format!("taskmesh-sweep-{}", uuid::Uuid::new_v4()));
        let (busy, idle) = (
            uuid::Uuid::new_v4().to_string(),
            uuid::Uuid::new_v4().to_string(),
        );
        for id in [&busy, &idle] {
            std::fs::create_dir_all(work.join(id)).unwrap();
        }
        std::fs::create_dir_all(work.join("not-a-task")).unwrap();
        let held = try_lock(&work, &busy).unwrap().expect("free");
        let swept = sweep(&work, Duration::ZERO);
        assert_eq!(
            swept,
            Swept {
                removed: 1,
                in_use: 1
            }
        );
        assert!(work.join(&busy).is_dir() && !work.join(&idle).exists());
        assert!(work.join("not-a-task").is_dir(), "only task directories go");
        drop(held);
        assert_eq!(
            sweep(&work, Duration::from_secs(3600)).removed,
            0,
            "recent ones stay"
        );
        let _ = std::fs::remove_dir_all(&work);
    }
}
