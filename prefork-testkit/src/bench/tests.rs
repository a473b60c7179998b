use super::run::{status_field, voluntary_switches};
use super::stats::median;
use super::*;
use crate::load::{ErrorCounts, Percentiles, Summary};

fn result(scenario: &'static str, server: &str, rps: f64) -> RunResult {
    RunResult {
        scenario,
        server: server.into(),
        load: Summary {
            elapsed_s: 1.0,
            requests: rps as u64,
            rps,
            errors: ErrorCounts::default(),
            connections: rps as u64,
            latency_us: Percentiles {
                p50: 100,
                p90: 200,
                p99: 300,
                p999: 400,
                max: 500,
            },
            fast_latency_us: Percentiles {
                p50: 100,
                p90: 200,
                p99: 300,
                p999: 400,
                max: 500,
            },
            per_worker: [(0, 5), (1, 5)].into(),
            fairness: 1.0,
            max_share: 0.5,
            min_share: 0.5,
        },
        round: 0,
        cpu_us_per_req: 20.0,
        master_cpu_us_per_req: 1.0,
        wakeups_per_conn: 1.0,
        pss_kib: 2048,
        master_kib_per_conn: None,
    }
}

#[test]
fn aggregate_takes_the_median_run_and_keeps_order() {
    let rs = vec![
        result("hello", "blocking", 100.0),
        result("hello", "nginx", 300.0),
        result("hello", "blocking", 120.0),
        result("hello", "blocking", 110.0),
        result("mixed", "blocking", 50.0),
    ];
    let a = aggregate(&rs);
    assert_eq!(a.len(), 3);
    assert_eq!(
        (a[0].median.server.as_str(), a[0].median.load.rps),
        ("blocking", 110.0)
    );
    assert_eq!(a[0].rps_range, (100.0, 120.0));
    assert_eq!(a[1].median.server, "nginx");
    assert_eq!(a[2].median.scenario, "mixed");
    let md = markdown(&a);
    assert!(
        md.contains("| hello | blocking | 110 (100–120) | 100 | 300 | 400 | 300 |"),
        "{md}"
    );
    let chart = svg(&a);
    // Background, one bar per result in each of 2 panels, one legend box per server.
    assert!(chart.starts_with("<svg"));
    assert_eq!(chart.matches("<rect").count(), 1 + 3 * 2 + 2);
}

/// Ratios divide runs of the same round only; a round where either
/// server is missing gives no ratio, and the baseline is not listed.
#[test]
fn side_by_side_pairs_runs_of_the_same_round() {
    let run = |scenario, server: &str, round, rps, cpu| {
        let mut r = result(scenario, server, rps);
        r.round = round;
        r.cpu_us_per_req = cpu;
        r
    };
    let rs = vec![
        run("hello", "blocking", 0, 100.0, 25.0),
        run("hello", "fdpass", 0, 90.0, 50.0),
        run("hello", "c-blocking", 0, 100.0, 20.0),
        run("hello", "blocking", 1, 200.0, 30.0),
        run("hello", "fdpass", 1, 160.0, 66.0),
        run("hello", "c-blocking", 1, 200.0, 30.0),
        // Round 2: fdpass only; nothing to pair it with.
        run("hello", "fdpass", 2, 1.0, 1.0),
    ];
    let by_rps = paired(&rs, "hello", "blocking", |r| r.load.rps);
    assert_eq!(
        by_rps,
        vec![
            ("fdpass".to_string(), vec![0.9, 0.8]),
            ("c-blocking".to_string(), vec![1.0, 1.0])
        ]
    );
    let by_cpu = paired(&rs, "hello", "c-blocking", |r| r.cpu_us_per_req);
    assert_eq!(by_cpu[0], ("blocking".to_string(), vec![1.25, 1.0]));
    assert_eq!(by_cpu[1].0, "fdpass");
    assert!((by_cpu[1].1[0] - 2.5).abs() < 1e-9 && (by_cpu[1].1[1] - 2.2).abs() < 1e-9);
    assert_eq!(median(&[2.5, 2.2]), Some(2.35));
    assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(median(&[]), None);
    let text = side_by_side(&rs);
    assert!(
        text.contains("- hello, req/s ÷ blocking's: fdpass **0.85** (0.90, 0.80); c-blocking **1.00** (1.00, 1.00)"),
        "{text}"
    );
    assert!(
        text.contains("- hello, CPU µs/req ÷ c-blocking's: blocking **1.12** (1.25, 1.00); fdpass **2.35** (2.50, 2.20)"),
        "{text}"
    );
    // Nothing to pair: no section at all.
    assert_eq!(side_by_side(&rs[1..2]), "");
}

