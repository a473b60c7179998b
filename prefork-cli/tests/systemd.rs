//! prefork under a service manager: the test plays systemd's side of the
//! notify protocol (a datagram socket named by `NOTIFY_SOCKET`), and
//! `systemd-analyze verify` checks the units shipped under docs/.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use prefork_testkit::process_alive;

/// Every datagram received, with when it came.
#[derive(Clone, Default)]
struct Heard(Arc<Mutex<Vec<(Instant, String)>>>);

impl Heard {
    fn listen(path: &Path) -> Heard {
        let sock = UnixDatagram::bind(path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let heard = Heard::default();
        let h = heard.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with the test process; bounded by its reads' timeout.
            loop {
                if let Ok(n) = sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if let Ok(mut v) = h.0.lock() {
                        v.push((Instant::now(), msg));
                    }
                }
            }
        });
        heard
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    fn count(&self, needle: &str) -> usize {
        self.all()
            .iter()
            .filter(|(_, m)| m.contains(needle))
            .count()
    }

    /// Waits for a message, after the first `skip` ones, with every one of
    /// `needles`; returns it.
    fn wait(&self, skip: usize, needles: &[&str]) -> Option<String> {
        self.wait_at(skip, needles).map(|(_, m)| m)
    }

    /// As [`Heard::wait`], with the message's index, so that what follows
    /// it is looked for after it (it may already have come).
    fn wait_at(&self, skip: usize, needles: &[&str]) -> Option<(usize, String)> {
        let mut found = None;
        wait_until(T, || {
            found = self
                .all()
                .into_iter()
                .enumerate()
                .skip(skip)
                .map(|(i, (_, m))| (i, m))
                .find(|(_, m)| needles.iter().all(|n| m.contains(n)));
            found.is_some()
        });
        found
    }
}

fn monotonic_usec() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
}

/// Start, the watchdog, HUP, USR2 and QUIT, as systemd sees them.
#[test]
fn the_notify_protocol_through_start_watchdog_reload_upgrade_and_quit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let heard = Heard::listen(&path);
    let pid_file = dir.path().join("prefork.pid");
    let pid_arg = pid_file.to_string_lossy().into_owned();
    let _masters = Masters(pid_arg.clone());
    let s = prefork()
        .env("NOTIFY_SOCKET", &path.to_string_lossy())
        .env("WATCHDOG_USEC", "400000")
        .args([
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--pid-file",
            &pid_arg,
        ])
        .start()
        .expect("starts");
    let master = s.pid();

    // READY=1 once both workers booted, with the pool in STATUS=.
    let ready = heard.wait(0, &["READY=1"]).expect("READY=1");
    assert!(
        ready.contains("STATUS=2 of 2 workers: 0 busy, 2 idle"),
        "{ready}"
    );
    assert!(!ready.contains("MAINPID="), "not an upgrade: {ready}");

    // WATCHDOG=1 every half WATCHDOG_USEC (200 ms), from the master loop.
    let before = heard.count("WATCHDOG=1");
    assert!(wait_until(T, || heard.count("WATCHDOG=1") >= before + 5));
    let pings: Vec<Instant> = heard
        .all()
        .into_iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| t)
        .collect();
    let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter()
            .all(|g| *g >= Duration::from_millis(150) && *g <= Duration::from_millis(400)),
        "pings every ~200 ms: {gaps:?}"
    );
    // A stopped master stops the pings (the loop is not healthy).
    kill(Pid::from_raw(master), Signal::SIGSTOP).expect("stop");
    let stopped = heard.count("WATCHDOG=1");
    let frozen = !wait_until(Duration::from_millis(600), || {
        heard.count("WATCHDOG=1") > stopped + 1
    });
    kill(Pid::from_raw(master), Signal::SIGCONT).expect("cont");
    assert!(frozen, "no ping while the master is stopped");

    // HUP: RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC, now), then
    // READY=1 once the new generation is up.
    let n = heard.all().len();
    let t0 = monotonic_usec();
    s.signal(Signal::SIGHUP);
    let (at, reloading) = heard.wait_at(n, &["RELOADING=1"]).expect("RELOADING=1");
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .expect("MONOTONIC_USEC");
    assert!(
        usec >= t0 && usec - t0 < 5_000_000,
        "MONOTONIC_USEC {usec} vs {t0}"
    );
    // (READY=1 may already have come: it is looked for after RELOADING.)
    heard
        .wait(at + 1, &["READY=1"])
        .expect("READY=1 after the reload");

    // USR2: the new master says MAINPID=<its pid> with READY=1, so that
    // systemd follows it; QUIT to the old one says STOPPING=1.
    let n = heard.all().len();
    s.signal(Signal::SIGUSR2);
    let mut new = None;
    assert!(
        wait_until(T, || {
            new = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
                .filter(|&p| p != master && process_alive(p));
            new.is_some()
        }),
        "{}",
        s.log()
    );
    let new = new.expect("new master");
    let handed = heard
        .wait(n, &[&format!("MAINPID={new}"), "READY=1"])
        .expect("MAINPID of the new master");
    assert!(handed.contains("STATUS="), "{handed}");
    let n = heard.all().len();
    kill(Pid::from_raw(master), Signal::SIGQUIT).expect("QUIT the old master");
    heard.wait(n, &["STOPPING=1"]).expect("STOPPING=1");
    assert!(wait_until(T, || !process_alive(master)));
    // The new master took the watchdog over (WATCHDOG_PID unset here).
    let pings = heard.count("WATCHDOG=1");
    assert!(wait_until(T, || heard.count("WATCHDOG=1") >= pings + 3));
    let n = heard.all().len();
    kill(Pid::from_raw(new), Signal::SIGQUIT).expect("QUIT the new master");
    heard
        .wait(n, &["STOPPING=1"])
        .expect("STOPPING=1 from the new master");
    assert!(wait_until(T, || !process_alive(new)));
}

