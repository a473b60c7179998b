//! Busy/idle reporting: frozen workers, recycling, the status interface.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use prefork_testkit::is_sleeping_in_nanosleep;
use rstest::rstest;
use rstest_reuse::apply;

/// L8: a worker stuck on one request longer than --timeout is killed
/// (stable log line), within timeout + 1 s, and its slot serves again.
#[apply(every_strategy)]
fn frozen_worker_is_killed_within_3s_and_its_slot_serves_again(strategy: &str) {
    let s = start(strategy, &["--workers", "2", "--timeout", "2"]);
    let addr = s.addr().to_string();
    let stuck =
        std::thread::spawn(move || http_get(&addr, "/sleep/60000", Duration::from_secs(20)));
    assert!(s.wait_worker_sleeping(T));
    let victim = *s
        .workers()
        .iter()
        .find(|&&w| is_sleeping_in_nanosleep(w))
        .expect("sleeper");
    let t0 = Instant::now();
    assert!(
        s.wait_log("s, killing", Duration::from_secs(4)),
        "{}",
        s.log()
    );
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(3), "killed after {took:?}");
    let log = s.log();
    let line = log
        .lines()
        .find(|l| l.contains("killing"))
        .expect("kill line");
    let needle = format!("pid={victim} busy 2.");
    assert!(
        line.contains(&needle) && line.ends_with("s > 2s, killing"),
        "{line}"
    );
    // The worker writes its last words when the SIGABRT lands, a moment
    // after the master's line.
    let last_words = format!("pid={victim}: busy past the timeout, killed by the master");
    assert!(s.wait_log(&last_words, T), "last words: {}", s.log());
    assert!(
        stuck.join().expect("thread").is_err(),
        "the stuck request is cut"
    );
    assert!(s.wait_workers(2, T));
    assert!(!s.workers().contains(&victim));
    for _ in 0..20 {
        assert_eq!(
            http_get(s.addr(), "/", T).expect("served again").status,
            200
        );
    }
}

/// L9: the master stopped for 4 s, then continued, kills no worker: busy
/// workers get a fresh timeout instead of dying on a stale clock.
#[apply(every_strategy)]
fn a_master_stopped_for_4s_kills_no_worker(strategy: &str) {
    let s = start(strategy, &["--workers", "2", "--timeout", "2"]);
    let before: HashSet<i32> = s.workers().into_iter().collect();
    // Keep one worker busy across the stop with a 1.5 s request at a time.
    let addr = s.addr().to_string();
    let load = std::thread::spawn(move || {
        (0..5)
            .filter(|_| http_get(&addr, "/sleep/1500", T).is_ok_and(|r| r.status == 200))
            .count()
    });
    assert!(s.wait_worker_sleeping(T));
    kill(Pid::from_raw(s.pid()), Signal::SIGSTOP).expect("stop");
    // The fault itself lasts 4 s (this is not a wait for an event).
    std::thread::sleep(Duration::from_secs(4));
    kill(Pid::from_raw(s.pid()), Signal::SIGCONT).expect("cont");
    assert!(
        s.wait_log("master was stopped or starved", T),
        "{}",
        s.log()
    );
    assert_eq!(load.join().expect("load"), 5, "every request served");
    assert!(!s.log().contains("killing"), "{}", s.log());
    let after: HashSet<i32> = s.workers().into_iter().collect();
    assert_eq!(before, after, "no worker replaced");
}

