//! The master's signals and worker supervision, on the real binary.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use prefork_testkit::{process_alive, zombie_children};
use rstest::rstest;
use rstest_reuse::apply;

#[apply(every_strategy)]
fn sigkilled_worker_comes_back_in_the_same_slot_with_a_new_pid_within_1s(strategy: &str) {
    let s = start(strategy, &["--workers", "2"]);
    let (slot, pid) = who(s.addr());
    let t0 = Instant::now();
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    let ready_line = format!("worker={slot} pid=");
    assert!(
        wait_until(Duration::from_secs(1), || {
            s.log_count(&ready_line) >= 3 // ready, died, ready
                && s.workers().len() == 2
                && !s.workers().contains(&pid)
        }),
        "worker not replaced within 1s: {}",
        s.log()
    );
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert!(s
        .log()
        .contains(&format!("worker={slot} pid={pid} died (killed by SIGKILL)")));
    assert!(zombie_children(s.pid()).is_empty());
    // The new worker serves from the same slot.
    assert!(wait_until(T, || {
        let (sl, p) = who(s.addr());
        sl == slot && p != pid
    }));
}

#[apply(every_strategy)]
fn ttin_adds_and_ttou_removes_one_worker(strategy: &str) {
    let s = start(strategy, &["--workers", "4"]);
    assert!(s.wait_workers(4, T));
    s.signal(Signal::SIGTTIN);
    assert!(s.wait_workers(5, T), "TTIN makes 5: {}", s.log());
    // Signals of one kind coalesce while pending: wait for each to act.
    s.signal(Signal::SIGTTOU);
    assert!(s.wait_workers(4, T), "TTOU makes 4: {}", s.log());
    s.signal(Signal::SIGTTOU);
    assert!(s.wait_workers(3, T), "a second TTOU makes 3: {}", s.log());
    assert!(s.log().contains("worker=4 pid=") && s.log().contains("retiring"));
    // A retired worker is a zombie for the moment between its exit and the
    // master's next loop turn: it must be reaped, not be absent at once.
    assert!(wait_until(T, || zombie_children(s.pid()).is_empty()));
}

#[apply(every_strategy)]
fn quit_lets_the_request_in_hand_finish_then_exits_0_with_no_child_left(strategy: &str) {
    let mut s = start(strategy, &["--workers", "2"]);
    let addr = s.addr().to_string();
    let slow = std::thread::spawn(move || http_get(&addr, "/sleep/1000", T));
    assert!(
        s.wait_worker_sleeping(T),
        "the slow request reaches a worker"
    );
    let workers = s.workers();
    s.signal(Signal::SIGQUIT);
    let st = s.wait_exit(T).expect("master exits");
    assert_eq!(st.code(), Some(0), "{}", s.log());
    let r = slow
        .join()
        .expect("thread")
        .expect("slow request completed");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"slept 1000ms\n"[..]));
    assert!(workers.iter().all(|&w| !process_alive(w)));
}

#[apply(every_strategy)]
fn term_stops_at_once_and_int_too(strategy: &str) {
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let mut s = start(strategy, &["--workers", "2"]);
        let addr = s.addr().to_string();
        let slow = std::thread::spawn(move || http_get(&addr, "/sleep/20000", T));
        assert!(s.wait_worker_sleeping(T));
        let workers = s.workers();
        let t0 = Instant::now();
        s.signal(sig);
        let st = s.wait_exit(T).expect("master exits");
        assert_eq!(st.code(), Some(0));
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "{sig} took {:?}",
            t0.elapsed()
        );
        assert!(
            slow.join().expect("thread").is_err(),
            "the slow request is cut"
        );
        assert!(workers.iter().all(|&w| !process_alive(w)));
    }
}

#[apply(every_strategy)]
fn graceful_stop_escalates_after_graceful_timeout(strategy: &str) {
    let mut s = start(strategy, &["--workers", "1", "--graceful-timeout", "1"]);
    let addr = s.addr().to_string();
    let _slow = std::thread::spawn(move || http_get(&addr, "/sleep/30000", T));
    assert!(
        s.wait_worker_sleeping(T),
        "the slow request reaches the worker"
    );
    let t0 = Instant::now();
    s.signal(Signal::SIGQUIT);
    let st = s
        .wait_exit(Duration::from_secs(8))
        .expect("exits after escalation");
    assert_eq!(st.code(), Some(0));
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "escalated after {:?}",
        t0.elapsed()
    );
    assert!(
        s.log().contains("did not stop in time; sending SIGTERM"),
        "{}",
        s.log()
    );
}

