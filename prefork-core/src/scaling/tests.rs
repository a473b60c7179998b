//! The sizing policy against a simulated pool: workers serving a FIFO queue
//! on a 1 ms clock, spawns that take time to become ready, a sample every
//! [`SAMPLE_INTERVAL`]. No process, no real clock.

use std::collections::VecDeque;

use proptest::prelude::*;

use super::*;

const MS: u64 = 1_000_000;

#[derive(Debug, Clone, Copy)]
struct SimWorker {
    ready_at: u64,
    busy_until: Option<u64>,
}

/// The pool, its queue and the policy.
struct Pool {
    scaler: Scaler,
    t: u64,
    workers: Vec<SimWorker>,
    queue: VecDeque<u64>,
    spawn_ms: u64,
    service_ms: u64,
    activity: bool,
    /// Arrivals owed (fractional).
    owed: f64,
    /// (time ms, size after) of every change.
    changes: Vec<(u64, usize)>,
    /// (time ms, decision) of every grow.
    grows: Vec<(u64, Decision)>,
    rng: u64,
}

impl Pool {
    fn new(cfg: ScaleConfig, spawn_ms: u64, service_ms: u64, seed: u64) -> Pool {
        let workers = (0..cfg.min)
            .map(|_| SimWorker {
                ready_at: 0,
                busy_until: None,
            })
            .collect();
        Pool {
            scaler: Scaler::new(cfg),
            t: 0,
            workers,
            queue: VecDeque::new(),
            spawn_ms,
            service_ms,
            activity: false,
            owed: 0.0,
            changes: Vec::new(),
            grows: Vec::new(),
            rng: seed | 1,
        }
    }

    fn idle(&self, w: &SimWorker) -> bool {
        w.ready_at <= self.t && w.busy_until.is_none()
    }

