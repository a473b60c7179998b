//! A pool that sizes itself (`--workers MIN:MAX`), on the real binary, for
//! every strategy: it grows when connections wait with every worker busy,
//! shrinks back to MIN once the load stops, logs each decision on one line,
//! and loses no connection on the way.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rstest::rstest;
use rstest_reuse::apply;

#[apply(every_strategy)]
fn the_pool_grows_under_a_burst_and_shrinks_back_to_min_losing_nothing(strategy: &str) {
    let mut s = start(
        strategy,
        &[
            "--workers",
            "1:4",
            "--scale-window",
            "0.5",
            "--scale-stall",
            "0.5",
        ],
    );
    assert!(
        s.ready_line().contains("workers=1 workers_max=4"),
        "{}",
        s.ready_line()
    );
    assert_eq!(s.workers().len(), 1, "starts at MIN");
    // 8 clients keep 8 slow requests in flight: one worker cannot keep up.
    let t0 = Instant::now();
    let slow_clients = {
        let addr = s.addr().to_string();
        std::thread::spawn(move || burst_path(&addr, "/sleep/150", 8, 8).1)
    };
    assert!(
        s.wait_log("scale up: 1 -> 2 workers (", T),
        "no grow: {}",
        s.log()
    );
    let first_grow = t0.elapsed();
    assert!(s.wait_workers(4, T), "never reached MAX: {}", s.log());
    let failed = slow_clients.join().expect("load");
    assert_eq!(failed, 0, "requests lost during the burst: {}", s.log());
    // The burst is over: one worker per window leaves, down to MIN, while
    // a light stream of requests checks that retiring loses nothing (for
    // reuseport: a retired slot's socket is steered away from and drained).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let (addr, stop) = (s.addr().to_string(), stop.clone());
        std::thread::spawn(move || {
            let (mut sent, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 2000 {
                sent += 1;
                if !matches!(http_get(&addr, "/", T), Ok(r) if r.status == 200) {
                    failed += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (sent, failed)
        })
    };
    let shrunk = s.wait_log("scale down: 2 -> 1 workers", Duration::from_secs(20));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, failed) = trickle.join().expect("trickle");
    assert!(shrunk, "did not shrink back: {}", s.log());
    assert!(sent > 0);
    assert_eq!(
        failed,
        0,
        "{failed} of {sent} lost while shrinking: {}",
        s.log()
    );
    assert!(s.wait_workers(1, T), "{}", s.log());
    let log = s.log();
    let ups = log.lines().filter(|l| l.contains("scale up: ")).count();
    let downs: Vec<&str> = log.lines().filter(|l| l.contains("scale down: ")).collect();
    // Every worker added is retired again, one log line each. A worker may
    // be retired during the burst and needed again (reuseport can see idle
    // workers while connections wait in a busy worker's own queue).
    let grown: usize = log
        .lines()
        .filter_map(|l| l.split("scale up: ").nth(1))
        .map(|rest| {
            let nums: Vec<usize> = rest
                .split(|c: char| !c.is_ascii_digit())
                .filter(|w| !w.is_empty())
                .take(2)
                .map(|w| w.parse().expect("a count"))
                .collect();
            nums[1] - nums[0]
        })
        .sum();
    assert!(ups >= 1 && grown >= 3, "{ups} grows adding {grown}: {log}");
    assert_eq!(downs.len(), grown, "one retirement per worker added: {log}");

    for line in &downs {
        // The hold is the window, or a multiple of it after a flap.
        assert!(
            line.contains(" idle for ") && line.contains("s); retiring worker="),
            "{line}"
        );
    }
    assert!(!log.contains("died"), "{log}");
    assert!(!log.contains("did not stop in time"), "{log}");
    // The pool that is left serves.
    let (served, failed) = burst(s.addr(), 4, 5);
    assert_eq!((served.len(), failed), (20, 0), "{}", s.log());
    eprintln!("{strategy}: first grow {first_grow:?} after the burst began");
    assert_eq!(s.stop(T).and_then(|st| st.code()), Some(0));
}

/// One worker asleep on a request and a connection waiting: the pool grows,
/// and with a shared queue the new worker serves the waiting connection long
/// before the sleeper is done. With reuseport the connection sits in the
/// sleeper's own socket queue, where no other worker can take it: it is
/// served, but only when the sleeper is done (docs/strategies.md).
#[apply(every_strategy)]
fn a_busy_pool_with_a_waiting_connection_grows(strategy: &str) {
    let mut s = start(
        strategy,
        &[
            "--workers",
            "1:2",
            "--scale-window",
            "30",
            "--scale-stall",
            "0.3",
        ],
    );
    let addr = s.addr().to_string();
    let slow = {
        let addr = addr.clone();
        std::thread::spawn(move || http_get(&addr, "/sleep/3000", T))
    };
    assert!(s.wait_worker_sleeping(T));
    let t0 = Instant::now();
    let waiting = http_get(&addr, "/", T).expect("served");
    assert_eq!(waiting.status, 200);
    if strategy != "reuseport" {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "waited {:?} behind the sleeper: {}",
            t0.elapsed(),
            s.log()
        );
    }
    // (The log is read by another thread: wait for the line.)
    assert!(s.wait_log("scale up: 1 -> 2 workers", T), "{}", s.log());
    assert_eq!(slow.join().expect("slow").expect("slow served").status, 200);
    assert_eq!(s.stop(T).and_then(|st| st.code()), Some(0));
}