#[apply(every_strategy)]
fn hup_replaces_every_worker_without_losing_a_connection(strategy: &str) {
    let s = start(strategy, &["--workers", "3"]);
    let old: HashSet<i32> = s.workers().into_iter().collect();
    let addr = s.addr().to_string();
    let slow = std::thread::spawn(move || http_get(&addr, "/sleep/1500", T));
    assert!(s.wait_worker_sleeping(T));
    let load = Load::start(s.addr());
    s.signal(Signal::SIGHUP);
    assert!(
        wait_replaced(&s, &old, 3),
        "every worker replaced: {}",
        s.log()
    );
    let (ok, failed) = load.finish();
    assert_eq!(failed, 0, "connections lost during reload");
    assert!(ok > 0);
    let r = slow
        .join()
        .expect("thread")
        .expect("slow request survives reload");
    assert_eq!(r.status, 200);
    assert!(s.log().contains("replaced by a new generation"));
}

#[apply(every_strategy)]
fn winch_stops_all_workers_keeps_master_and_ttin_brings_them_back(strategy: &str) {
    let s = start(strategy, &["--workers", "3"]);
    s.signal(Signal::SIGWINCH);
    assert!(s.wait_workers(0, T), "{}", s.log());
    assert!(process_alive(s.pid()), "the master stays");
    s.signal(Signal::SIGTTIN);
    assert!(s.wait_workers(3, T), "TTIN restores the pool: {}", s.log());
    assert!(wait_until(T, || http_get(s.addr(), "/", T)
        .is_ok_and(|r| r.status == 200)));
}

#[apply(every_strategy)]
fn sigkill_of_the_master_leaves_no_worker_after_1s(strategy: &str) {
    let s = start(strategy, &["--workers", "3"]);
    let workers = s.workers();
    assert_eq!(workers.len(), 3);
    kill(Pid::from_raw(s.pid()), Signal::SIGKILL).expect("kill master");
    assert!(
        wait_until(Duration::from_secs(1), || workers
            .iter()
            .all(|&w| !process_alive(w))),
        "workers outlived the master by more than 1s"
    );
}

#[apply(every_strategy)]
fn usr1_is_logged_and_changes_nothing(strategy: &str) {
    let s = start(strategy, &["--workers", "1"]);
    let before = s.workers();
    s.signal(Signal::SIGUSR1);
    assert!(s.wait_log("USR1: no --log-file to reopen", T));
    assert_eq!(s.workers(), before);
    assert_eq!(http_get(s.addr(), "/", T).expect("GET").status, 200);
}

/// USR1 with `--log-file`: once the server is up the logs go to the file.
/// After the file is moved away (logrotate), USR1 has the master, then
/// every worker (blocked in accept or in recvmsg) write to a new file at
/// the path; the moved one gets nothing more.
#[apply(every_strategy)]
fn usr1_reopens_the_log_file_in_the_master_and_every_worker(strategy: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("prefork.log");
    let rotated = dir.path().join("prefork.log.1");
    let s = start(
        strategy,
        &["--workers", "2", "--log-file", log.to_str().expect("path")],
    );
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    assert!(wait_until(T, || read(&log).contains("worker=1 pid=")));
    let workers = s.workers();
    assert_eq!(workers.len(), 2);
    std::fs::rename(&log, &rotated).expect("rotate");
    s.signal(Signal::SIGUSR1);
    let stderr_of = |pid: i32| std::fs::read_link(format!("/proc/{pid}/fd/2")).ok();
    assert!(
        wait_until(T, || {
            stderr_of(s.pid()).as_deref() == Some(log.as_path())
                && workers
                    .iter()
                    .all(|&w| stderr_of(w).as_deref() == Some(log.as_path()))
        }),
        "stderr of the master and workers: {:?}",
        std::iter::once(s.pid())
            .chain(workers.iter().copied())
            .map(stderr_of)
            .collect::<Vec<_>>()
    );
    assert!(read(&log).contains("USR1: reopened"));
    let rotated_len = std::fs::metadata(&rotated).expect("rotated").len();
    // A worker's death and its replacement go to the new file only.
    kill(Pid::from_raw(workers[0]), Signal::SIGKILL).expect("kill");
    let died = format!("pid={} died", workers[0]);
    assert!(
        wait_until(T, || read(&log).contains(&died)),
        "{}",
        read(&log)
    );
    assert_eq!(
        std::fs::metadata(&rotated).expect("rotated").len(),
        rotated_len
    );
    assert_eq!(http_get(s.addr(), "/", T).expect("GET").status, 200);
}

/// The pid in a pid file, if it names a live process other than `not`.
fn other_master(pid_file: &std::path::Path, not: i32) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (pid != not && process_alive(pid)).then_some(pid)
}

