//! The reuseport strategy: per-slot sockets owned by the master, what it
//! refuses, fairness, and a frozen worker's share delayed, not lost.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use prefork_testkit::load::{self, LoadConfig, Progress, Target};
use prefork_testkit::procs::socket_inodes;

/// Inodes of the sockets listening on 127.0.0.1:`port`.
fn listening_inodes(port: u16) -> Vec<u64> {
    prefork_testkit::procs::tcp_listeners(port)
        .iter()
        .map(|r| r.inode)
        .collect()
}

#[test]
fn four_workers_listen_on_four_sockets_all_owned_by_the_master() {
    let s = start("reuseport", &["--workers", "4"]);
    let port = s.port();
    let listening = listening_inodes(port);
    assert_eq!(listening.len(), 4, "one socket per slot: {listening:?}");
    let master = socket_inodes(s.pid());
    assert!(
        listening.iter().all(|i| master.contains(i)),
        "the master keeps every slot's socket"
    );
    // Each worker holds exactly one of them: its own.
    let mut owned: Vec<u64> = s
        .workers()
        .iter()
        .map(|&w| {
            let mine: Vec<u64> = socket_inodes(w)
                .into_iter()
                .filter(|i| listening.contains(i))
                .collect();
            assert_eq!(mine.len(), 1, "worker {w} holds {mine:?}");
            mine[0]
        })
        .collect();
    owned.sort_unstable();
    let mut all = listening.clone();
    all.sort_unstable();
    assert_eq!(owned, all);
}

#[test]
fn unix_and_inherited_sockets_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = format!("unix:{}", dir.path().join("s.sock").display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefork"))
        .args(["--strategy", "reuseport", "--bind", &sock])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot use SO_REUSEPORT") && err.contains("--strategy blocking or mutex"),
        "{err}"
    );
    assert!(!dir.path().join("s.sock").exists(), "nothing left behind");
}

/// SO_REUSEPORT spreads connections by chance: the busiest of 2 workers
/// stays near half at 1, 4 and 32 concurrent clients.
#[test]
fn two_workers_share_connections_evenly_at_1_4_and_32_clients() {
    let s = start("reuseport", &["--workers", "2"]);
    for c in [1usize, 4, 32] {
        let cfg = LoadConfig {
            targets: vec![Target::parse(s.addr()).expect("addr")],
            concurrency: c,
            requests: Some(2000),
            duration: None,
            ..LoadConfig::default()
        };
        let r = load::run(&cfg, &Arc::new(Progress::default())).expect("load");
        assert_eq!(r.ok, 2000);
        let sum = r.summary(Some(2));
        // 2000 fair coin flips: 55% is 4.5 standard deviations away.
        assert!(
            sum.max_share <= 0.55,
            "{c} clients: busiest {:.3}",
            sum.max_share
        );
    }
}

/// L8 for reuseport: a frozen worker's socket keeps the connections the
/// kernel gave it; they wait until the worker is killed and replaced, and
/// are then served: delayed, not lost.
#[test]
fn a_frozen_workers_share_is_delayed_not_lost() {
    let s = start("reuseport", &["--workers", "2", "--timeout", "2"]);
    let addr = s.addr().to_string();
    let _frozen =
        std::thread::spawn(move || http_get(&addr, "/sleep/60000", Duration::from_secs(20)));
    assert!(s.wait_worker_sleeping(T));
    let t0 = Instant::now();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let addr = s.addr().to_string();
            std::thread::spawn(move || {
                let t = Instant::now();
                let r = http_get(&addr, "/", Duration::from_secs(15));
                (r.map(|r| r.status).ok(), t.elapsed())
            })
        })
        .collect();
    let results: Vec<_> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    assert!(
        results.iter().all(|(st, _)| *st == Some(200)),
        "{results:?}"
    );
    let delayed = results
        .iter()
        .filter(|(_, d)| *d > Duration::from_millis(500))
        .count();
    assert!(
        delayed > 0,
        "some went to the frozen worker's queue and waited: {results:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(s.log().contains("killing"), "{}", s.log());
}