/// The units under docs/systemd pass `systemd-analyze verify`.
#[test]
fn the_shipped_units_pass_systemd_analyze_verify() {
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        prefork_testkit::skipped(
            "the_shipped_units_pass_systemd_analyze_verify",
            "systemd-analyze is not installed (scripts/test.sh installs it)",
        );
        return;
    };
    assert!(out.status.success());
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/systemd");
    let dir = tempfile::tempdir().expect("tempdir");
    // The units name /usr/local/bin/prefork: verify checks that it exists
    // and is executable, so the test points them at the binary it built.
    for unit in ["prefork.service", "prefork.socket"] {
        let text = std::fs::read_to_string(docs.join(unit)).expect("unit");
        let text = text.replace("/usr/local/bin/prefork", env!("CARGO_BIN_EXE_prefork"));
        std::fs::write(dir.path().join(unit), text).expect("write");
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("prefork.socket"))
        .arg(dir.path().join("prefork.service"))
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    // Only complaints about our units count (the host's own units may
    // have theirs).
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("prefork")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "{}\n{err}",
        out.status
    );
}

/// The master as PID 1 of a PID namespace (`unshare --pid --fork`, as in a
/// container): the orphans its workers' processes leave behind are
/// re-parented to it, and it reaps them, not only its workers; TERM stops
/// it.
#[test]
fn as_pid_1_the_master_reaps_every_orphan() {
    if !nix::unistd::geteuid().is_root() {
        prefork_testkit::skipped(
            "as_pid_1_the_master_reaps_every_orphan",
            "unshare --pid needs root",
        );
        return;
    }
    let mut s = prefork_testkit::ServerBuilder::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--kill-child",
            env!("CARGO_BIN_EXE_prefork"),
        ])
        .args([
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--fault",
            "orphan-at-boot",
            "--log-level",
            "debug",
        ])
        .start()
        .expect("prefork as PID 1");
    assert!(s.wait_log("running as PID 1", T), "{}", s.log());
    // unshare's one child is the master (PID 1 inside).
    let mut master = 0;
    assert!(wait_until(T, || {
        master = prefork_testkit::children_of(s.pid())
            .first()
            .copied()
            .unwrap_or(0);
        master != 0
    }));
    // Two orphans (one per worker's boot) exit after 0.3 s: reaped.
    assert!(
        wait_until(T, || s.log_count("not a worker") >= 2),
        "{}",
        s.log()
    );
    assert!(wait_until(T, || prefork_testkit::zombie_children(master).is_empty()));
    assert_eq!(http_get(s.addr(), "/", T).expect("served").status, 200);
    kill(Pid::from_raw(master), Signal::SIGTERM).expect("TERM");
    assert_eq!(
        s.wait_exit(T).and_then(|st| st.code()),
        Some(0),
        "{}",
        s.log()
    );
}

/// `--subreaper` outside a container: the same orphans come to the master
/// instead of the host's init, and are reaped.
#[test]
fn with_subreaper_the_master_reaps_the_orphans_of_its_workers() {
    let s = prefork()
        .args([
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--fault",
            "orphan-at-boot",
            "--subreaper",
            "--log-level",
            "debug",
        ])
        .start()
        .expect("starts");
    assert!(
        wait_until(T, || s.log_count("not a worker") >= 2),
        "{}",
        s.log()
    );
    assert!(wait_until(T, || prefork_testkit::zombie_children(s.pid()).is_empty()));
}

/// `--term graceful`: TERM lets the request in hand finish, as QUIT does.
#[test]
fn term_graceful_lets_the_request_in_hand_finish() {
    let mut s = prefork()
        .args([
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--term",
            "graceful",
        ])
        .start()
        .expect("starts");
    let addr = s.addr().to_string();
    let slow = std::thread::spawn(move || http_get(&addr, "/sleep/800", T));
    assert!(s.wait_worker_sleeping(T));
    s.signal(Signal::SIGTERM);
    let r = slow.join().expect("client").expect("answered");
    assert_eq!(r.status, 200);
    assert_eq!(s.wait_exit(T).and_then(|st| st.code()), Some(0));
}
