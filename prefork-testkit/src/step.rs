//! The `step` scenario (`prefork-bench --step`): a pool that sizes itself
//! (`--workers MIN:MAX`) against fixed pools of MIN and of MAX, under
//! idle → a burst of slow requests needing `factor` × MIN workers → idle.
//!
//! While it runs, a sampler reads the server's status socket every 50 ms
//! (workers ready, busy, the target), and the generator records every
//! request, so the result holds both timelines: worker count and latency.

use std::collections::btree_map::Entry;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::bench::{svg_legend, COLORS};
use crate::load::{self, LoadConfig, Outcome, OutcomeRecord, Progress, Summary, Target};
use crate::server::ServerBuilder;

/// How often the sampler reads the status socket.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Width of the latency timeline's buckets.
pub const BUCKET: Duration = Duration::from_millis(250);

/// The scenario's settings.
#[derive(Debug, Clone)]
pub struct StepConfig {
    /// The prefork binary.
    pub bin: PathBuf,
    /// Smallest pool (and the fixed small pool).
    pub min: usize,
    /// Largest pool (and the fixed large pool).
    pub max: usize,
    /// Each burst request sleeps this long on the server (`/sleep/MS`).
    pub sleep: Duration,
    /// The burst keeps `factor` × MIN workers busy.
    pub factor: f64,
    /// Quiet time before the burst.
    pub idle_before: Duration,
    /// Length of the burst.
    pub burst: Duration,
    /// `--scale-window` of the self-sizing pool.
    pub window: Duration,
    /// `--scale-stall` of the self-sizing pool.
    pub stall: Duration,
    /// Fast requests per second after the burst (so that a lost connection
    /// while the pool shrinks would show).
    pub tail_rate: f64,
    /// Longest wait for the pool to shrink back to MIN.
    pub tail_max: Duration,
}

impl StepConfig {
    /// Requests per second of the burst.
    pub fn rate(&self) -> f64 {
        self.factor * self.min as f64 / self.sleep.as_secs_f64()
    }

    /// Workers the burst keeps busy.
    pub fn needed(&self) -> usize {
        (self.factor * self.min as f64).ceil() as usize
    }
}

/// Which pool a run used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pool {
    /// `--workers MIN:MAX`.
    Auto,
    /// `--workers MIN`.
    FixedMin,
    /// `--workers MAX`.
    FixedMax,
}

impl Pool {
    /// All three, in table order.
    pub const ALL: [Pool; 3] = [Pool::Auto, Pool::FixedMin, Pool::FixedMax];

    fn workers_flag(self, cfg: &StepConfig) -> String {
        match self {
            Pool::Auto => format!("{}:{}", cfg.min, cfg.max),
            Pool::FixedMin => cfg.min.to_string(),
            Pool::FixedMax => cfg.max.to_string(),
        }
    }
}

/// One status-socket reading.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PoolSample {
    /// Seconds since the server was ready.
    pub t_s: f64,
    /// Workers wanted.
    pub target: u64,
    /// Workers ready (busy or idle).
    pub ready: u64,
    /// Of those, busy.
    pub busy: u64,
}

/// Seconds from `at_s` until the pool, as sampled, met `pred`: 0 when the
/// last sample before `at_s` already did (the pool is sampled only every
/// 50 ms, and a fixed pool that was big enough before the burst did not
/// become so at the next sample).
fn since(samples: &[PoolSample], at_s: f64, pred: &dyn Fn(&PoolSample) -> bool) -> Option<f64> {
    if samples
        .iter()
        .rev()
        .find(|s| s.t_s < at_s)
        .is_some_and(pred)
    {
        return Some(0.0);
    }
    samples
        .iter()
        .find(|s| s.t_s >= at_s && pred(s))
        .map(|s| s.t_s - at_s)
}