/// A process's descriptors by kind, sorted: `listening socket` for one
/// listening on TCP `port`, `socket`, `pipe`, `anon_inode`, or the path.
/// Pipes and sockets are new in each master or worker generation; their
/// number is what must not grow.
fn fd_kinds(pid: i32, port: u16) -> Vec<String> {
    let listening: HashSet<String> = prefork_testkit::procs::tcp_listeners(port)
        .iter()
        .map(|r| format!("socket:[{}]", r.inode))
        .collect();
    let mut k: Vec<String> = master_fds(pid)
        .into_iter()
        .map(|f| match f.split_once(':') {
            _ if listening.contains(&f) => "listening socket".to_string(),
            Some((kind @ ("socket" | "pipe" | "anon_inode"), _)) => kind.to_string(),
            _ => f,
        })
        .collect();
    k.sort();
    k
}

/// L5: USR2 starts a new master from the same binary with the listening
/// sockets handed over; QUIT to the old one finishes the upgrade. Five
/// times in a row under load: not one request fails, the Unix socket keeps
/// serving, the pid file names the newest master (the old one's moves to
/// `.oldbin` and goes with it), and the last master holds exactly the
/// descriptors the first did (nothing leaked across exec).
#[apply(every_strategy)]
fn l5_binary_upgrade_five_times_under_load_loses_nothing(strategy: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("prefork.pid");
    let oldbin = dir.path().join("prefork.pid.oldbin");
    // (reuseport serves TCP only.)
    let unix =
        (strategy != "reuseport").then(|| format!("unix:{}", dir.path().join("s.sock").display()));
    let mut args = vec![
        "--workers",
        "2",
        "--pid-file",
        pid_file.to_str().expect("path"),
    ];
    if let Some(u) = &unix {
        args.extend(["--bind", u.as_str()]);
    }
    let s = start(strategy, &args);
    let _masters = Masters(pid_file.to_string_lossy().into_owned());
    let first_fds = fd_kinds(s.pid(), s.port());
    let load = Load::start(s.addr());
    let mut master = s.pid();
    for round in 0..5 {
        kill(Pid::from_raw(master), Signal::SIGUSR2).expect("USR2");
        let mut new = None;
        assert!(
            wait_until(T, || {
                new = other_master(&pid_file, master);
                new.is_some_and(|n| prefork_testkit::children_of(n).len() == 2) && oldbin.exists()
            }),
            "round {round}: no new master with 2 workers: {}",
            s.log()
        );
        let new = new.expect("new master");
        kill(Pid::from_raw(master), Signal::SIGQUIT).expect("QUIT the old master");
        assert!(
            wait_until(T, || !process_alive(master) && !oldbin.exists()),
            "round {round}: the old master pid={master} did not finish: {}",
            s.log()
        );
        assert_eq!(other_master(&pid_file, 0), Some(new));
        master = new;
    }
    let (ok, failed) = load.finish();
    eprintln!("{ok} requests answered during 5 upgrades, {failed} failed");
    assert_eq!(failed, 0, "requests lost during the upgrades: {}", s.log());
    assert!(ok > 0);
    if let Some(u) = &unix {
        assert_eq!(http_get(u, "/", T).expect("GET over unix").status, 200);
    }
    // (fdpass releases its copy of the last connection at its next turn.)
    assert!(
        wait_until(T, || fd_kinds(master, s.port()) == first_fds),
        "the last master's descriptors {:?}, the first's {first_fds:?}",
        fd_kinds(master, s.port())
    );
    kill(Pid::from_raw(master), Signal::SIGQUIT).expect("QUIT");
    assert!(wait_until(T, || !process_alive(master)));
    assert!(!pid_file.exists() && !dir.path().join("s.sock").exists());
}

