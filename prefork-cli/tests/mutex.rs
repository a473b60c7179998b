//! The mutex strategy: mutual exclusion (L18), SIGKILL of the lock holder
//! (L17), and no SysV semaphore leaked when the master is SIGKILLed.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use prefork_testkit::faults::{run_fault, Fault};
use prefork_testkit::load::{self, LoadConfig, Progress, Target};
use rstest::rstest;

/// The mutex audit line the master logs when it exits.
fn audit(s: &Server) -> String {
    s.log()
        .lines()
        .find(|l| l.contains("mutex audit:"))
        .unwrap_or_else(|| panic!("no audit line: {}", s.log()))
        .to_string()
}

/// The number just before `word` in `line`.
fn count_before(line: &str, word: &str) -> u64 {
    let head = &line[..line
        .find(word)
        .unwrap_or_else(|| panic!("{word} in {line}"))];
    head.split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a number before {word} in {line}"))
}

/// L18: with two listeners and four workers under load, never more than one
/// worker inside the locked section, for every lock kind.
#[rstest]
#[case::flock("mutex-flock")]
#[case::fcntl("mutex-fcntl")]
#[case::sysvsem("mutex-sysvsem")]
#[case::pthread("mutex-pthread")]
fn l18_at_most_one_worker_inside_the_locked_section(#[case] strategy: &str) {
    let mut s = start(strategy, &["--workers", "4", "--bind", "127.0.0.1:0"]);
    assert_eq!(s.addrs().len(), 2);
    let cfg = LoadConfig {
        targets: s
            .addrs()
            .iter()
            .map(|a| Target::parse(a).expect("addr"))
            .collect(),
        concurrency: 8,
        requests: Some(3000),
        duration: None,
        ..LoadConfig::default()
    };
    let r = load::run(&cfg, &Arc::new(Progress::default())).expect("load");
    assert_eq!((r.ok, r.errors.total()), (3000, 0));
    assert_eq!(
        r.per_worker.len(),
        4,
        "every worker served: {:?}",
        r.per_worker
    );
    assert_eq!(s.stop(T).and_then(|st| st.code()), Some(0));
    let line = audit(&s);
    assert!(
        line.contains("at most 1 worker inside the locked section at once"),
        "{line}"
    );
    assert!(count_before(&line, "acquisitions") >= 3000, "{line}");
}

/// L17: SIGKILL the lock holder (found stopped in poll(2) over the two
/// listeners, which only the holder does; the others wait on the lock)
/// every 100 ms under load: the kernel (flock, fcntl, SEM_UNDO) or the
/// robust mutex protocol (EOWNERDEAD) releases the lock, another worker
/// takes over. Nothing is lost and answers never stop for more than 100 ms
/// (the longest accept gap). For the SysV semaphore, 100 holders are killed,
/// and the master's one semaphore is gone after it stops.
#[rstest]
#[case::flock("mutex-flock", 3)]
#[case::fcntl("mutex-fcntl", 3)]
#[case::sysvsem("mutex-sysvsem", 24)]
#[case::pthread("mutex-pthread", 3)]
fn l17_killing_the_lock_holder_loses_nothing(#[case] strategy: &str, #[case] secs: u64) {
    let mut s = start(strategy, &["--workers", "4", "--bind", "127.0.0.1:0"]);
    let master = s.pid();
    let r = run_fault(
        &s,
        strategy,
        Fault::KillLockHolder,
        4,
        400.0,
        Duration::from_secs(secs),
        None,
    )
    .expect("fault run");
    eprintln!("{r:?}");
    let least = if secs > 10 { 100 } else { 5 };
    assert!(
        r.injections >= least,
        "the holder was found and killed: {r:?}"
    );
    if let Err(e) = r.verdict() {
        panic!("{e}: {r:?}");
    }
    assert!(prefork_testkit::process_alive(master), "the master lives");
    let sem = s
        .log()
        .lines()
        .find_map(|l| l.split("SysV semaphore id ").nth(1).map(str::to_string))
        .and_then(|id| id.trim().parse::<i64>().ok());
    assert_eq!(s.stop(T).and_then(|st| st.code()), Some(0));
    let line = audit(&s);
    assert!(line.contains("at most 1 worker inside"), "{line}");
    assert!(
        count_before(&line, "taken over") >= 1,
        "killed holders were taken over: {line}"
    );
    if let Some(id) = sem {
        let table = std::fs::read_to_string("/proc/sysvipc/sem").unwrap_or_default();
        let left = table
            .lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(1) == Some(&id.to_string()));
        assert!(
            !left,
            "semaphore {id} left after {} holder kills",
            r.injections
        );
    } else {
        assert_ne!(strategy, "mutex-sysvsem", "the semaphore id is logged");
    }
}

/// The semaphore of the sysvsem lock is removed even when the master is
/// SIGKILLed, 100 times over (the guardian removes it).
#[test]
fn no_semaphore_leaks_across_100_master_sigkills() {
    let mut ids = Vec::new();
    for _ in 0..100 {
        let mut s = start(
            "mutex-sysvsem",
            &["--workers", "1", "--bind", "127.0.0.1:0"],
        );
        // stderr is read by another thread: the line may trail the ready line.
        assert!(s.wait_log("SysV semaphore id", T), "semaphore id logged");
        let line = s
            .log()
            .lines()
            .find(|l| l.contains("SysV semaphore id"))
            .map(str::to_string)
            .expect("semaphore id logged");
        ids.push(
            line.rsplit(' ')
                .next()
                .and_then(|n| n.parse::<i64>().ok())
                .expect("id"),
        );
        kill(Pid::from_raw(s.pid()), Signal::SIGKILL).expect("kill");
        s.wait_exit(T).expect("master gone");
    }
    let alive = || -> Vec<i64> {
        let table = std::fs::read_to_string("/proc/sysvipc/sem").unwrap_or_default();
        table
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .filter(|id| ids.contains(id))
            .collect()
    };
    assert!(
        wait_until(T, || alive().is_empty()),
        "leaked semaphores: {:?}",
        alive()
    );
}
