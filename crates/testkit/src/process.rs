//! The `taskmesh` binary as child processes: `serve` (to kill and restart
//! it, or to measure it) and the reference daemon. Every child is killed
//! when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::db::Error;

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

/// A child process that serves on a port it prints (`taskmesh serve`, or
/// the benchmark's floor server). It is killed when dropped and, on Linux,
/// when this process dies.
pub struct ServeProcess {
    child: Child,
    pub addr: SocketAddr,
    /// The first-start token; `None` on a restart over an existing database.
    pub token: Option<String>,
    /// `http://ADDR`, or `https://ADDR` when it serves TLS.
    url: String,
}

/// What `taskmesh serve` prints once it listens, before its URL.
pub const SERVE_LISTENING: &str = "taskmesh listening on ";

impl ServeProcess {
    /// Starts `serve` on `listen` (`127.0.0.1:0` for any port) and waits for
    /// its listening line; its log goes to this process's stderr.
    pub async fn start(database_url: &str, listen: &str, extra: &[&str]) -> ServeProcess {
        let mut cmd = serve_command(database_url, listen, extra);
        cmd.env("RUST_LOG", "warn").stderr(Stdio::inherit());
        ServeProcess::spawn(cmd, SERVE_LISTENING)
            .await
            .unwrap_or_else(|e| panic!("start taskmesh serve: {e}"))
    }

    /// Spawns `cmd` and reads its stdout up to the line starting with
    /// `listening` (then the address); a `tmu_` line before it is the
    /// first-start token. The rest of stdout is drained in the background so
    /// the child never blocks on a full pipe.
    pub async fn spawn(mut cmd: Command, listening: &str) -> Result<ServeProcess, Error> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut token = None;
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                let line = line.trim();
                if line.starts_with("tmu_") {
                    token = Some(line.to_string());
                }
                if let Some(rest) = line.strip_prefix(listening) {
                    let url = rest.split_whitespace().next().unwrap_or_default();
                    let (scheme, addr) = match url.split_once("://") {
                        Some((scheme, addr)) => (scheme, addr),
                        None => ("http", url),
                    };
                    let addr = addr.parse::<SocketAddr>()?;
                    return Ok::<_, Error>((addr, format!("{scheme}://{addr}")));
                }
            }
            Err("the server exited before listening".into())
        })
        .await
        .map_err(|_| "the server did not start listening within 60 s")??;
        let (addr, url) = addr;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(ServeProcess {
            child,
            addr,
            token,
            url,
        })
    }

    /// Starts `serve` like [`ServeProcess::start`], with its log at
    /// `rust_log` coming back as lines through [`ChildLog`] (and still
    /// copied to this process's stderr).
    pub async fn start_logged(
        database_url: &str,
        listen: &str,
        extra: &[&str],
        rust_log: &str,
    ) -> (ServeProcess, ChildLog) {
        let mut cmd = serve_command(database_url, listen, extra);
        cmd.env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped());
        let mut server = ServeProcess::spawn(cmd, SERVE_LISTENING)
            .await
            .unwrap_or_else(|e| panic!("start taskmesh serve: {e}"));
        let stderr = server.child.stderr.take().expect("stderr is piped");
        (server, ChildLog::follow(stderr))
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the server runs")
    }

    /// Resident memory of the server process.
    pub fn rss_bytes(&self) -> Result<u64, Error> {
        rss_bytes(self.child.id().ok_or("the server has exited")?)
    }

    /// SIGTERM, then waits for it to exit (its log then ends).
    pub async fn terminate(mut self) {
        let pid = self.pid() as i32;
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("serve exits after SIGTERM")
            .expect("wait for serve");
    }

    /// SIGKILL: no graceful anything.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill serve");
    }
}