/// L6 and the roll-back: one upgrade at a time; QUIT to the new master
/// leaves the old one serving with its pid file back; a new binary that
/// fails to start changes nothing.
#[test]
fn binary_upgrade_rolls_back_and_a_broken_binary_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("prefork");
    std::fs::copy(env!("CARGO_BIN_EXE_prefork"), &bin).expect("copy the binary");
    let pid_file = dir.path().join("prefork.pid");
    let sock = dir.path().join("s.sock");
    let unix = format!("unix:{}", sock.display());
    let s = ServerBuilder::new(&bin)
        .args(["--bind", "127.0.0.1:0", "--bind", &unix, "--workers", "1"])
        .args(["--pid-file", pid_file.to_str().expect("path")])
        .start()
        .expect("starts");
    let _masters = Masters(pid_file.to_string_lossy().into_owned());
    // Roll back: the new master is told to stop.
    s.signal(Signal::SIGUSR2);
    let mut new = None;
    assert!(wait_until(T, || {
        new = other_master(&pid_file, s.pid());
        new.is_some()
    }));
    let new = new.expect("new master");
    assert!(wait_until(T, || prefork_testkit::children_of(new).len() == 1));
    // One upgrade at a time (as nginx): the new master refuses USR2 while
    // the old one runs, and the old one while its new one runs.
    kill(Pid::from_raw(new), Signal::SIGUSR2).expect("USR2 to the new master");
    s.signal(Signal::SIGUSR2);
    assert!(wait_until(T, || s.log().contains(&format!(
        "USR2: the old master (pid={}) is still running",
        s.pid()
    )) && s.log().contains(&format!(
        "USR2: a new master (pid={new}) is already running"
    ))));
    assert_eq!(
        prefork_testkit::children_of(new).len(),
        1,
        "no third master"
    );
    kill(Pid::from_raw(new), Signal::SIGQUIT).expect("QUIT the new master");
    assert!(
        wait_until(T, || s
            .log()
            .contains(&format!("new master pid={new} exited (exit code 0)"))),
        "{}",
        s.log()
    );
    assert_eq!(other_master(&pid_file, 0), Some(s.pid()), "pid file back");
    assert_eq!(
        http_get(&unix, "/", T).expect("unix still served").status,
        200
    );
    // A broken binary where the old one was.
    std::fs::remove_file(&bin).expect("remove");
    std::fs::write(&bin, "#!/bin/sh\necho 'broken build' >&2\nexit 1\n").expect("write");
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    s.signal(Signal::SIGUSR2);
    assert!(
        wait_until(T, || s.log().contains("exited (exit code 1); this master")),
        "{}",
        s.log()
    );
    assert!(s.log().contains("broken build"));
    assert_eq!(other_master(&pid_file, 0), Some(s.pid()));
    assert!(!dir.path().join("prefork.pid.oldbin").exists());
    assert_eq!(
        http_get(s.addr(), "/", T).expect("still served").status,
        200
    );
}

/// reuseport: the new master takes the old one's slot sockets (so each
/// SO_REUSEPORT group keeps its members, and the old master's exit closes
/// no queue) and steers the groups; when it is QUIT instead (a roll-back),
/// the old master steers them again, to all of its slots.
#[test]
fn reuseport_upgrade_shares_the_slot_sockets_and_a_roll_back_restores_the_steering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("prefork.pid");
    let s = start(
        "reuseport",
        &[
            "--workers",
            "3",
            "--pid-file",
            pid_file.to_str().expect("path"),
        ],
    );
    let _masters = Masters(pid_file.to_string_lossy().into_owned());
    let sockets = |pid: i32| fd_kinds(pid, s.port());
    let before = sockets(s.pid());
    s.signal(Signal::SIGUSR2);
    let mut new = None;
    assert!(
        wait_until(T, || {
            new = other_master(&pid_file, s.pid());
            new.is_some_and(|n| prefork_testkit::children_of(n).len() == 3)
        }),
        "{}",
        s.log()
    );
    let new = new.expect("new master");
    assert!(
        s.log()
            .contains("reuseport: took over the sockets of slots 1..=2"),
        "{}",
        s.log()
    );
    assert_eq!(
        sockets(new),
        before,
        "the new master holds the same kinds of descriptors"
    );
    // The same sockets: each of the old master's slot sockets is one of the new one's.
    let inodes = |pid: i32| -> std::collections::BTreeSet<String> {
        fd_table(&pid.to_string())
            .into_iter()
            .filter(|(_, target, _)| target.starts_with("socket:"))
            .map(|(_, target, _)| target)
            .collect()
    };
    let shared = inodes(s.pid()).intersection(&inodes(new)).count();
    assert!(shared >= 3, "listener and slot sockets shared: {shared}");
    // The new master shrinks to 2: its program now steers every group to
    // slots 0 and 1, the old master's workers' too.
    kill(Pid::from_raw(new), Signal::SIGTTOU).expect("TTOU the new master");
    assert!(wait_until(T, || prefork_testkit::children_of(new).len() == 2));
    // Roll back: the new master stops; the old one steers to its 3 slots again.
    kill(Pid::from_raw(new), Signal::SIGQUIT).expect("QUIT the new master");
    assert!(
        wait_until(T, || !process_alive(new)
            && s.log().contains(&format!("new master pid={new} exited"))),
        "{}",
        s.log()
    );
    let (answers, failed) = burst(s.addr(), 4, 60);
    assert_eq!(failed, 0);
    let slots: HashSet<usize> = answers.iter().map(|(slot, _)| *slot).collect();
    assert_eq!(
        slots.len(),
        3,
        "every slot of the old master gets connections again: {answers:?}"
    );
}

