//! The `taskmesh` binary as child processes: `serve` (to kill and restart
//! it) and the reference daemon. Every child is killed when dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// The `taskmesh` binary: this process itself when it is taskmesh (the
/// benchmark), else the one cargo built beside the running test executable
/// (target/<profile>/taskmesh, the test being in target/<profile>/deps).
pub fn bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of this executable");
    if exe.file_stem().is_some_and(|s| s == "taskmesh") {
        return exe;
    }
    let built = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("taskmesh"))
        .expect("the test executable lives in target/<profile>/deps");
    assert!(
        built.exists(),
        "{} is missing: build it (cargo test builds it for crates/taskmesh's tests)",
        built.display()
    );
    built
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let path = std::env::temp_dir().join(format!("taskmesh-{label}-{id}"));
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `taskmesh serve` as a child process.
pub struct ServeProcess {
    child: Child,
    pub addr: String,
    /// The first-start token; `None` on a restart over an existing database.
    pub token: Option<String>,
}

impl ServeProcess {
    /// Starts `serve` on `listen` (`127.0.0.1:0` for any port) and waits for
    /// its listening line.
    pub async fn start(database_url: &str, listen: &str, extra: &[&str]) -> ServeProcess {
        let mut child = Command::new(bin())
            .args(["serve", "--listen", listen, "--database-url", database_url])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start taskmesh serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (addr, token) = tokio::time::timeout(Duration::from_secs(60), read_banner(stdout))
            .await
            .expect("serve prints its listening line");
        ServeProcess { child, addr, token }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL: no graceful anything.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill serve");
    }
}

/// Reads serve's stdout up to the listening line; answers the address and
/// the first-start token if one was printed. The rest of stdout is drained
/// in the background so the server never blocks on a full pipe.
async fn read_banner(stdout: ChildStdout) -> (String, Option<String>) {
    let mut lines = BufReader::new(stdout).lines();
    let mut token = None;
    while let Some(line) = lines.next_line().await.expect("read serve's stdout") {
        let line = line.trim();
        if line.starts_with("tmu_") {
            token = Some(line.to_string());
        }
        if let Some(rest) = line.strip_prefix("taskmesh listening on http://") {
            let addr = rest
                .split_whitespace()
                .next()
                .expect("an address")
                .to_string();
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return (addr, token);
        }
    }
    panic!("serve exited before listening");
}

/// `taskmesh daemon` as a child process, with its own state and work
/// directories.
pub struct DaemonProcess {
    child: Child,
    pub dir: TempDir,
}

impl DaemonProcess {
    pub fn start(server_url: &str, token: &str, extra: &[&str]) -> DaemonProcess {
        let dir = TempDir::new("daemon");
        let child = Command::new(bin())
            .arg("daemon")
            .args(["--server", server_url])
            .arg("--state-dir")
            .arg(dir.0.join("state"))
            .arg("--work-dir")
            .arg(dir.0.join("work"))
            .args(extra)
            .env("TASKMESH_TOKEN", token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start taskmesh daemon");
        DaemonProcess { child, dir }
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn stop(mut self) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the daemon exits after SIGTERM")
            .expect("wait for the daemon");
        assert!(status.success(), "daemon exit: {status:?}");
    }
}

/// Mints a token with `taskmesh token create` against the database.
pub async fn create_token(database_url: &str, kind: &str) -> String {
    let out = Command::new(bin())
        .args([
            "token",
            "create",
            "--kind",
            kind,
            "--database-url",
            database_url,
        ])
        .output()
        .await
        .expect("run token create");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Whether a process is gone (or a zombie nobody reaped yet).
pub fn is_dead(pid: i32) -> bool {
    let stat = Path::new("/proc").join(pid.to_string()).join("stat");
    match std::fs::read_to_string(stat) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}
