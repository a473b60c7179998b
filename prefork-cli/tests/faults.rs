//! The short fault scenarios of the fault matrix, for every strategy:
//! a prober at a fixed rate while an injector hurts the server. Each test
//! asserts its row's own pass figure (`FaultResult::verdict`, the same
//! judge `prefork-bench --faults` uses for the long runs), in 3 s instead
//! of 20 s.

mod common;

use std::time::{Duration, Instant};

use common::*;
use prefork_testkit::faults::{run_fault, Fault, FaultResult};
use rstest::rstest;
use rstest_reuse::apply;

const WORKERS: usize = 4;
const RATE: f64 = 400.0;
const SECS: Duration = Duration::from_secs(3);

/// Starts `strategy` with 4 workers and a status socket (recovery is judged
/// by the master's own view of ready workers), runs `fault` for `secs`.
fn run_for(strategy: &str, fault: Fault, secs: Duration) -> FaultResult {
    let dir = tempfile::tempdir().expect("tempdir");
    let status = dir.path().join("status.sock");
    let spec = format!("unix:{}", status.display());
    let s = start(strategy, &["--workers", "4", "--status", &spec]);
    let r = run_fault(&s, strategy, fault, WORKERS, RATE, secs, Some(&status)).expect("fault run");
    eprintln!("{r:?}");
    assert!(r.probes >= 1000, "the prober ran: {r:?}");
    if let Err(e) = r.verdict() {
        panic!("{e}: {r:?}\n{}", s.log());
    }
    r
}

fn run(strategy: &str, fault: Fault) -> FaultResult {
    run_for(strategy, fault, SECS)
}

/// L1: SIGKILL a random idle worker every 100 ms: nothing lost, N workers
/// ready (the master's view) again within 200 ms of each kill, no zombie.
#[apply(every_strategy)]
fn l1_killing_idle_workers_loses_nothing(strategy: &str) {
    // fdpass too: a connection in flight to the killed worker is handed to
    // another one, since the master keeps its copy until the worker took it.
    let r = run(strategy, Fault::KillIdle);
    // Finding an idle one takes a look at /proc (and, under fdpass, at
    // the channels' queues with ss(8)): fewer than 30 in 3 s.
    assert!(r.injections >= 5, "{r:?}");
}

/// L2: SIGKILL any worker, each kill classified (stopped first, then
/// looked at): only a busy worker's kill may cost a connection, the one it
/// held.
#[apply(every_strategy)]
fn l2_killing_any_worker_loses_at_most_the_connections_busy_ones_held(strategy: &str) {
    let r = run(strategy, Fault::KillAny);
    assert!(r.injections >= 10, "{r:?}");
}

/// L3: kill every worker at once, 10 times: N ready within 500 ms each
/// time; only connections the busy ones held are lost.
#[apply(every_strategy)]
fn l3_killing_all_workers_at_once_brings_n_ready_within_500ms(strategy: &str) {
    let r = run_for(strategy, Fault::KillAll, Duration::from_secs(4));
    assert!(r.injections >= 10, "10 kill-alls: {r:?}");
}

/// L4: HUP every second under open-loop load with a 2 s request in flight,
/// in one run: nothing lost, and the slow response completes.
#[apply(every_strategy)]
fn l4_reload_every_second_with_a_2s_request_in_flight_loses_nothing(strategy: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let status = dir.path().join("status.sock");
    let spec = format!("unix:{}", status.display());
    let s = start(strategy, &["--workers", "4", "--status", &spec]);
    let addr = s.addr().to_string();
    let slow = std::thread::spawn(move || {
        let t0 = Instant::now();
        let r = http_get(&addr, "/sleep/2000", T);
        (r, t0.elapsed())
    });
    assert!(s.wait_worker_sleeping(T), "the slow request is in a worker");
    let r =
        run_fault(&s, strategy, Fault::Hup, WORKERS, RATE, SECS, Some(&status)).expect("fault run");
    eprintln!("{r:?}");
    let (resp, took) = slow.join().expect("slow client");
    let resp = resp.expect("the 2 s request is answered across the reloads");
    assert_eq!(resp.status, 200);
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(r.injections >= 2, "reloads while it was in flight: {r:?}");
    assert!(r.probes >= 1000, "{r:?}");
    if let Err(e) = r.verdict() {
        panic!("{e}: {r:?}\n{}", s.log());
    }
}

/// L7: TTIN/TTOU every 200 ms between 1 and 4 workers: nothing lost.
#[apply(every_strategy)]
fn l7_resizing_every_200ms_loses_nothing(strategy: &str) {
    let r = run(strategy, Fault::TtinTtou);
    assert!(r.injections >= 10, "{r:?}");
}

/// The soak, short: 8 s of open-loop load with every fault mixed in (idle
/// and busy kills, kill-alls, reloads, resizing). Nothing lost beyond one
/// connection per busy worker killed; afterwards the master holds the
/// descriptors it held before, its RSS grew by at most 1 MiB, no zombie.
/// `prefork-bench --soak 600` is the long one (docs/reliability.md).
#[apply(every_strategy)]
fn a_short_soak_of_mixed_faults_loses_and_leaks_nothing(strategy: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let status = dir.path().join("status.sock");
    let spec = format!("unix:{}", status.display());
    let s = start(strategy, &["--workers", "4", "--status", &spec]);
    let r = prefork_testkit::soak::soak(
        &s,
        strategy,
        WORKERS,
        200.0,
        Duration::from_secs(8),
        &status,
    )
    .expect("soak");
    eprintln!("{r:?}");
    assert!(r.probes >= 1000, "{r:?}");
    if let Err(e) = r.verdict() {
        panic!("{e}: {r:?}\n{}", s.log());
    }
}