/// L9, the stale view itself: a 4.5 s request starts, the master is
/// stopped for 4 s, then continued. On resuming, the master sees a worker
/// busy for 4 s against a 2 s timeout; its view of that time went stale
/// while it could not look, so the worker gets a fresh timeout from the
/// resumption and finishes 0.5 s later. Without the grace it would be
/// killed at once and the request lost (checked: this test fails on a
/// build whose `Supervisor::stalled` does nothing).
#[apply(every_strategy)]
fn a_request_outliving_the_timeout_across_a_master_stop_is_not_killed(strategy: &str) {
    let s = start(strategy, &["--workers", "2", "--timeout", "2"]);
    let addr = s.addr().to_string();
    let slow = std::thread::spawn(move || http_get(&addr, "/sleep/4500", T));
    assert!(s.wait_worker_sleeping(T));
    kill(Pid::from_raw(s.pid()), Signal::SIGSTOP).expect("stop");
    // The fault itself lasts 4 s (this is not a wait for an event).
    std::thread::sleep(Duration::from_secs(4));
    kill(Pid::from_raw(s.pid()), Signal::SIGCONT).expect("cont");
    let r = slow.join().expect("client").expect("answered");
    assert_eq!(r.status, 200, "{}", s.log());
    assert!(
        s.log().contains("master was stopped or starved"),
        "{}",
        s.log()
    );
    assert!(!s.log().contains("killing"), "{}", s.log());
}

/// --max-requests: workers are recycled (replacement first), none lost.
#[apply(every_strategy)]
fn max_requests_recycles_workers_under_2000_connections_with_none_lost(strategy: &str) {
    let s = start(
        strategy,
        &[
            "--workers",
            "4",
            "--max-requests",
            "100",
            "--max-requests-jitter",
            "20",
        ],
    );
    let originals = s.workers();
    let (answers, failed) = burst(s.addr(), 8, 250);
    let pids: HashSet<i32> = answers.iter().map(|&(_, pid)| pid).collect();
    assert_eq!(failed, 0, "connections lost while recycling");
    // 2000 requests at most 120 per worker: every original worker went past
    // its limit and is replaced, one slot at a time.
    assert!(
        wait_until(T, || {
            let now = s.workers();
            now.len() == 4 && originals.iter().all(|o| !now.contains(o))
        }),
        "originals {originals:?}, now {:?}: {}",
        s.workers(),
        s.log()
    );
    assert!(pids.len() > 4, "{} workers served", pids.len());
    assert!(s.log_count("reached its request limit") >= 4, "{}", s.log());
}

/// The status socket: mode 0600, a busy worker shown as busy with its
/// duration, in the table and in JSON; garbage does not hurt the master.
#[apply(every_strategy)]
fn status_shows_a_sleeping_worker_as_busy(strategy: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("status.sock");
    let sock = format!("unix:{}", path.display());
    let s = start(strategy, &["--workers", "3", "--status", &sock]);
    let mode = std::fs::metadata(&path)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    for _ in 0..5 {
        http_get(s.addr(), "/", T).expect("GET");
    }
    let addr = s.addr().to_string();
    let _slow = std::thread::spawn(move || http_get(&addr, "/sleep/5000", T));
    assert!(s.wait_worker_sleeping(T));
    let busy_pid = *s
        .workers()
        .iter()
        .find(|&&w| is_sleeping_in_nanosleep(w))
        .expect("sleeper");
    // The scoreboard is read on the master's next turn.
    assert!(wait_until(T, || status_json(&sock)["totals"]["busy"] == 1));
    let j = status_json(&sock);
    assert_eq!(j["totals"]["workers"], 3);
    assert_eq!(j["totals"]["idle"], 2);
    assert_eq!(j["totals"]["requests"], 5);
    assert_eq!(j["master"]["pid"], s.pid());
    let busy: Vec<_> = j["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter(|w| w["state"] == "busy")
        .collect();
    assert_eq!(busy.len(), 1);
    assert_eq!(busy[0]["pid"], busy_pid);
    assert!(busy[0]["for_s"]
        .as_f64()
        .is_some_and(|f| (0.0..5.0).contains(&f)));
    assert!(busy[0]["rss_kib"].as_u64().is_some_and(|k| k > 0));
    assert!(j["listeners"][0]["accept_queue"].is_u64());

    let table = Command::new(env!("CARGO_BIN_EXE_prefork"))
        .args(["status", &sock])
        .output()
        .expect("status table");
    let text = String::from_utf8_lossy(&table.stdout);
    let row = text
        .lines()
        .find(|l| l.contains(&busy_pid.to_string()))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains("busy") && row.contains('s'), "{text}");
    assert!(text.contains("workers 3 of 3: 1 busy, 2 idle"), "{text}");

    // Garbage on the status socket: the master answers and lives on.
    for _ in 0..20 {
        let mut c = UnixStream::connect(&path).expect("connect");
        let _ = c.write_all(&[0xff; 4096]);
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
    }
    assert_eq!(status_json(&sock)["totals"]["workers"], 3);
    assert_eq!(
        http_get(s.addr(), "/", T).expect("still serving").status,
        200
    );
}

