//! The short fault scenarios of the fault matrix, for every strategy:
//! a prober at a fixed rate while an injector hurts the server.

mod common;

use std::time::Duration;

use common::*;
use prefork_testkit::faults::{run_fault, Fault, FaultResult};
use rstest::rstest;
use rstest_reuse::apply;

const WORKERS: usize = 4;
const RATE: f64 = 400.0;
const SECS: Duration = Duration::from_secs(3);

fn run(strategy: &str, fault: Fault) -> FaultResult {
    let s = start(strategy, &["--workers", "4"]);
    let r = run_fault(&s, strategy, fault, WORKERS, RATE, SECS).expect("fault run");
    eprintln!("{r:?}");
    assert!(r.probes >= 1000, "the prober ran: {r:?}");
    assert!(r.injections > 0, "the injector ran: {r:?}");
    assert_eq!(r.zombies, 0, "no zombies: {r:?}");
    r
}

/// L1: SIGKILL a random idle worker every 100 ms: nothing lost, the pool
/// is whole again quickly.
#[apply(every_strategy)]
fn l1_killing_idle_workers_loses_nothing(strategy: &str) {
    let r = run(strategy, Fault::KillIdle);
    // fdpass too: a connection in flight to the killed worker is handed to
    // another one, since the master keeps its copy until the worker took it.
    assert_eq!(r.lost, 0, "{r:?}");
    assert!(r.max_recovery_ms.is_some_and(|ms| ms < 1000.0), "{r:?}");
}

/// L2: SIGKILL any worker: at most the connection each killed worker held.
#[apply(every_strategy)]
fn l2_killing_any_worker_loses_at_most_one_connection_per_kill(strategy: &str) {
    let r = run(strategy, Fault::KillAny);
    assert!(r.lost <= r.injections, "{r:?}");
}

/// L3: kill every worker at once: all reaped and back.
#[apply(every_strategy)]
fn l3_killing_all_workers_at_once_brings_all_back(strategy: &str) {
    let r = run(strategy, Fault::KillAll);
    assert!(r.max_recovery_ms.is_some_and(|ms| ms < 1000.0), "{r:?}");
    assert!(r.lost <= WORKERS as u64 * r.injections, "{r:?}");
}

/// L4: HUP every second under load: nothing lost.
#[apply(every_strategy)]
fn l4_reload_every_second_loses_nothing(strategy: &str) {
    let r = run(strategy, Fault::Hup);
    assert_eq!(r.lost, 0, "{r:?}");
}

/// L7: TTIN/TTOU every 200 ms between 1 and 4 workers: nothing lost.
#[apply(every_strategy)]
fn l7_resizing_every_200ms_loses_nothing(strategy: &str) {
    let r = run(strategy, Fault::TtinTtou);
    assert_eq!(r.lost, 0, "{r:?}");
}