/// Latency of the requests started in one bucket of the timeline.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencyPoint {
    /// Bucket start, seconds since the server was ready.
    pub t_s: f64,
    /// Requests started in the bucket.
    pub requests: u64,
    /// Their p99, ms.
    pub p99_ms: f64,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    /// Strategy.
    pub strategy: String,
    /// The pool.
    pub pool: Pool,
    /// `--workers` as given.
    pub workers: String,
    /// When the burst began, seconds since ready.
    pub burst_at_s: f64,
    /// When it ended.
    pub burst_end_s: f64,
    /// Seconds from the burst's start until more than MIN workers were
    /// ready (self-sizing pool only).
    pub first_grow_s: Option<f64>,
    /// Seconds from the burst's start until the workers the burst needs
    /// were ready.
    pub enough_s: Option<f64>,
    /// Most workers ready at once.
    pub peak: u64,
    /// Seconds from the burst's end until the pool was back to MIN.
    pub shrunk_s: Option<f64>,
    /// The burst's requests.
    pub burst_load: Summary,
    /// Requests that failed, burst and tail together.
    pub lost: u64,
    /// Requests issued, burst and tail together.
    pub requests: u64,
    /// Scale decisions logged by the master.
    pub scale_ups: usize,
    /// Scale decisions logged by the master.
    pub scale_downs: usize,
    /// Worker count over time.
    pub pool_timeline: Vec<PoolSample>,
    /// Latency over time.
    pub latency_timeline: Vec<LatencyPoint>,
}

use crate::server::read_status;

/// Reads the status socket every [`SAMPLE_EVERY`] until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<PoolSample>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(path: PathBuf, t0: Instant) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (st, sm) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            let mut next = Instant::now();
            while !st.load(Ordering::Relaxed) {
                if let Some(doc) = read_status(&path) {
                    let t = &doc["totals"];
                    let n = |k: &str| t[k].as_u64().unwrap_or(0);
                    let s = PoolSample {
                        t_s: t0.elapsed().as_secs_f64(),
                        target: n("target"),
                        ready: n("busy") + n("idle"),
                        busy: n("busy"),
                    };
                    if let Ok(mut v) = sm.lock() {
                        v.push(s);
                    }
                }
                next += SAMPLE_EVERY;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    fn latest(&self) -> Option<PoolSample> {
        self.samples.lock().ok().and_then(|v| v.last().copied())
    }

    fn finish(mut self) -> Vec<PoolSample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.samples.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// Runs the scenario once: `strategy` with `pool`.
pub fn run_step(
    cfg: &StepConfig,
    strategy: &str,
    pool: Pool,
    dir: &Path,
) -> std::io::Result<StepResult> {
    let sock = dir.join(format!("step-{strategy}-{}.sock", pool.workers_flag(cfg)));
    let workers = pool.workers_flag(cfg);
    let mut b = ServerBuilder::new(&cfg.bin).args([
        "--strategy",
        strategy,
        "--workers",
        &workers,
        "--app",
        "http",
        "--bind",
        "127.0.0.1:0",
        "--log-level",
        "info",
    ]);
    b = b.args([format!("--status=unix:{}", sock.display())]);
    if pool == Pool::Auto {
        b = b.args([
            format!("--scale-window={}", cfg.window.as_secs_f64()),
            format!("--scale-stall={}", cfg.stall.as_secs_f64()),
        ]);
    }
    let mut server = b.start()?;
    let t0 = Instant::now();
    let sampler = Sampler::start(sock, t0);
    let target = Target::parse(server.addr()).map_err(std::io::Error::other)?;
    let burst_cfg = LoadConfig {
        targets: vec![target.clone()],
        path: format!("/sleep/{}", cfg.sleep.as_millis()),
        rate: Some(cfg.rate()),
        // Room for every request the slowest pool holds back.
        concurrency: 1024,
        duration: Some(cfg.burst),
        timeout: Duration::from_secs(30),
        record_outcomes: true,
        ..LoadConfig::default()
    };
    std::thread::sleep(cfg.idle_before);
    let before = t0.elapsed();
    let report = load::run(&burst_cfg, &Arc::new(Progress::default()))?;
    // The burst's clock starts once the generator is set up.
    let burst_at = before + report.setup;
    let burst_end = t0.elapsed();
    let mut lost = report.errors.total();
    let mut requests = report.ok + lost;
    let mut outcomes: Vec<(Duration, OutcomeRecord)> =
        report.outcomes.iter().map(|o| (burst_at, *o)).collect();
    if pool == Pool::Auto {
        // Light fast traffic until the pool is back to MIN.
        let tail_cfg = LoadConfig {
            targets: vec![target],
            rate: Some(cfg.tail_rate),
            concurrency: 16,
            duration: Some(Duration::from_millis(500)),
            record_outcomes: true,
            ..LoadConfig::default()
        };
        let deadline = Instant::now() + cfg.tail_max;
        while Instant::now() < deadline {
            let at = t0.elapsed();
            let r = load::run(&tail_cfg, &Arc::new(Progress::default()))?;
            lost += r.errors.total();
            requests += r.ok + r.errors.total();
            outcomes.extend(r.outcomes.iter().map(|o| (at + r.setup, *o)));
            if sampler
                .latest()
                .is_some_and(|s| s.target == cfg.min as u64 && s.ready == cfg.min as u64)
            {
                break;
            }
        }
    }
    let samples = sampler.finish();
    let log = server.log();
    server.stop(Duration::from_secs(10));
    let (burst_at_s, burst_end_s) = (burst_at.as_secs_f64(), burst_end.as_secs_f64());
    let after_burst = |pred: &dyn Fn(&PoolSample) -> bool| since(&samples, burst_at_s, pred);
    let min = cfg.min as u64;
    let first_grow_s = (pool == Pool::Auto)
        .then(|| after_burst(&|s| s.ready > min))
        .flatten();
    let needed = (cfg.needed() as u64).min(cfg.max as u64);
    let enough_s = after_burst(&|s| s.ready >= needed);
    let shrunk_s = (pool == Pool::Auto)
        .then(|| {
            samples
                .iter()
                .find(|s| s.t_s >= burst_end_s && s.target == min && s.ready == min)
                .map(|s| s.t_s - burst_end_s)
        })
        .flatten();
    Ok(StepResult {
        strategy: strategy.to_string(),
        pool,
        workers,
        burst_at_s,
        burst_end_s,
        first_grow_s,
        enough_s,
        peak: samples.iter().map(|s| s.ready).max().unwrap_or(0),
        shrunk_s,
        burst_load: report.summary(None),
        lost,
        requests,
        scale_ups: log.matches("scale up: ").count(),
        scale_downs: log.matches("scale down: ").count(),
        latency_timeline: latency_timeline(&outcomes),
        pool_timeline: samples,
    })
}

/// p99 of the requests started in each [`BUCKET`]; `outcomes` pairs each
/// record with the start of the load run it belongs to.
pub fn latency_timeline(outcomes: &[(Duration, OutcomeRecord)]) -> Vec<LatencyPoint> {
    let mut buckets: std::collections::BTreeMap<u64, Histogram<u64>> = Default::default();
    let width = BUCKET.as_micros() as u64;
    for (base, o) in outcomes {
        if o.outcome != Outcome::Ok {
            continue;
        }
        let at = base.as_micros() as u64 + o.at_us;
        let h = match buckets.entry(at / width) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => match Histogram::new(3) {
                Ok(h) => v.insert(h),
                Err(_) => continue,
            },
        };
        let _ = h.record(o.latency_us.max(1));
    }
    buckets
        .into_iter()
        .map(|(k, h)| LatencyPoint {
            t_s: (k * width) as f64 / 1e6,
            requests: h.len(),
            p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        })
        .collect()
}

