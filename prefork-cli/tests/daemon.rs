//! `--daemon`: the command returns once the server is ready, and the server
//! runs detached (its own session, stdio off the terminal), on the real
//! binary.

mod common;

use std::process::{Command, Stdio};

use common::*;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use prefork_testkit::process_alive;
use rstest::rstest;
use rstest_reuse::apply;

/// Runs the starting command to its end (bounded): (exit code, stdout, stderr).
fn run_to_end(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_prefork"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run prefork");
    let mut status = None;
    assert!(
        wait_until(T, || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        }),
        "the starting command did not return"
    );
    let out = child.wait_with_output().expect("output");
    (
        status.and_then(|s| s.code()),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `prefork --daemon --pid-file PID_FILE ...args`, run to its end.
fn start_daemon(pid_file: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["--daemon", "--pid-file", pid_file.to_str().expect("utf-8")];
    all.extend_from_slice(args);
    run_to_end(&all)
}

/// The value of `key=` in a ready line.
fn ready_field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("{key}= in {line:?}"))
        .to_string()
}

/// Field `n` (1-based, after the command name) of /proc/PID/stat.
fn stat_field(pid: i32, n: usize) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    after
        .split(' ')
        .nth(n - 3)
        .expect("field")
        .parse()
        .expect("number")
}

#[apply(every_strategy)]
fn daemon_returns_once_ready_and_the_server_runs_detached(strategy: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pid_file = dir.path().join("p.pid");
    let log = dir.path().join("p.log");
    let _masters = Masters(pid_file.to_string_lossy().into_owned());
    let mut args: Vec<String> = vec!["--daemon".into()];
    args.extend(strategy_args(strategy));
    args.extend(["--bind", "127.0.0.1:0", "--workers", "2"].map(String::from));
    args.extend(["--pid-file".into(), pid_file.to_string_lossy().into_owned()]);
    args.extend(["--log-file".into(), log.to_string_lossy().into_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = run_to_end(&args);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().count(), 1, "only the ready line: {out}");
    let pid: i32 = ready_field(&out, "pid").parse().expect("a pid");
    let addr = ready_field(&out, "listen");
    let in_file: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    assert_eq!(in_file, pid);
    // Its own session, leading it, not a child of the command that is gone.
    assert_eq!(stat_field(pid, 6), pid, "session id");
    assert_ne!(stat_field(pid, 4), std::process::id() as i32, "parent");
    let fd = |p: i32, n: u32| std::fs::read_link(format!("/proc/{p}/fd/{n}")).expect("fd");
    assert_eq!(fd(pid, 0), std::path::Path::new("/dev/null"));
    assert_eq!(fd(pid, 1), std::path::Path::new("/dev/null"));
    assert_eq!(fd(pid, 2), log);
    // No worker holds the pipe to the starting command: a socket and the
    // two pipes of its own (status, master-alive), as RELIABILITY S4 says.
    // (Leaving out what this test process passes down: descriptors without
    // close-on-exec, the CI runner's, say.)
    let passed: Vec<i32> = fd_table("self")
        .into_iter()
        .filter(|&(n, _, flags)| n > 2 && flags & libc::O_CLOEXEC as u32 == 0)
        .map(|(n, _, _)| n)
        .collect();
    let workers = prefork_testkit::children_of(pid);
    assert_eq!(workers.len(), 2);
    for w in workers {
        let pipes = fd_table(&w.to_string())
            .iter()
            .filter(|(n, target, _)| target.starts_with("pipe:") && !passed.contains(n))
            .count();
        assert_eq!(pipes, 2, "worker {w}: {:?}", fd_table(&w.to_string()));
        assert_eq!(fd(w, 1), std::path::Path::new("/dev/null"));
    }
    assert_eq!(http_get(&addr, "/", T).expect("GET").status, 200);
    kill(Pid::from_raw(pid), Signal::SIGQUIT).expect("QUIT");
    assert!(wait_until(T, || !process_alive(pid)));
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("ready") && text.contains("exiting"), "{text}");
    assert!(!pid_file.exists());
}

#[test]
fn a_daemon_that_cannot_start_says_why_and_exits_with_its_code() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let pid_file = dir.path().join("p.pid");
    let _masters = Masters(pid_file.to_string_lossy().into_owned());
    let (code, out, err) = start_daemon(&pid_file, &["--bind", &addr]);
    assert_eq!(code, Some(1), "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains(&format!(
            "error: cannot listen on {addr}: Address already in use"
        )),
        "{err}"
    );
    assert!(!pid_file.exists());
}

/// USR2 to a daemon: the new master does not detach again (it would look
/// to the old master like a new master that exited at once, a roll-back):
/// it runs as the old master's child, takes over, and serves alone after
/// QUIT to the old one.
#[test]
fn a_daemon_upgrades_in_place() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pid_file = dir.path().join("p.pid");
    let _masters = Masters(pid_file.to_string_lossy().into_owned());
    let (code, out, err) = start_daemon(&pid_file, &["--bind", "127.0.0.1:0", "--workers", "1"]);
    assert_eq!(code, Some(0), "{err}");
    let read_pid =
        || -> Option<i32> { std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok() };
    let old = read_pid().expect("pid file");
    let addr = ready_field(&out, "listen");
    kill(Pid::from_raw(old), Signal::SIGUSR2).expect("USR2");
    let mut new = None;
    assert!(wait_until(T, || {
        new = read_pid().filter(|&p| p != old && process_alive(p));
        new.is_some_and(|n| prefork_testkit::children_of(n).len() == 1)
    }));
    let new = new.expect("new master");
    assert_eq!(
        stat_field(new, 4),
        old,
        "the new master is the old one's child"
    );
    kill(Pid::from_raw(old), Signal::SIGQUIT).expect("QUIT the old master");
    assert!(wait_until(T, || !process_alive(old)));
    assert_eq!(read_pid(), Some(new));
    assert_eq!(http_get(&addr, "/", T).expect("GET").status, 200);
    kill(Pid::from_raw(new), Signal::SIGQUIT).expect("QUIT");
    assert!(wait_until(T, || !process_alive(new)));
}

#[test]
fn a_daemon_refuses_sockets_from_the_service_manager() {
    let out = Command::new(env!("CARGO_BIN_EXE_prefork"))
        .args(["--daemon", "--bind", "127.0.0.1:0"])
        .env("LISTEN_FDS", "1")
        .env("LISTEN_PID", "1")
        .output()
        .expect("run prefork");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("--daemon: the service manager passed sockets"),
        "{err}"
    );
}