/// A child's log, line by line, from the moment it was started.
pub struct ChildLog {
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl ChildLog {
    pub fn follow(stderr: tokio::process::ChildStderr) -> ChildLog {
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut stderr = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = stderr.next_line().await {
                eprintln!("{line}");
                if tx.send(line).is_err() {
                    // Nobody reads any more; keep draining the pipe.
                    while let Ok(Some(_)) = stderr.next_line().await {}
                    return;
                }
            }
        });
        ChildLog { lines }
    }

    /// Every line not read yet, up to the end of the log (the process has
    /// exited).
    pub async fn rest(mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some(line) = self.lines.recv().await {
            lines.push(line);
        }
        lines
    }

    /// The next line containing every one of `texts`, skipping the others;
    /// panics after `patience` or when the log ends first.
    pub async fn wait_for(&mut self, texts: &[&str], patience: Duration) -> String {
        let found = tokio::time::timeout(patience, async {
            while let Some(line) = self.lines.recv().await {
                if texts.iter().all(|t| line.contains(t)) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            Ok(None) => panic!("the log ended without {texts:?}"),
            Err(_) => panic!("no line with {texts:?} in the log within {patience:?}"),
        }
    }
}

/// `taskmesh serve --listen LISTEN --database-url URL EXTRA…`.
pub fn serve_command(database_url: &str, listen: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--listen", listen, "--database-url", database_url])
        .args(extra);
    cmd
}

/// Resident memory of a process, from /proc.
pub fn rss_bytes(pid: u32) -> Result<u64, Error> {
    status_bytes(pid, "VmRSS:")
}

/// The most a process was resident since it started or since
/// [`reset_peak_rss`]: Linux's high-water mark, so a peak between two
/// samples is not missed.
pub fn peak_rss_bytes(pid: u32) -> Result<u64, Error> {
    status_bytes(pid, "VmHWM:")
}

/// Starts a new high-water mark at the process's current size (Linux:
/// `5` to /proc/PID/clear_refs, allowed for our own children).
pub fn reset_peak_rss(pid: u32) -> Result<(), Error> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")?;
    Ok(())
}

fn status_bytes(pid: u32, field: &str) -> Result<u64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

/// `taskmesh daemon` as a child process, with its own state and work
/// directories.
pub struct DaemonProcess {
    child: Child,
    pub dir: TempDir,
}

impl DaemonProcess {
    pub fn start(server_url: &str, token: &str, extra: &[&str]) -> DaemonProcess {
        DaemonProcess::start_with_env(server_url, token, extra, &[])
    }

    /// [`DaemonProcess::start`] with more environment for the daemon (and
    /// so for its agents).
    pub fn start_with_env(
        server_url: &str,
        token: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> DaemonProcess {
        let dir = TempDir::new("daemon");
        let child = DaemonProcess::command(server_url, token, &dir.0, extra)
            .envs(env.iter().copied())
            .spawn()
            .expect("start taskmesh daemon");
        DaemonProcess { child, dir }
    }

    /// Starts the daemon with its log at `rust_log` coming back as lines
    /// (stderr is a pipe, not a terminal, as under a service manager).
    pub fn start_logged(
        server_url: &str,
        token: &str,
        extra: &[&str],
        rust_log: &str,
    ) -> (DaemonProcess, ChildLog) {
        let dir = TempDir::new("daemon");
        let mut child = DaemonProcess::command(server_url, token, &dir.0, extra)
            .env("RUST_LOG", rust_log)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start taskmesh daemon");
        let stderr = child.stderr.take().expect("stderr is piped");
        (DaemonProcess { child, dir }, ChildLog::follow(stderr))
    }

    /// `taskmesh daemon` with its state in `dir/state` and its tasks in
    /// `dir/work`, the token in `TASKMESH_TOKEN`, logging warnings.
    pub fn command(server_url: &str, token: &str, dir: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.arg("daemon")
            .args(["--server", server_url])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--work-dir")
            .arg(dir.join("work"))
            .args(extra)
            .env("TASKMESH_TOKEN", token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        cmd
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("the daemon runs") as i32
    }

    /// Sends `signal` (SIGTERM, SIGINT…) to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Waits for the daemon to exit; panics after `patience`.
    pub async fn exit_status(&mut self, patience: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(patience, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the daemon did not exit within {patience:?}"))
            .expect("wait for the daemon")
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