/// The testkit's `step` scenario, short, on the real binary: the self-sizing
/// pool reaches the workers the burst needs, returns to MIN, loses nothing,
/// and its burst p99 beats a fixed pool of MIN measured the same way.
#[test]
fn step_scenario_self_sizing_pool_beats_a_fixed_min_pool_and_returns_to_min() {
    use prefork_testkit::step::{run_step, Pool, StepConfig};
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = StepConfig {
        bin: env!("CARGO_BIN_EXE_prefork").into(),
        min: 1,
        max: 4,
        sleep: Duration::from_millis(100),
        factor: 3.0,
        idle_before: Duration::from_millis(500),
        burst: Duration::from_secs(2),
        window: Duration::from_millis(500),
        stall: Duration::from_secs(1),
        tail_rate: 20.0,
        tail_max: Duration::from_secs(20),
    };
    let auto = run_step(&cfg, "blocking", Pool::Auto, dir.path()).expect("self-sizing run");
    let fixed = run_step(&cfg, "blocking", Pool::FixedMin, dir.path()).expect("fixed run");
    assert!(
        auto.enough_s.is_some(),
        "never had 3 workers: {:?}",
        auto.pool_timeline
    );
    assert!(
        auto.shrunk_s.is_some(),
        "never back to 1: {:?}",
        auto.pool_timeline
    );
    assert_eq!((auto.lost, fixed.lost), (0, 0));
    assert!(
        auto.scale_ups >= 1 && auto.scale_downs >= 2,
        "{} up, {} down",
        auto.scale_ups,
        auto.scale_downs
    );
    assert_eq!(fixed.peak, 1);
    let (a, f) = (
        auto.burst_load.latency_us.p99,
        fixed.burst_load.latency_us.p99,
    );
    assert!(a < f, "p99 self-sizing {a} µs vs fixed MIN {f} µs");
    assert!(!auto.latency_timeline.is_empty());
}

/// The status socket shows the range; the table says so in one line.
#[test]
fn status_shows_the_range_of_a_self_sizing_pool() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = format!("unix:{}", dir.path().join("status.sock").display());
    let mut s = start(
        "blocking",
        &["--workers", "2:5", "--spare", "0", "--status", &sock],
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefork"))
        .args(["status", &sock, "--json"])
        .output()
        .expect("prefork status");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(doc["scale"]["min"], 2, "{doc}");
    assert_eq!(doc["scale"]["max"], 5, "{doc}");
    assert_eq!(doc["scale"]["spare"], 0, "{doc}");
    assert_eq!(doc["scale"]["window_s"], 10.0, "{doc}");
    assert_eq!(doc["totals"]["target"], 2, "{doc}");
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_prefork"))
        .args(["status", &sock])
        .output()
        .expect("prefork status");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("pool sizes itself: 2 to 5 workers, 0 spare, window 10.0s, stall 1.0s"),
        "{text}"
    );
    assert_eq!(s.stop(T).and_then(|st| st.code()), Some(0));
}
