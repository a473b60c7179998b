//! What one load run found: outcomes, latency percentiles, fairness across
//! workers.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Answered with success.
    Ok,
    /// The connection was refused (nothing listening, or a full Unix backlog).
    Refused,
    /// Reset, or closed before a whole response.
    Reset,
    /// No whole response within the timeout.
    Timeout,
    /// A response that did not parse or was not 2xx.
    BadResponse,
    /// Any other error.
    Other,
}

/// One recorded request (fault scenarios).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OutcomeRecord {
    /// When the request was started (due, in open loop), µs since the run began.
    pub at_us: u64,
    /// Its latency in µs.
    pub latency_us: u64,
    /// How it ended.
    pub outcome: Outcome,
}

/// Errors by kind.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ErrorCounts {
    /// Connection refused.
    pub refused: u64,
    /// Connection reset or closed early.
    pub reset: u64,
    /// Timed out.
    pub timeout: u64,
    /// Bad or non-2xx response.
    pub bad_response: u64,
    /// Anything else.
    pub other: u64,
}

impl ErrorCounts {
    /// All errors.
    pub fn total(&self) -> u64 {
        self.refused + self.reset + self.timeout + self.bad_response + self.other
    }

    pub(super) fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Ok => {}
            Outcome::Refused => self.refused += 1,
            Outcome::Reset => self.reset += 1,
            Outcome::Timeout => self.timeout += 1,
            Outcome::BadResponse => self.bad_response += 1,
            Outcome::Other => self.other += 1,
        }
    }

    fn merge(&mut self, o: &ErrorCounts) {
        self.refused += o.refused;
        self.reset += o.reset;
        self.timeout += o.timeout;
        self.bad_response += o.bad_response;
        self.other += o.other;
    }
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// From the first request to the last answer.
    pub elapsed: Duration,
    /// The generator's own setup before the clock started (not counted in
    /// any latency).
    pub setup: Duration,
    /// Successful requests.
    pub ok: u64,
    /// Failed requests by kind.
    pub errors: ErrorCounts,
    /// Connections opened.
    pub connections: u64,
    /// Latency of successful requests, µs.
    pub latency: Histogram<u64>,
    /// Latency of the successful requests that were not the slow path
    /// (all of them when there is no slow path), µs: in the `mixed`
    /// scenario, what a fast request pays for landing behind a slow one.
    pub fast_latency: Histogram<u64>,
    /// Successful requests per worker slot.
    pub per_worker: BTreeMap<u32, u64>,
    /// Every request's outcome, if recorded.
    pub outcomes: Vec<OutcomeRecord>,
}

/// The figures of a report, for tables and JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Seconds.
    pub elapsed_s: f64,
    /// Successful requests.
    pub requests: u64,
    /// Successful requests per second.
    pub rps: f64,
    /// Errors by kind.
    pub errors: ErrorCounts,
    /// Connections opened.
    pub connections: u64,
    /// Latency percentiles in µs.
    pub latency_us: Percentiles,
    /// Percentiles of the requests that were not the slow path, µs.
    pub fast_latency_us: Percentiles,
    /// Requests per worker slot.
    pub per_worker: BTreeMap<u32, u64>,
    /// Jain's fairness index over the workers.
    pub fairness: f64,
    /// The busiest worker's share of requests.
    pub max_share: f64,
    /// The least busy worker's share.
    pub min_share: f64,
}

/// Latency percentiles, µs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th.
    pub p90: u64,
    /// 99th.
    pub p99: u64,
    /// 99.9th.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl LoadReport {
    pub(super) fn empty() -> LoadReport {
        LoadReport {
            elapsed: Duration::ZERO,
            setup: Duration::ZERO,
            ok: 0,
            errors: ErrorCounts::default(),
            connections: 0,
            latency: new_histogram(),
            fast_latency: new_histogram(),
            per_worker: BTreeMap::new(),
            outcomes: Vec::new(),
        }
    }

    /// Adds a generator thread's part (threads run over the same period).
    pub(super) fn merge(&mut self, part: LoadReport) {
        self.ok += part.ok;
        self.errors.merge(&part.errors);
        self.connections += part.connections;
        let _ = self.latency.add(&part.latency);
        let _ = self.fast_latency.add(&part.fast_latency);
        for (k, v) in part.per_worker {
            *self.per_worker.entry(k).or_insert(0) += v;
        }
        self.outcomes.extend(part.outcomes);
        self.elapsed = self.elapsed.max(part.elapsed);
    }

    /// Successful requests per second.
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Figures for tables and JSON. `workers`: how many workers there are
    /// (a worker that served nothing still counts against fairness).
    pub fn summary(&self, workers: Option<usize>) -> Summary {
        let pct = |h: &Histogram<u64>| Percentiles {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        };
        let (fairness, max_share, min_share) = fairness(&self.per_worker, workers);
        Summary {
            elapsed_s: self.elapsed.as_secs_f64(),
            requests: self.ok,
            rps: self.rps(),
            errors: self.errors.clone(),
            connections: self.connections,
            latency_us: pct(&self.latency),
            fast_latency_us: pct(&self.fast_latency),
            per_worker: self.per_worker.clone(),
            fairness,
            max_share,
            min_share,
        }
    }
}

/// Jain's fairness index (Σx)² / (n·Σx²), with the busiest and least busy
/// shares. `n` is `workers` when given (absent workers count as 0).
pub fn fairness(per_worker: &BTreeMap<u32, u64>, workers: Option<usize>) -> (f64, f64, f64) {
    let mut counts: Vec<f64> = per_worker.values().map(|&v| v as f64).collect();
    if let Some(n) = workers {
        while counts.len() < n {
            counts.push(0.0);
        }
    }
    let sum: f64 = counts.iter().sum();
    if counts.is_empty() || sum == 0.0 {
        return (0.0, 0.0, 0.0);
    }
    let sq: f64 = counts.iter().map(|x| x * x).sum();
    let jain = sum * sum / (counts.len() as f64 * sq);
    let max = counts.iter().copied().fold(0.0, f64::max) / sum;
    let min = counts.iter().copied().fold(f64::INFINITY, f64::min) / sum;
    (jain, max, min)
}

/// A latency histogram: 1 µs to 1 hour, 3 significant figures.
pub(super) fn new_histogram() -> Histogram<u64> {
    // 1 µs to 1 hour, 3 significant figures.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| {
        Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant figures is valid"))
    })
}
