//! Real git for the tests of a task's repository work: a bare repository
//! to serve as a task's remote, and the identity commits carry.

use std::path::{Path, PathBuf};

/// The identity the agents' commits carry; give it to the daemon, which
/// passes its environment on to its agents.
pub const IDENTITY: &[(&str, &str)] = &[
    ("GIT_AUTHOR_NAME", "Agent"),
    ("GIT_AUTHOR_EMAIL", "agent@example.com"),
    ("GIT_COMMITTER_NAME", "Agent"),
    ("GIT_COMMITTER_EMAIL", "agent@example.com"),
];

/// Runs git in `dir` and answers its stdout; panics when it fails.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .envs(IDENTITY.iter().copied())
        .output()
        .expect("run git");
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("git prints UTF-8")
}

/// `root/remote.git`, a bare repository whose `main` holds a.txt ("one",
/// "two", "three", a line each).
pub fn remote(root: &Path) -> PathBuf {
    let seed = root.join("seed");
    std::fs::create_dir_all(&seed).expect("create the seed repository");
    git(&seed, &["init", "-q", "-b", "main"]);
    std::fs::write(seed.join("a.txt"), "one\ntwo\nthree\n").expect("write a.txt");
    git(&seed, &["add", "a.txt"]);
    git(&seed, &["commit", "-qm", "first"]);
    git(root, &["clone", "-q", "--bare", "seed", "remote.git"]);
    root.join("remote.git")
}

/// What the bare repository's `branch` holds in `file`.
pub fn show(bare: &Path, branch: &str, file: &str) -> String {
    git(bare, &["show", &format!("{branch}:{file}")])
}