/// S3: another uid is refused by SO_PEERCRED even when the file mode lets
/// it connect.
#[test]
fn status_socket_refuses_another_uid() {
    if !nix::unistd::geteuid().is_root() {
        prefork_testkit::skipped(
            "status_socket_refuses_another_uid",
            "needs root to run a client as another uid",
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    let path = dir.path().join("status.sock");
    let sock = format!("unix:{}", path.display());
    let s = start("blocking", &["--workers", "1", "--status", &sock]);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("open it up");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_prefork"))
        .args(["status", &sock])
        .output()
        .expect("setpriv");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("closed without answering"),
        "{out:?}"
    );
    assert!(
        s.wait_log("refused a client with uid 65534", T),
        "{}",
        s.log()
    );
    assert_eq!(
        status_json(&sock)["totals"]["workers"],
        1,
        "root is still answered"
    );
}

#[test]
fn status_of_a_missing_socket_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_prefork"))
        .args(["status", "unix:/nonexistent/status.sock"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: cannot connect to unix:/nonexistent/status.sock"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_prefork"))
        .args(["--status", "/no/prefix.sock"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The hour field of a log line's timestamp (`2026-11-23T08:45:48.56Z ...`).
fn log_hour(line: &str) -> Option<u32> {
    line.get(11..13)?.parse().ok()
}

/// L10: the wall clock jumps +1 h and back (libfaketime moves CLOCK_REALTIME
/// only, as an NTP step or an operator's `date -s` would) while workers are
/// busy under load with --timeout 2: nothing is killed, nothing lost.
#[test]
fn a_wall_clock_jump_kills_nothing() {
    if !std::path::Path::new(LIBFAKETIME).exists() {
        prefork_testkit::skipped(
            "a_wall_clock_jump_kills_nothing",
            "libfaketime is not installed (scripts/test.sh installs it)",
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = dir.path().join("faketime");
    std::fs::write(&clock, "+0\n").expect("write");
    let s = prefork()
        .args(["--bind", "127.0.0.1:0", "--workers", "2", "--timeout", "2"])
        .env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME_TIMESTAMP_FILE", clock.to_str().expect("utf8"))
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .start()
        .expect("start under libfaketime");
    let before = s.workers();
    let first_hour = s
        .log()
        .lines()
        .next()
        .and_then(log_hour)
        .expect("a log line");
    let addr = s.addr().to_string();
    let load = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(3);
        let (mut ok, mut failed) = (0u32, 0u32);
        while Instant::now() < deadline {
            match http_get(&addr, "/", T) {
                Ok(r) if r.status == 200 => ok += 1,
                _ => failed += 1,
            }
        }
        (ok, failed)
    });
    // Jump forward an hour; a signal makes the master log a line with its
    // (faked) wall-clock time, which proves the jump reached it.
    std::fs::write(&clock, "+1h\n").expect("jump");
    s.signal(Signal::SIGTTIN);
    assert!(s.wait_workers(3, T));
    assert!(s.wait_log("SIGTTIN", T));
    let log = s.log();
    let jumped = log
        .lines()
        .find(|l| l.contains("SIGTTIN"))
        .and_then(log_hour)
        .expect("hour");
    assert_eq!(
        jumped,
        (first_hour + 1) % 24,
        "the wall clock jumped: {log}"
    );
    std::fs::write(&clock, "-1h\n").expect("jump back");
    s.signal(Signal::SIGTTOU);
    assert!(s.wait_workers(2, T));
    let (ok, failed) = load.join().expect("load");
    assert_eq!(failed, 0);
    assert!(ok > 100, "{ok} requests");
    assert!(!s.log().contains("killing"), "{}", s.log());
    assert!(
        before.iter().all(|w| s.workers().contains(w)),
        "no worker replaced"
    );
}

/// L15: a backlog above net.core.somaxconn is warned about at start (the
/// kernel caps it silently), and a full accept queue shows in the status:
/// the listener's queue reaches its backlog while the only worker sleeps.
#[test]
fn l15_a_capped_backlog_is_warned_and_a_full_queue_shows_in_the_status() {
    let somaxconn: i64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .expect("net.core.somaxconn");
    if somaxconn < 65535 {
        let wanted = (somaxconn + 1).to_string();
        let s = start("blocking", &["--workers", "1", "--backlog", &wanted]);
        let warning = format!(
            "listen backlog {wanted} is capped by the kernel to net.core.somaxconn={somaxconn}"
        );
        assert!(s.wait_log(&warning, T), "{}", s.log());
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let sock = format!("unix:{}", dir.path().join("status.sock").display());
    let s = start(
        "blocking",
        &[
            "--workers",
            "1",
            "--backlog",
            "2",
            "--defer-accept",
            "0",
            "--status",
            &sock,
        ],
    );
    assert!(!s.log().contains("capped by the kernel"), "{}", s.log());
    let addr = s.addr().to_string();
    let slow = std::thread::spawn(move || http_get(&addr, "/sleep/1500", T));
    assert!(s.wait_worker_sleeping(T));
    // More clients than the queue holds: the kernel queues backlog + 1 and
    // drops the others' handshakes (they would retry), so each connect is
    // bounded.
    let sa: std::net::SocketAddr = s.addr().parse().expect("addr");
    let clients: Vec<_> = (0..6)
        .filter_map(|_| std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(300)).ok())
        .collect();
    assert!(!clients.is_empty());
    assert!(
        wait_until(T, || {
            let l = &status_json(&sock)["listeners"][0];
            l["backlog"] == 2 && l["accept_queue"].as_u64().is_some_and(|q| q >= 2)
        }),
        "{}",
        status_json(&sock)
    );
    drop(clients);
    assert_eq!(slow.join().expect("thread").expect("slow").status, 200);
}

/// S5: garbage on a worker's status channel (something in the worker
/// writing where only its reports go) gets that worker replaced, its
/// replacement first; garbage sent to the status socket is ignored. The
/// master stays healthy and keeps serving.
#[apply(every_strategy)]
fn s5_garbage_on_a_status_channel_replaces_the_worker(strategy: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("status.sock");
    let sock = format!("unix:{}", path.display());
    let s = start(strategy, &["--workers", "2", "--status", &sock]);
    let victim = s.workers()[0];
    // The worker's status channel: its one write-only pipe beyond stdio.
    let (n, _, _) = fd_table(&victim.to_string())
        .into_iter()
        .find(|(n, target, flags)| *n > 2 && target.starts_with("pipe:") && flags & 0o3 == 1)
        .expect("the status pipe");
    let fd = format!("/proc/{victim}/fd/{n}");
    let mut pipe = std::fs::OpenOptions::new()
        .write(true)
        .open(&fd)
        .expect("open the worker's status pipe");
    pipe.write_all(&[0xA5; 64]).expect("garbage");
    assert!(
        s.wait_log(
            &format!("pid={victim} sent a malformed status message; replacing it"),
            T
        ),
        "{}",
        s.log()
    );
    assert!(
        wait_until(T, || !s.workers().contains(&victim)
            && s.workers().len() == 2),
        "{}",
        s.log()
    );
    // Garbage to the status socket: ignored, the document still comes.
    let mut c = UnixStream::connect(&path).expect("connect");
    let _ = c.write_all(b"\x00\xffGET / HTTP/1.0\r\n\r\n garbage");
    let mut doc = String::new();
    c.read_to_string(&mut doc).expect("read");
    let j: serde_json::Value = serde_json::from_str(&doc).expect("the status document");
    assert_eq!(j["master"]["pid"], s.pid());
    assert_eq!(j["totals"]["workers"], 2);
    for _ in 0..10 {
        assert_eq!(http_get(s.addr(), "/", T).expect("GET").status, 200);
    }
}