#[test]
fn crash_loop_at_boot_backs_off_exponentially() {
    let mut s = prefork()
        .args([
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--fault",
            "boot-crash",
        ])
        .spawn()
        .expect("spawn");
    // Delays 0, 0.1, 0.2, 0.4, 0.8, 1.6 s: about 6 forks in 3 s (thousands without back-off).
    assert!(
        s.wait_log(
            "respawning in 1.6s (crash loop back-off)",
            Duration::from_secs(8)
        ),
        "{}",
        s.log()
    );
    let deaths = s.log_count("before it was ready");
    assert!((5..=8).contains(&deaths), "{deaths} forks: {}", s.log());
    // The master's CPU over the loop (about 3 s, forks included): at most
    // 5 % (15 ticks of 10 ms).
    let stat = prefork_testkit::procs::stat(s.pid()).expect("master stat");
    let cpu = stat.utime + stat.stime;
    assert!(
        cpu <= 15,
        "the master used {cpu} ticks during the crash loop"
    );
    // Regression: the worker's SIGABRT handler (last words of a frozen
    // worker) once swallowed the app's own abort() as "exit code 134". Only
    // the master's SIGABRT is the frozen-kill; any other keeps its meaning.
    assert!(s.log().contains("killed by SIGABRT"), "{}", s.log());
    s.signal(Signal::SIGTERM);
    assert_eq!(s.wait_exit(T).and_then(|st| st.code()), Some(0));
}

#[test]
fn boot_failure_stops_respawning_and_all_failed_exits_1() {
    let mut s = prefork()
        .args([
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--fault",
            "boot-fail",
        ])
        .spawn()
        .expect("spawn");
    let st = s.wait_exit(T).expect("master gives up");
    assert_eq!(st.code(), Some(1));
    let log = s.log();
    assert_eq!(
        log.matches("failed to boot: app after_fork: injected boot failure")
            .count(),
        2,
        "{log}"
    );
    assert!(
        log.contains("will not be respawned until reload (HUP)"),
        "{log}"
    );
    assert!(log.contains("every worker failed to boot"), "{log}");
}

#[test]
fn pid_file_is_written_and_removed_and_a_live_one_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pf = dir.path().join("prefork.pid");
    let pfs = pf.to_str().expect("utf8");
    let mut s = start("blocking", &["--workers", "1", "--pid-file", pfs]);
    assert_eq!(
        std::fs::read_to_string(&pf).expect("pid file"),
        format!("{}\n", s.pid())
    );
    // A second server refuses the live pid file and binds nothing.
    let mut second = prefork()
        .args(["--bind", "127.0.0.1:0", "--workers", "1", "--pid-file", pfs])
        .spawn()
        .expect("spawn");
    assert_eq!(second.wait_exit(T).and_then(|st| st.code()), Some(1));
    assert!(
        second
            .log()
            .contains(&format!("names running process {}", s.pid())),
        "{}",
        second.log()
    );
    assert_eq!(s.stop(T).and_then(|st| st.code()), Some(0));
    assert!(!pf.exists(), "removed on exit");
}

/// The master's descriptors, by what they point to (`socket:[N]`,
/// `pipe:[N]`, a path).
fn master_fds(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = fd_table(&pid.to_string())
        .into_iter()
        .map(|(_, target, _)| target)
        .collect();
    v.sort();
    v
}

/// The pool has settled: the master's table holds exactly its target,
/// none booting or stopping, and its children are exactly those.
fn settled(s: &Server, sock: &str) -> Option<usize> {
    let t = &status_json(sock)["totals"];
    let target = t["target"].as_u64()? as usize;
    let calm = t["workers"] == target && t["booting"] == 0 && t["stopping"] == 0;
    (calm && s.workers().len() == target).then_some(target)
}

/// Brings the pool to `n` workers with TTIN/TTOU, one signal at a time
/// (signals of one kind coalesce), each waited for.
fn resize_to(s: &Server, sock: &str, n: usize) {
    let mut now = None;
    assert!(
        wait_until(T, || {
            now = settled(s, sock);
            now.is_some()
        }),
        "the pool settles: {:?}",
        status_json(sock)
    );
    let mut now = now.unwrap_or(n);
    while now != n {
        let want = if now > n { now - 1 } else { now + 1 };
        s.signal(if now > n {
            Signal::SIGTTOU
        } else {
            Signal::SIGTTIN
        });
        assert!(
            wait_until(T, || settled(s, sock) == Some(want)),
            "{now} -> {want} workers: {:?}",
            status_json(sock)
        );
        now = want;
    }
}