    fn random(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Runs `ms` milliseconds at `rate` arrivals per second (evenly spaced,
    /// or Poisson when `random`).
    fn run(&mut self, ms: u64, rate: f64, random: bool) {
        for _ in 0..ms {
            self.t += 1;
            let t = self.t;
            for w in &mut self.workers {
                if w.busy_until.is_some_and(|u| u <= t) {
                    w.busy_until = None;
                    self.activity = true;
                }
            }
            if random {
                // Bernoulli per ms approximates Poisson at these rates.
                let p = rate / 1000.0;
                let mut k = p.floor() as usize;
                if self.random() < p.fract() {
                    k += 1;
                }
                self.queue.extend(std::iter::repeat(t).take(k));
            } else {
                self.owed += rate / 1000.0;
                while self.owed >= 1.0 {
                    self.owed -= 1.0;
                    self.queue.push_back(t);
                }
            }
            for i in 0..self.workers.len() {
                if self.queue.is_empty() {
                    break;
                }
                if self.idle(&self.workers[i]) {
                    self.queue.pop_front();
                    self.workers[i].busy_until = Some(t + self.service_ms);
                    self.activity = true;
                }
            }
            if t % (SAMPLE_INTERVAL.as_millis() as u64) == 0 {
                self.sample();
            }
        }
    }

    fn sample(&mut self) {
        let t = self.t;
        let s = Sample {
            size: self.workers.len(),
            starting: self.workers.iter().filter(|w| w.ready_at > t).count(),
            idle: self.workers.iter().filter(|w| self.idle(w)).count(),
            backlog: !self.queue.is_empty(),
            queued: Some(self.queue.len() as u32),
            activity: std::mem::take(&mut self.activity),
            top_idle: self.workers.last().is_some_and(|w| self.idle(w)),
        };
        let cfg = *self.scaler.config();
        let d = self.scaler.decide(&s, MonoTime::from_nanos(t * MS));
        match d {
            Decision::Hold => return,
            Decision::Grow { by, .. } => {
                assert!(by >= 1, "a grow adds at least one worker");
                self.grows.push((t, d));
                for _ in 0..by {
                    self.workers.push(SimWorker {
                        ready_at: t + self.spawn_ms,
                        busy_until: None,
                    });
                }
            }
            Decision::Shrink { min_idle, .. } => {
                assert!(min_idle > cfg.spare, "shrank with min idle {min_idle}");
                let top = self.workers.pop().expect("shrink of an empty pool");
                assert!(
                    top.ready_at <= t && top.busy_until.is_none(),
                    "retired a busy worker at {t} ms"
                );
            }
        }
        let n = self.workers.len();
        assert!(
            n >= cfg.min && n <= cfg.max,
            "size {n} outside {}..={} at {t} ms",
            cfg.min,
            cfg.max
        );
        self.changes.push((t, n));
    }

    fn size(&self) -> usize {
        self.workers.len()
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn config() -> impl Strategy<Value = (ScaleConfig, u64, u64)> {
    (
        1usize..=4,
        0usize..=12,
        1usize..=2,
        300u64..=1500,
        200u64..=1000,
        10u64..=200,
        20u64..=200,
    )
        .prop_map(|(min, extra, spare, window, stall, spawn, service)| {
            (
                ScaleConfig {
                    min,
                    max: min + extra,
                    spare,
                    window: Duration::from_millis(window),
                    stall: Duration::from_millis(stall),
                },
                spawn,
                service,
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random load with bursts: the size stays in MIN..=MAX and a busy
    /// worker is never retired (both asserted at every decision), spare 0
    /// included.
    #[test]
    fn bounds_hold_and_busy_workers_stay_under_random_load(
        (mut cfg, spawn, service) in config(),
        spare in 0usize..=2,
        phases in proptest::collection::vec((0.0f64..400.0, 200u64..3000), 1..8),
        seed in any::<u64>(),
    ) {
        cfg.spare = spare;
        let mut pool = Pool::new(cfg, spawn, service, seed);
        for (rate, len) in phases {
            pool.run(len, rate, true);
        }
        prop_assert!(pool.size() >= cfg.min && pool.size() <= cfg.max);
    }

    /// Constant load: the pool reaches a size that carries it and then does
    /// not change at all.
    #[test]
    fn constant_load_settles_without_oscillating(
        (cfg, spawn, service) in config(),
        load in 0.0f64..1.0,
    ) {
        // Offered load between 0 and what MAX - spare - 1 workers carry.
        let usable = cfg.max.saturating_sub(cfg.spare + 1).max(1) as f64;
        let rate = load * usable * 1000.0 / service as f64;
        // Workers the load keeps busy. A load just above a whole number of
        // workers overloads that number so slightly that its queue takes
        // longer than any fixed settling time to show: leave those out.
        let busy = rate * service as f64 / 1000.0;
        prop_assume!((busy - busy.round()).abs() > 0.05 || busy < 0.5);
        let needed = busy.ceil() as usize;
        let mut pool = Pool::new(cfg, spawn, service, 1);
        let settle = ms(cfg.window) * (cfg.max as u64 + 4) + 5_000;
        pool.run(settle, rate, false);
        let before = pool.changes.len();
        pool.run(ms(cfg.window) * 20, rate, false);
        let size = pool.size();
        // What sampling can miss (a dip in the idle count between two
        // samples) may still retire one worker late; nothing more, and
        // never back and forth.
        let late = &pool.changes[before..];
        let last_before = pool.changes[..before].last().map_or(cfg.min, |c| c.1);
        prop_assert!(late.len() <= 1 && late.iter().all(|c| c.1 < last_before),
            "still changing after {} ms: {:?}", settle, &pool.changes[before.saturating_sub(3)..]);
        prop_assert!(size >= needed.min(cfg.max).max(cfg.min),
            "settled at {} workers for a load needing {}", size, needed);
        prop_assert!(size <= (needed + cfg.spare + 1).max(cfg.min),
            "settled at {} workers, more than {} needed plus spare {}", size, needed, cfg.spare);
    }

    /// idle → a load needing 4× MIN → idle: the first grow comes within
    /// GROW_AFTER and one sample of the first connection that has to wait,
    /// the pool reaches the size the load needs within a few ramp steps,
    /// and shrinks back to MIN after the load.
    #[test]
    fn step_load_grows_fast_and_shrinks_back(
        (mut cfg, spawn, service) in config(),
    ) {
        let needed = 4 * cfg.min;
        cfg.max = cfg.max.max(needed + cfg.spare + 1);
        // A load that keeps `needed` workers busy, not more.
        let rate = needed as f64 * 1000.0 / service as f64;
        let mut pool = Pool::new(cfg, spawn, service, 1);
        pool.run(2 * ms(cfg.window), 0.0, false);
        prop_assert!(pool.changes.is_empty(), "changed while idle at MIN: {:?}", pool.changes);
        let step = pool.t;
        let burst = ms(cfg.window) * 8;
        pool.run(burst, rate, false);
        // Arrivals are evenly spaced: the MIN workers take the first MIN,
        // and arrival MIN + 1 is the first to wait (the load is 4× what
        // they carry, so from then on the queue never empties and no
        // worker is idle). The next sample sees it, and GROW_AFTER later
        // the pool grows. (The bound used to be the stall time plus a
        // spawn from the step, which a slow arrival rate exceeds: MIN 1,
        // service 152 ms, 38 ms between arrivals, grew at step + 226.)
        let interval = 1000.0 / rate;
        let first_wait = step + ((cfg.min + 1) as f64 * interval).ceil() as u64 + 1;
        let bound = first_wait + ms(SAMPLE_INTERVAL) + ms(GROW_AFTER);
        let first = pool.grows.first().map(|g| g.0);
        prop_assert!(first.is_some_and(|t| t <= bound),
            "first grow at {:?}, step at {}, first wait at {}, bound {}", first, step, first_wait, bound);
        let reached = pool.changes.iter().find(|c| c.1 >= needed).map(|c| c.0);
        // Doubling steps from 1: at most log2(needed) + 2 of them, each a
        // spawn, GROW_AFTER and a sample or two.
        let steps = (usize::BITS - needed.leading_zeros()) as u64 + 2;
        let per_step = spawn + ms(GROW_AFTER) + 2 * ms(SAMPLE_INTERVAL) + service;
        prop_assert!(reached.is_some_and(|t| t <= step + steps * per_step),
            "reached {} workers at {:?}, step at {}, bound {} ms", needed, reached, step, steps * per_step);
        prop_assert_eq!(pool.scaler.penalty(), 0, "a clean step is not a flap");
        let end = pool.t;
        let peak = pool.size();
        // One shrink per window, each measured afresh from the sample after
        // the previous one.
        pool.run((ms(cfg.window) + 2 * ms(SAMPLE_INTERVAL)) * (peak as u64 + 2), 0.0, false);
        // Idle, the pool keeps `spare` workers (it shrinks only while more
        // than that are idle), and never goes below MIN.
        prop_assert_eq!(pool.size(), cfg.min.max(cfg.spare), "did not shrink back: {:?}",
            pool.changes.iter().filter(|c| c.0 > end).collect::<Vec<_>>());
        let shrinks: Vec<u64> = pool.changes.iter().filter(|c| c.0 > end).map(|c| c.0).collect();
        for pair in shrinks.windows(2) {
            prop_assert!(pair[1] - pair[0] >= ms(cfg.window), "two shrinks within a window: {:?}", pair);
        }
    }
}

#[test]
fn a_worker_retired_then_needed_again_slows_the_next_retirement() {
    let cfg = ScaleConfig {
        min: 1,
        max: 4,
        spare: 0,
        window: Duration::from_secs(1),
        stall: Duration::from_secs(1),
    };
    let mut s = Scaler::new(cfg);
    let at = |ms: u64| MonoTime::from_nanos(ms * MS);
    let idle2 = Sample {
        size: 2,
        idle: 2,
        top_idle: true,
        ..Sample::default()
    };
    // Surplus for a window: shrink.
    assert_eq!(s.decide(&idle2, at(1_000)), Decision::Hold);
    assert!(matches!(
        s.decide(&idle2, at(2_000)),
        Decision::Shrink { .. }
    ));
    // Needed again soon after: grow, and the hold doubles.
    let saturated = Sample {
        size: 1,
        idle: 0,
        backlog: true,
        activity: true,
        ..Sample::default()
    };
    assert_eq!(s.decide(&saturated, at(2_100)), Decision::Hold);
    assert!(matches!(
        s.decide(&saturated, at(2_200)),
        Decision::Grow {
            by: 1,
            reason: GrowReason::Saturated(_)
        }
    ));
    assert_eq!(s.penalty(), 1);
    assert_eq!(s.hold(), Duration::from_secs(2));
    // A surplus of one window is no longer enough; two are.
    assert_eq!(s.decide(&idle2, at(3_000)), Decision::Hold);
    assert_eq!(s.decide(&idle2, at(4_000)), Decision::Hold);
    assert!(matches!(
        s.decide(&idle2, at(5_000)),
        Decision::Shrink { held, .. } if held == Duration::from_secs(2)
    ));
    // Twice the hold without a flap: the penalty steps back down.
    assert_eq!(
        s.decide(
            &Sample {
                size: 1,
                ..Sample::default()
            },
            at(7_300)
        ),
        Decision::Hold
    );
    assert_eq!(s.penalty(), 0);
}

#[test]
fn stuck_workers_with_a_backlog_grow_the_pool_after_the_stall_time() {
    // Idle workers that do not accept (or no report at all): only the
    // stall rule sees it.
    let cfg = ScaleConfig {
        min: 2,
        max: 3,
        spare: 5,
        window: Duration::from_secs(10),
        stall: Duration::from_millis(500),
    };
    let mut s = Scaler::new(cfg);
    let stuck = Sample {
        size: 2,
        idle: 1,
        backlog: true,
        activity: false,
        ..Sample::default()
    };
    let at = |ms: u64| MonoTime::from_nanos(ms * MS);
    assert_eq!(s.decide(&stuck, at(0)), Decision::Hold);
    assert_eq!(s.decide(&stuck, at(450)), Decision::Hold);
    // Activity restarts the clock.
    let moving = Sample {
        activity: true,
        ..stuck
    };
    assert_eq!(s.decide(&moving, at(480)), Decision::Hold);
    assert_eq!(s.decide(&stuck, at(500)), Decision::Hold);
    assert_eq!(s.decide(&stuck, at(900)), Decision::Hold);
    assert!(matches!(
        s.decide(&stuck, at(1_000)),
        Decision::Grow { by: 1, reason: GrowReason::Stalled(d) } if d == Duration::from_millis(500)
    ));
    // At MAX: nothing more.
    let full = Sample { size: 3, ..stuck };
    for t in (1_100..5_000).step_by(50) {
        assert_eq!(s.decide(&full, at(t)), Decision::Hold);
    }
}

#[test]
fn the_pool_never_shrinks_while_workers_are_starting_or_the_top_one_is_busy() {
    let cfg = ScaleConfig {
        min: 1,
        max: 8,
        spare: 1,
        window: Duration::from_secs(1),
        stall: Duration::from_secs(1),
    };
    let mut s = Scaler::new(cfg);
    let at = |ms: u64| MonoTime::from_nanos(ms * MS);
    let busy_top = Sample {
        size: 4,
        idle: 3,
        top_idle: false,
        ..Sample::default()
    };
    for t in (0..5_000).step_by(50) {
        assert_eq!(s.decide(&busy_top, at(t)), Decision::Hold);
    }
    let starting = Sample {
        starting: 1,
        top_idle: true,
        ..busy_top
    };
    for t in (5_000..10_000).step_by(50) {
        assert_eq!(s.decide(&starting, at(t)), Decision::Hold);
    }
    let ok = Sample {
        top_idle: true,
        ..busy_top
    };
    assert!(matches!(
        s.decide(&ok, at(10_050)),
        Decision::Shrink { min_idle: 3, .. }
    ));
}

#[test]
fn no_shrink_while_connections_wait_even_with_idle_workers() {
    // reuseport: connections queue in a busy worker's own socket while
    // others are idle. The pool is not too big.
    let cfg = ScaleConfig {
        min: 1,
        max: 8,
        spare: 1,
        window: Duration::from_secs(1),
        stall: Duration::from_secs(60),
    };
    let mut s = Scaler::new(cfg);
    let at = |ms: u64| MonoTime::from_nanos(ms * MS);
    let waiting = Sample {
        size: 4,
        idle: 3,
        backlog: true,
        activity: true,
        top_idle: true,
        ..Sample::default()
    };
    for t in (0..5_000).step_by(50) {
        assert_eq!(s.decide(&waiting, at(t)), Decision::Hold);
    }
    // One sample with a connection waiting restarts the window.
    let quiet = Sample {
        backlog: false,
        ..waiting
    };
    assert_eq!(s.decide(&quiet, at(5_000)), Decision::Hold);
    assert_eq!(s.decide(&waiting, at(5_500)), Decision::Hold);
    assert_eq!(s.decide(&quiet, at(6_000)), Decision::Hold);
    assert_eq!(s.decide(&quiet, at(6_900)), Decision::Hold);
    assert!(matches!(
        s.decide(&quiet, at(7_000)),
        Decision::Shrink { .. }
    ));
}