/// Each open-loop round names the server with the lowest p99; a tie
/// counts for both.
#[test]
fn lowest_p99_counts_rounds_won() {
    let run = |server: &str, round, p99| {
        let mut r = result("mixed", server, 2000.0);
        r.round = round;
        r.load.latency_us.p99 = p99;
        r
    };
    let rs = vec![
        run("blocking", 0, 1500),
        run("fdpass", 0, 4000),
        run("blocking", 1, 2000),
        run("fdpass", 1, 1800),
        run("blocking", 2, 900),
        run("fdpass", 2, 900),
    ];
    assert_eq!(
        lowest_p99(&rs, "mixed"),
        vec![("blocking".to_string(), 2, 3), ("fdpass".to_string(), 2, 3)]
    );
    assert!(side_by_side(&rs).contains(
        "- mixed, rounds with the lowest p99 (among the runs with the fewest errors): blocking 2 of 3, fdpass 2 of 3"
    ));
    assert!(lowest_p99(&rs, "hello").is_empty());
    // One server alone is lowest every time, which says nothing.
    let alone: Vec<RunResult> = rs.into_iter().filter(|r| r.server == "fdpass").collect();
    assert_eq!(
        lowest_p99(&alone, "mixed"),
        vec![("fdpass".to_string(), 3, 3)]
    );
    assert_eq!(side_by_side(&alone), "");
}

/// In open loop every run carries the offered rate: the median run is
/// the one with the median p99, and the ranges still span every run.
#[test]
fn open_loop_scenarios_take_the_median_by_p99() {
    let with_p99 = |rps: f64, p99: u64| {
        let mut r = result("mixed", "fdpass", rps);
        r.load.latency_us.p99 = p99;
        r
    };
    let rs = vec![
        with_p99(2000.0, 900),
        with_p99(1999.0, 700),
        with_p99(2001.0, 800),
    ];
    let a = aggregate(&rs);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].median.load.latency_us.p99, 800);
    assert_eq!(a[0].rps_range, (1999.0, 2001.0));
    assert!(Scenario::Mixed.open_loop() && Scenario::MultiListener.open_loop());
    assert!(!Scenario::Hello.open_loop() && !Scenario::MixedClosed.open_loop());
    assert_eq!(Scenario::parse("mixed-closed"), Some(Scenario::MixedClosed));
}

#[test]
fn reads_pss_and_switches_of_this_process() {
    let me = std::process::id() as i32;
    assert!(pss_kib(me) > 0);
    assert!(voluntary_switches(me) > 0 || status_field(me, "Threads:") > 0);
}

/// A run that failed requests does not win on the latency of the few it
/// answered, and one that answered none does not win with a p99 of 0: the
/// slowloris scenario starves a worker-per-connection server that way.
#[test]
fn lowest_p99_ranks_errors_before_latency() {
    let run = |server: &str, p99, errors, requests| {
        let mut r = result("slowloris", server, 1000.0);
        r.load.latency_us.p99 = p99;
        r.load.errors.timeout = errors;
        r.load.requests = requests;
        r
    };
    let rs = vec![
        run("blocking", 0, 512, 0),
        run("mutex", 900, 3, 400),
        run("fdpass", 2300, 0, 2000),
    ];
    assert_eq!(
        lowest_p99(&rs, "slowloris"),
        vec![
            ("blocking".to_string(), 0, 1),
            ("mutex".to_string(), 0, 1),
            ("fdpass".to_string(), 1, 1)
        ]
    );
}