/// L13: 1,000 signals of every kind the master handles or ignores (HUP,
/// TTIN, TTOU, WINCH, USR1, CHLD, PIPE) within about a second. The
/// master lives and stays responsive; no zombie is left; once the pool is
/// brought back to 2 workers they serve, and the master holds no more
/// descriptors than before (reuseport keeps one listening socket per slot
/// the storm created: every extra one must be exactly that).
#[apply(every_strategy)]
fn l13_a_storm_of_1000_signals_leaves_the_master_healthy(strategy: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = format!("unix:{}", dir.path().join("status.sock").display());
    let s = start(strategy, &["--workers", "2", "--status", &sock]);
    assert!(s.wait_workers(2, T));
    // The master's descriptors by kind; reuseport may keep more listening
    // sockets (one for every slot it ever created).
    let kinds = || {
        let mut k = fd_kinds(s.pid(), s.port());
        if strategy == "reuseport" {
            k.dedup_by(|a, b| a == b && a == "listening socket");
        }
        k
    };
    let before = kinds();
    // (USR2 starts a new master: the upgrade has its own tests, L5.)
    const KINDS: [Signal; 7] = [
        Signal::SIGHUP,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGWINCH,
        Signal::SIGUSR1,
        Signal::SIGCHLD,
        Signal::SIGPIPE,
    ];
    // A fixed pseudo-random order (an LCG), paced at one per millisecond.
    let mut x: u32 = 12_345;
    let mut ttins = 0;
    let t0 = Instant::now();
    for i in 0..1000u32 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let sig = KINDS[(x >> 16) as usize % KINDS.len()];
        ttins += usize::from(sig == Signal::SIGTTIN);
        kill(Pid::from_raw(s.pid()), sig).expect("the master is alive during the storm");
        let due = t0 + Duration::from_millis(u64::from(i));
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    assert!(process_alive(s.pid()), "{}", s.log());
    // WINCH may have left no worker: HUP brings the pool back.
    s.signal(Signal::SIGHUP);
    assert!(
        wait_until(T, || !s.workers().is_empty()),
        "the pool comes back: {}",
        s.log()
    );
    resize_to(&s, &sock, 2);
    assert!(
        wait_until(T, || zombie_children(s.pid()).is_empty()),
        "{}",
        s.log()
    );
    // The two workers of the pool answer, and only they.
    let pool: HashSet<i32> = s.workers().into_iter().collect();
    assert_eq!(pool.len(), 2);
    for _ in 0..20 {
        let (_, pid) = who(s.addr());
        assert!(pool.contains(&pid), "answered by {pid}, pool {pool:?}");
    }
    // Descriptors, by kind (workers' pipes and channels are new ones): as
    // many as before.
    assert!(
        wait_until(T, || kinds() == before),
        "descriptors before {before:?}, after {:?}",
        master_fds(s.pid())
    );
    if strategy == "reuseport" {
        // Every listening socket counted: at most one per slot the storm
        // could have made (the 2 first, one more per TTIN), and every one
        // on the port is the master's (none leaked into a worker or left
        // behind by one).
        let on_port: HashSet<String> = prefork_testkit::procs::tcp_listeners(s.port())
            .iter()
            .map(|r| format!("socket:[{}]", r.inode))
            .collect();
        // Distinct sockets (slot 0's is also the master's bound listener,
        // under a second descriptor).
        let held = master_fds(s.pid())
            .into_iter()
            .filter(|f| on_port.contains(f))
            .collect::<HashSet<_>>()
            .len();
        assert!(
            (2..=2 + ttins).contains(&held),
            "{held} listening sockets after {ttins} TTIN"
        );
        assert_eq!(
            on_port.len(),
            held,
            "every listening socket on the port is the master's"
        );
    }
    assert!(process_alive(s.pid()));
}

