//! Statistics over runs: the median of repeated runs, and ratios taken
//! only between runs of the same round.

use std::collections::BTreeMap;

use serde::Serialize;

use super::run::{RunResult, Scenario};

/// The median run of several (by requests/s; by p99 in open loop, where
/// requests/s is the offered rate), with the spread of req/s and CPU
/// across them.
#[derive(Debug, Clone, Serialize)]
pub struct Aggregate {
    /// The median run.
    pub median: RunResult,
    /// Runs.
    pub runs: usize,
    /// Lowest and highest req/s.
    pub rps_range: (f64, f64),
    /// Lowest and highest CPU µs per request.
    pub cpu_range: (f64, f64),
}

/// Picks the median run of each (scenario, server).
pub fn aggregate(results: &[RunResult]) -> Vec<Aggregate> {
    let mut groups: BTreeMap<(usize, String), Vec<RunResult>> = BTreeMap::new();
    let order = |s: &str| {
        Scenario::ALL
            .iter()
            .position(|x| x.name() == s)
            .unwrap_or(9)
    };
    let first_seen = servers_in_order(results);
    for r in results {
        groups
            .entry((order(r.scenario), r.server.clone()))
            .or_default()
            .push(r.clone());
    }
    let mut out: Vec<Aggregate> = groups
        .into_values()
        .map(|mut runs| {
            let open = Scenario::parse(runs[0].scenario).is_some_and(Scenario::open_loop);
            if open {
                runs.sort_by_key(|r| r.load.latency_us.p99);
            } else {
                runs.sort_by(|a, b| a.load.rps.total_cmp(&b.load.rps));
            }
            let rps = runs
                .iter()
                .map(|r| r.load.rps)
                .fold((f64::INFINITY, 0.0_f64), |(lo, hi), x| {
                    (lo.min(x), hi.max(x))
                });
            let cpus: Vec<f64> = runs.iter().map(|r| r.cpu_us_per_req).collect();
            let cpu = (
                cpus.iter().copied().fold(f64::INFINITY, f64::min),
                cpus.iter().copied().fold(0.0, f64::max),
            );
            Aggregate {
                median: runs[runs.len() / 2].clone(),
                runs: runs.len(),
                rps_range: rps,
                cpu_range: cpu,
            }
        })
        .collect();
    out.sort_by_key(|a| {
        (
            order(a.median.scenario),
            first_seen
                .iter()
                .position(|s| *s == a.median.server.as_str()),
        )
    });
    out
}

/// Servers in the order they first appear in `results`.
fn servers_in_order(results: &[RunResult]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for r in results {
        if !out.contains(&r.server.as_str()) {
            out.push(&r.server);
        }
    }
    out
}

/// Middle value (mean of the two middle ones for an even count).
pub(super) fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// For each server but `base`: `figure` of its run in `scenario` divided by
/// `base`'s in the same round, for every round where both ran. The machine
/// drifts between rounds, so only runs made next to each other are divided.
pub fn paired(
    results: &[RunResult],
    scenario: &str,
    base: &str,
    figure: impl Fn(&RunResult) -> f64,
) -> Vec<(String, Vec<f64>)> {
    let base_runs: Vec<&RunResult> = results
        .iter()
        .filter(|b| b.scenario == scenario && b.server == base && figure(b) > 0.0)
        .collect();
    servers_in_order(results)
        .into_iter()
        .filter(|&s| s != base)
        .map(|s| {
            let ratios = base_runs
                .iter()
                .filter_map(|b| {
                    let r = results
                        .iter()
                        .find(|r| r.scenario == scenario && r.server == s && r.round == b.round)?;
                    Some(figure(r) / figure(b))
                })
                .collect();
            (s.to_string(), ratios)
        })
        .filter(|(_, ratios): &(String, Vec<f64>)| !ratios.is_empty())
        .collect()
}

/// For each server that ran `scenario`: in how many rounds it had the
/// fewest errors and, among those, the lowest p99 (ties count for each),
/// and in how many rounds it ran.
pub fn lowest_p99(results: &[RunResult], scenario: &str) -> Vec<(String, usize, usize)> {
    let runs: Vec<&RunResult> = results.iter().filter(|r| r.scenario == scenario).collect();
    // A run ranks by its errors first, then its p99: one that failed
    // requests (or answered none) does not win on the latency of the few it
    // answered.
    let rank = |r: &RunResult| {
        let answered = r.load.requests > 0;
        (!answered, r.load.errors.total(), r.load.latency_us.p99)
    };
    let best = runs.iter().fold(BTreeMap::new(), |mut m, r| {
        let k = rank(r);
        m.entry(r.round)
            .and_modify(|b: &mut (bool, u64, u64)| *b = (*b).min(k))
            .or_insert(k);
        m
    });
    servers_in_order(results)
        .into_iter()
        .filter_map(|s| {
            let mine: Vec<&&RunResult> = runs.iter().filter(|r| r.server == s).collect();
            if mine.is_empty() {
                return None;
            }
            let wins = mine
                .iter()
                .filter(|r| best.get(&r.round) == Some(&rank(r)))
                .count();
            Some((s.to_string(), wins, mine.len()))
        })
        .collect()
}