fn opt_s(v: Option<f64>) -> String {
    v.map_or("never".into(), |s| format!("{s:.2} s"))
}

/// The comparison table.
pub fn markdown(cfg: &StepConfig, results: &[StepResult]) -> String {
    let mut out = format!(
        "Burst: `/sleep/{}` at {:.0} req/s for {:.0} s (keeps {} workers busy), after {:.0} s idle. \
         Self-sizing pool `--workers {}:{} --scale-window {} --scale-stall {}`.\n\n",
        cfg.sleep.as_millis(),
        cfg.rate(),
        cfg.burst.as_secs_f64(),
        cfg.needed(),
        cfg.idle_before.as_secs_f64(),
        cfg.min,
        cfg.max,
        cfg.window.as_secs_f64(),
        cfg.stall.as_secs_f64()
    );
    out.push_str("| strategy | --workers | first grow | enough workers | peak | p50 burst ms | p99 burst ms | p99.9 burst ms | back to MIN | lost / requests | scale up/down lines |\n");
    out.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for r in results {
        let l = &r.burst_load.latency_us;
        let auto = r.pool == Pool::Auto;
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} / {} | {} |\n",
            r.strategy,
            r.workers,
            if auto {
                opt_s(r.first_grow_s)
            } else {
                "–".into()
            },
            opt_s(r.enough_s),
            r.peak,
            l.p50 as f64 / 1000.0,
            l.p99 as f64 / 1000.0,
            l.p999 as f64 / 1000.0,
            if auto {
                opt_s(r.shrunk_s)
            } else {
                "–".into()
            },
            r.lost,
            r.requests,
            if auto {
                format!("{} / {}", r.scale_ups, r.scale_downs)
            } else {
                "–".into()
            },
        ));
    }
    out
}

