//! The comparison harness (`prefork_testkit::bench`, what `prefork-bench`
//! runs) against the real binary: the master's own CPU is measured apart
//! from its workers', and rounds are compared run against run.

use std::path::PathBuf;
use std::time::Duration;

use prefork_testkit::bench::{run_one, side_by_side, BenchLoad, RunResult, Scenario, ServerSpec};

fn spec(strategy: &str) -> ServerSpec {
    ServerSpec::Prefork {
        label: strategy.into(),
        bin: PathBuf::from(env!("CARGO_BIN_EXE_prefork")),
        strategy: strategy.into(),
        extra: Vec::new(),
    }
}

/// Two rounds of `hello` for blocking and fdpass, interleaved as
/// prefork-bench runs them. fdpass's master accepts and hands over every
/// connection, so its own CPU shows; blocking's master takes none. The
/// side-by-side section divides each fdpass run by the blocking run of its
/// own round.
#[test]
fn the_bench_measures_the_master_apart_and_pairs_runs_by_round() {
    let dir = tempfile::tempdir().expect("tempdir");
    let load = BenchLoad {
        workers: 1,
        connections: 2,
        threads: 1,
        duration: Duration::from_millis(700),
        herd_rate: 200.0,
        mixed_rate: 200.0,
        front_rate: 200.0,
        slow_clients: 4,
        idle_connections: 8,
        think: Duration::from_millis(200),
    };
    let mut results: Vec<RunResult> = Vec::new();
    for round in 0..2 {
        for strategy in ["blocking", "fdpass"] {
            let r = run_one(&spec(strategy), Scenario::Hello, round, &load, dir.path())
                .unwrap_or_else(|e| panic!("{strategy}, round {round}: {e}"));
            assert_eq!(r.round, round);
            assert!(r.load.requests > 100, "{strategy}: {:?}", r.load);
            assert_eq!(r.load.errors.total(), 0, "{strategy}: {:?}", r.load.errors);
            assert!(r.master_cpu_us_per_req <= r.cpu_us_per_req, "{r:?}");
            results.push(r);
        }
    }
    let master = |s: &str| -> f64 {
        results
            .iter()
            .filter(|r| r.server == s)
            .map(|r| r.master_cpu_us_per_req)
            .sum()
    };
    assert!(
        master("fdpass") > 0.0 && master("fdpass") > master("blocking"),
        "fdpass master {} µs/req, blocking master {} µs/req",
        master("fdpass"),
        master("blocking")
    );
    let text = side_by_side(&results);
    let line = text
        .lines()
        .find(|l| l.starts_with("- hello, req/s ÷ blocking's: fdpass **"))
        .unwrap_or_else(|| panic!("no pairing in:\n{text}"));
    // A median and one ratio per round.
    let per_round = line.split('(').nth(1).unwrap_or_default();
    assert_eq!(per_round.split(", ").count(), 2, "{line}");
}