/// S6: the master runs as root and gives the log file to `--user`. A
/// symlink planted at the log path (by the workers' user, who may write the
/// log directory) before USR1 is not followed: the master refuses it and
/// logs on to the old file, and the link's target is neither opened nor
/// given away. Before the fix, root opened the target and chowned it to the
/// workers' user at every reopen.
#[test]
fn s6_a_symlink_planted_at_the_log_path_is_not_followed_on_usr1() {
    if !nix::unistd::geteuid().is_root() {
        prefork_testkit::skipped(
            "s6_a_symlink_planted_at_the_log_path_is_not_followed_on_usr1",
            "needs root (a root master with --user)",
        );
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("prefork.log");
    let target = dir.path().join("shadow");
    std::fs::write(&target, "root:secret\n").expect("target");
    let s = start(
        "blocking",
        &[
            "--workers",
            "1",
            "--user",
            "nobody",
            "--log-file",
            log.to_str().expect("path"),
        ],
    );
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("passwd")
        .expect("nobody");
    let meta = std::fs::metadata(&log).expect("the log file");
    assert_eq!(
        meta.uid(),
        nobody.uid.as_raw(),
        "a file it created is given to --user"
    );
    // logrotate moves the file away; the link takes its place.
    std::fs::rename(&log, dir.path().join("prefork.log.1")).expect("rotate");
    std::os::unix::fs::symlink(&target, &log).expect("plant the link");
    s.signal(Signal::SIGUSR1);
    let old = dir.path().join("prefork.log.1");
    assert!(
        wait_until(T, || std::fs::read_to_string(&old)
            .unwrap_or_default()
            .contains("symbolic link")),
        "the refusal is logged to the old file: {}",
        std::fs::read_to_string(&old).unwrap_or_default()
    );
    let t = std::fs::metadata(&target).expect("target");
    assert_eq!((t.uid(), t.gid()), (0, 0), "the target keeps its owner");
    assert_eq!(
        std::fs::read_to_string(&target).expect("target"),
        "root:secret\n"
    );
    assert!(
        std::fs::symlink_metadata(&log)
            .expect("link")
            .file_type()
            .is_symlink(),
        "the link is left as it was"
    );
}

/// C5: a new worker stuck in the app's after_fork (here: every worker of a
/// reload) is killed at `--boot-timeout` and counted as a boot failure; the
/// reload completes with the old worker still serving, and the master
/// stops cleanly. Without the boot timeout it would wait forever.
#[apply(every_strategy)]
fn a_worker_stuck_at_boot_is_killed_at_the_boot_timeout_and_hup_completes(strategy: &str) {
    let mut s = start(
        strategy,
        &[
            "--workers",
            "1",
            "--boot-timeout",
            "1",
            "--fault",
            "boot-hang-on-reload",
        ],
    );
    let old = s.workers();
    assert_eq!(old.len(), 1);
    let hup = std::time::Instant::now();
    s.signal(Signal::SIGHUP);
    assert!(
        s.wait_log("not ready within the boot timeout (1s), killing", T),
        "{}",
        s.log()
    );
    assert!(
        hup.elapsed() < Duration::from_secs(3),
        "killed {:?} after HUP",
        hup.elapsed()
    );
    assert!(s.wait_log("failed to boot", T), "{}", s.log());
    // The old generation serves on.
    let r = http_get(s.addr(), "/", T).expect("GET");
    assert_eq!(r.status, 200);
    assert_eq!(r.worker_pid(), Some(old[0]), "served by the old worker");
    assert_eq!(s.stop(T).and_then(|st| st.code()), Some(0));
}

/// Continues a stopped worker when the test ends, whatever happened: a
/// stopped process would otherwise outlive the master (it gets no signal
/// but SIGKILL until continued).
struct Continue(i32);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

/// C4: an idle worker stopped with SIGSTOP while the strategy counts on
/// it: under mutex it is the lock holder (stopped in accept with the lock
/// held), so no one accepts; under fdpass the master believes it idle and
/// hands it a connection; under reuseport its own socket's queue waits.
/// Its heartbeat stops, the master SIGKILLs it at the timeout (2 s here),
/// and every request is answered within timeout + 1 s of the stop. Every
/// mutex lock kind, since the flock and fcntl queues must not count as
/// silence.
#[rstest]
#[case::blocking("blocking")]
#[case::mutex("mutex")]
#[case::mutex_flock("mutex-flock")]
#[case::mutex_fcntl("mutex-fcntl")]
#[case::mutex_sysvsem("mutex-sysvsem")]
#[case::fdpass("fdpass")]
#[case::reuseport("reuseport")]
fn a_stopped_idle_worker_is_killed_at_the_timeout_and_nothing_is_lost(#[case] strategy: &str) {
    let s = start(strategy, &["--workers", "2", "--timeout", "2"]);
    assert!(s.wait_workers(2, T));
    // Pick an idle worker (for mutex: the one in accept, i.e. the holder).
    let mut victim = None;
    assert!(
        wait_until(T, || {
            victim = s
                .workers()
                .into_iter()
                .find(|&w| prefork_testkit::faults::stop_if_idle(s.pid(), w));
            victim.is_some()
        }),
        "no idle worker to stop: {}",
        s.log()
    );
    let victim = victim.expect("a victim");
    let _cont = Continue(victim);
    let stopped = Instant::now();
    // Six clients at once, each a 100 ms request: some land on the stopped
    // worker (fdpass dispatches to both "idle" workers; reuseport hashes
    // onto its socket; mutex has no one else accepting).
    let (answers, failed) = burst_path(s.addr(), "/sleep/100", 6, 1);
    let took = stopped.elapsed();
    assert_eq!(failed, 0, "{}", s.log());
    assert_eq!(answers.len(), 6);
    assert!(
        answers.iter().all(|&(_, pid)| pid != victim),
        "the stopped worker answered"
    );
    assert!(
        took <= Duration::from_secs(3),
        "served {took:?} after the stop (timeout 2 s): {}",
        s.log()
    );
    let line = format!("pid={victim} idle but silent");
    assert!(s.wait_log(&line, T), "{}", s.log());
    // Only the stopped one: the other worker, queued for the lock the
    // whole time, is silent too but holds nothing.
    assert_eq!(s.log_count("idle but silent"), 1, "{}", s.log());
    assert!(wait_until(T, || !process_alive(victim)));
    assert!(s.wait_workers(2, T), "replaced: {}", s.log());
}

/// A reload replaces at most `--reload-batch` slots at a time: with 4
/// workers, a batch of 1, and every new worker taking 200 ms to boot, the
/// master never has more than 5 children (unreaped ones count), the reload takes
/// at least the four boots one after another, and requests sent all along
/// are all answered.
#[apply(every_strategy)]
fn a_reload_replaces_one_batch_at_a_time_and_loses_nothing(strategy: &str) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let s = start(
        strategy,
        &[
            "--workers",
            "4",
            "--reload-batch",
            "1",
            "--fault",
            "boot-slow-on-reload",
        ],
    );
    assert!(s.wait_workers(4, T));
    let old = s.workers();
    let master = s.pid();
    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (done, most) = (Arc::clone(&done), Arc::clone(&most));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let n = prefork_testkit::children_at_once(master);
                most.fetch_max(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let load = {
        let addr = s.addr().to_string();
        std::thread::spawn(move || burst_path(&addr, "/", 2, 150))
    };
    let hup = Instant::now();
    s.signal(Signal::SIGHUP);
    assert!(
        wait_until(T, || {
            let now = s.workers();
            now.len() == 4 && now.iter().all(|p| !old.contains(p))
        }),
        "{}",
        s.log()
    );
    let took = hup.elapsed();
    let (answers, failed) = load.join().expect("load");
    done.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    assert_eq!(failed, 0, "{}", s.log());
    assert_eq!(answers.len(), 300);
    assert_eq!(
        most.load(Ordering::Relaxed),
        5,
        "4 workers + a batch of 1: {}",
        s.log()
    );
    assert!(
        took >= Duration::from_millis(800),
        "four 200 ms boots one after another took only {took:?}"
    );
}

/// A graceful stop loses nothing already queued: with one worker and ten
/// clients whose connections completed their handshake (nine of them
/// waiting in the accept queue), QUIT lets all ten be answered: new SYNs
/// are dropped instead (a connection attempt after QUIT gets no answer, so
/// a client retransmits and a balancer retries another host), and the
/// workers empty the queue before they exit. Before, nine were reset when
/// the listener closed (blocking, mutex).
#[apply(every_strategy)]
fn quit_answers_every_connection_already_queued_and_drops_new_syns(strategy: &str) {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let mut s = start(strategy, &["--workers", "1"]);
    let addr: std::net::SocketAddr = s.addr().parse().expect("addr");
    let (tx, rx) = std::sync::mpsc::channel();
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let tx = tx.clone();
            std::thread::spawn(move || -> Result<String, String> {
                let mut c = TcpStream::connect(addr).map_err(|e| e.to_string())?;
                let _ = tx.send(());
                c.set_read_timeout(Some(T)).map_err(|e| e.to_string())?;
                c.write_all(b"GET /sleep/100 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                    .map_err(|e| e.to_string())?;
                let mut out = String::new();
                c.read_to_string(&mut out).map_err(|e| e.to_string())?;
                Ok(out)
            })
        })
        .collect();
    for _ in 0..10 {
        rx.recv_timeout(T).expect("every client connected");
    }
    assert!(s.wait_worker_sleeping(T));
    s.signal(Signal::SIGQUIT);
    assert!(
        s.wait_log("new connections are dropped at the SYN", T),
        "{}",
        s.log()
    );
    let late = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
    assert!(late.is_err(), "a new connection after QUIT is not taken in");
    for c in clients {
        let r = c.join().expect("client").expect("answered");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    assert_eq!(s.wait_exit(T).and_then(|st| st.code()), Some(0));
}