/// Worker count (top) and p99 latency per bucket (bottom, log scale) over
/// time, one line per run; self-sizing runs solid, fixed pools dashed.
pub fn svg(results: &[StepResult]) -> String {
    let (w, ph, top, left, right) = (900.0, 220.0, 40.0, 70.0, 20.0);
    // The self-sizing runs' span (fixed pools of MIN drain long after the
    // burst; their latency points are by start time, within the burst).
    let t_max = results
        .iter()
        .filter(|r| r.pool == Pool::Auto)
        .flat_map(|r| r.pool_timeline.last().map(|s| s.t_s))
        .chain(
            results
                .iter()
                .flat_map(|r| r.latency_timeline.last().map(|p| p.t_s)),
        )
        .fold(1.0, f64::max);
    let n_max = results.iter().map(|r| r.peak).max().unwrap_or(1).max(1) as f64;
    let lat_max = results
        .iter()
        .flat_map(|r| r.latency_timeline.iter().map(|p| p.p99_ms))
        .fold(1.0, f64::max);
    let x = |t: f64| left + t / t_max * (w - left - right);
    let mut strategies: Vec<&str> = Vec::new();
    for r in results {
        if !strategies.contains(&r.strategy.as_str()) {
            strategies.push(&r.strategy);
        }
    }
    let color = |s: &str| {
        let i = strategies.iter().position(|x| *x == s).unwrap_or(0);
        COLORS[i % COLORS.len()]
    };
    let dash = |p: Pool| match p {
        Pool::Auto => "",
        Pool::FixedMin => " stroke-dasharray=\"6 3\"",
        Pool::FixedMax => " stroke-dasharray=\"2 3\"",
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        2.0 * ph + 2.0 * top + 70.0
    );
    // Panel 1: workers ready.
    let y1 = |n: f64| top + ph - n / n_max * (ph - 10.0);
    out.push_str(&format!(
        "<text x=\"{left}\" y=\"{}\" font-weight=\"bold\">workers ready (self-sizing pools)</text>\n",
        top - 10.0
    ));
    for r in results.iter().filter(|r| r.pool == Pool::Auto) {
        let pts: Vec<String> = r
            .pool_timeline
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.t_s), y1(s.ready as f64)))
            .collect();
        out.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            color(&r.strategy),
            pts.join(" ")
        ));
    }
    for n in 0..=(n_max as u64) {
        if n_max as u64 > 8 && n % 2 == 1 {
            continue;
        }
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"10\">{n}</text>\n",
            left - 6.0,
            y1(n as f64) + 3.0
        ));
    }
    // Panel 2: p99 per bucket, log scale from 100 ms... to the maximum.
    let y0 = 2.0 * top + ph;
    let lo = 1.0_f64;
    let y2 =
        |ms: f64| y0 + ph - (ms.max(lo) / lo).ln() / (lat_max / lo).ln().max(1e-9) * (ph - 10.0);
    out.push_str(&format!(
        "<text x=\"{left}\" y=\"{}\" font-weight=\"bold\">p99 latency per {} ms, ms (log scale); solid: MIN:MAX, dashed: fixed MIN, dotted: fixed MAX</text>\n",
        y0 - 10.0,
        BUCKET.as_millis()
    ));
    for r in results {
        let pts: Vec<String> = r
            .latency_timeline
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.t_s), y2(p.p99_ms)))
            .collect();
        out.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.2\"{} points=\"{}\"/>\n",
            color(&r.strategy),
            dash(r.pool),
            pts.join(" ")
        ));
    }
    let mut tick = lo;
    while tick <= lat_max * 1.01 {
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"10\">{tick}</text>\n",
            left - 6.0,
            y2(tick) + 3.0
        ));
        tick *= 10.0;
    }
    // Axes, the burst, the time scale.
    for (ya, yb) in [(top, top + ph), (y0, y0 + ph)] {
        out.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{yb}\" x2=\"{}\" y2=\"{yb}\" stroke=\"#333\"/><line x1=\"{left}\" y1=\"{ya}\" x2=\"{left}\" y2=\"{yb}\" stroke=\"#333\"/>\n",
            w - right
        ));
        if let Some(r) = results.first() {
            out.push_str(&format!(
                "<rect x=\"{:.1}\" y=\"{ya}\" width=\"{:.1}\" height=\"{ph}\" fill=\"#888\" fill-opacity=\"0.12\"/>\n",
                x(r.burst_at_s),
                x(r.burst_end_s) - x(r.burst_at_s)
            ));
        }
    }
    let step = if t_max > 30.0 { 5.0 } else { 2.0 };
    let mut t = 0.0;
    while t <= t_max {
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{t:.0}s</text>\n",
            x(t),
            y0 + ph + 14.0
        ));
        t += step;
    }
    let items: Vec<(&str, &str)> = strategies.iter().map(|s| (*s, color(s))).collect();
    svg_legend(&mut out, &items, left, 2.0 * ph + 2.0 * top + 50.0);
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(at_ms: u64, lat_ms: u64, outcome: Outcome) -> OutcomeRecord {
        OutcomeRecord {
            at_us: at_ms * 1000,
            latency_us: lat_ms * 1000,
            outcome,
        }
    }

    #[test]
    fn latency_timeline_buckets_by_start_time_across_runs_and_skips_failures() {
        let base2 = Duration::from_secs(2);
        let outcomes = vec![
            (Duration::ZERO, rec(10, 100, Outcome::Ok)),
            (Duration::ZERO, rec(200, 300, Outcome::Ok)),
            (Duration::ZERO, rec(260, 999, Outcome::Reset)),
            (base2, rec(10, 5, Outcome::Ok)),
        ];
        let t = latency_timeline(&outcomes);
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!((t[0].t_s, t[0].requests), (0.0, 2));
        assert!((t[0].p99_ms - 300.0).abs() < 1.0, "{t:?}");
        assert_eq!((t[1].t_s, t[1].requests), (2.0, 1));
        assert!((t[1].p99_ms - 5.0).abs() < 0.1, "{t:?}");
    }

    #[test]
    fn time_to_a_pool_state_counts_from_the_state_before_the_burst() {
        let sample = |t_s: f64, ready: u64| PoolSample {
            t_s,
            target: ready,
            ready,
            busy: 0,
        };
        let samples = [sample(0.95, 12), sample(1.00, 12), sample(1.05, 12)];
        let enough = |s: &PoolSample| s.ready >= 8;
        // Big enough before the burst at 1.02 s: no wait at all.
        assert_eq!(since(&samples, 1.02, &enough), Some(0.0));
        let growing = [
            sample(0.95, 2),
            sample(1.00, 2),
            sample(1.05, 3),
            sample(1.30, 9),
        ];
        let t = since(&growing, 1.02, &enough).expect("reached");
        assert!((t - 0.28).abs() < 1e-9, "{t}");
        let grew = since(&growing, 1.02, &|s| s.ready > 2).expect("grew");
        assert!((grew - 0.03).abs() < 1e-9, "{grew}");
        assert_eq!(since(&growing, 1.02, &|s| s.ready > 12), None);
        assert_eq!(since(&[], 1.0, &enough), None);
    }

    #[test]
    fn the_burst_rate_keeps_factor_times_min_workers_busy() {
        let cfg = StepConfig {
            bin: PathBuf::new(),
            min: 2,
            max: 12,
            sleep: Duration::from_millis(100),
            factor: 4.0,
            idle_before: Duration::from_secs(2),
            burst: Duration::from_secs(6),
            window: Duration::from_secs(1),
            stall: Duration::from_secs(1),
            tail_rate: 20.0,
            tail_max: Duration::from_secs(30),
        };
        assert!((cfg.rate() - 80.0).abs() < 1e-9);
        assert_eq!(cfg.needed(), 8);
    }
}
