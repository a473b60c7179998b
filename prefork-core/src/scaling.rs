//! Pool sizing (`--workers MIN:MAX`): when to grow and when to shrink.
//!
//! A pure policy: the master takes a [`Sample`] of the pool every
//! [`SAMPLE_INTERVAL`] (idle workers from the scoreboard, whether a listener
//! has a connection waiting, whether any worker changed state) and
//! [`Scaler::decide`] answers with a [`Decision`]. It never reads a clock or
//! makes a syscall, so proptest drives it with a simulated load and clock.
//!
//! * **Shrink** when the idle count stayed above `spare`, with no connection
//!   waiting, at every sample of a whole window (the minimum over the window
//!   is above the target), the
//!   worker that would leave is idle, and nothing was scaled within the
//!   window: one worker per window at most, never below `min`.
//! * **Grow** when connections wait and no worker is idle for
//!   [`GROW_AFTER`] (the pool is saturated), or when connections wait and no
//!   worker changed state for `stall` (every worker is stuck, or the idle
//!   ones do not accept). Steps ramp 1, 2, 4 … while the pressure lasts
//!   (when no sample since the previous grow saw the queues empty, the step
//!   doubles), never above `max`. The next step waits until the workers of the last one are
//!   ready, so a step is judged by its effect.
//! * **Anti-flap**: a grow less than [`FLAP_WINDOWS`] windows after a
//!   shrink means the shrink was wrong; the hold before the next shrink
//!   doubles (window × 2, × 4 … up to × 2^[`MAX_PENALTY`]). The penalty
//!   steps back down after twice the current hold without a flap.

use std::time::Duration;

use crate::clock::MonoTime;

/// How often the master samples the pool when it sizes itself.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// How long connections must wait with no idle worker before the pool grows.
pub const GROW_AFTER: Duration = Duration::from_millis(100);

/// A grow within this many windows of a shrink counts as a flap.
pub const FLAP_WINDOWS: u32 = 4;

/// The hold before a shrink doubles at most this many times.
pub const MAX_PENALTY: u32 = 6;

/// The sizing settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleConfig {
    /// Never fewer workers than this.
    pub min: usize,
    /// Never more workers than this.
    pub max: usize,
    /// Idle workers to keep: the pool shrinks while more than this many
    /// stayed idle over a whole window.
    pub spare: usize,
    /// How long the surplus must last before one worker is retired.
    pub window: Duration,
    /// Connections waiting with no worker changing state this long: grow.
    pub stall: Duration,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            min: 1,
            max: 1,
            spare: 1,
            window: Duration::from_secs(10),
            stall: Duration::from_secs(1),
        }
    }
}

/// One look at the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sample {
    /// Workers wanted now.
    pub size: usize,
    /// Of those, how many are not ready yet (forked, booting, or waiting
    /// to be respawned).
    pub starting: usize,
    /// Ready workers waiting for a connection.
    pub idle: usize,
    /// A listener has a connection waiting to be accepted.
    pub backlog: bool,
    /// Connections waiting in the accept queues, when the kernel tells
    /// (TCP); for the log only.
    pub queued: Option<u32>,
    /// Some worker changed state (took or finished a connection) since the
    /// previous sample.
    pub activity: bool,
    /// The worker a shrink would retire is ready and idle.
    pub top_idle: bool,
}

/// Why the pool grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrowReason {
    /// Connections waited with every worker busy for this long.
    Saturated(Duration),
    /// Connections waited with no worker changing state for this long.
    Stalled(Duration),
}

/// What to do with the pool now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Keep the size.
    Hold,
    /// Add `by` workers (already capped at `max`).
    Grow {
        /// Workers to add.
        by: usize,
        /// Why.
        reason: GrowReason,
    },
    /// Retire the top worker (it is idle).
    Shrink {
        /// The fewest idle workers seen over the hold.
        min_idle: usize,
        /// How long the surplus lasted (the window times the penalty).
        held: Duration,
    },
}

/// The sizing policy's state. See the module docs.
#[derive(Debug, Clone)]
pub struct Scaler {
    cfg: ScaleConfig,
    /// Idle above `spare` at every sample since.
    surplus_since: Option<MonoTime>,
    /// The fewest idle seen since `surplus_since`.
    min_idle: usize,
    /// Backlog with no idle worker at every sample since.
    saturated_since: Option<MonoTime>,
    /// Backlog with no state change at every sample since.
    quiet_since: Option<MonoTime>,
    last_grow: Option<MonoTime>,
    last_shrink: Option<MonoTime>,
    /// The last grow step (for the ramp).
    ramp: usize,
    /// A settled sample since the last grow saw no connection waiting:
    /// the next grow starts the ramp again at 1.
    relieved: bool,
    penalty: u32,
    /// When the penalty last changed.
    penalty_at: MonoTime,
}

impl Scaler {
    /// A policy with these settings (`min` ≥ 1, `max` ≥ `min`: the caller
    /// validates them).
    pub fn new(cfg: ScaleConfig) -> Scaler {
        Scaler {
            cfg,
            surplus_since: None,
            min_idle: usize::MAX,
            saturated_since: None,
            quiet_since: None,
            last_grow: None,
            last_shrink: None,
            ramp: 0,
            relieved: true,
            penalty: 0,
            penalty_at: MonoTime::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &ScaleConfig {
        &self.cfg
    }

    /// Moves the range (TTIN/TTOU). The caller moves the pool with it, so
    /// the size stays within the range; the policy never has to restore it.
    pub fn set_range(&mut self, min: usize, max: usize) {
        self.cfg.min = min;
        self.cfg.max = max.max(min);
    }

    /// How long the surplus must last before a shrink: the window, doubled
    /// once per recent flap.
    pub fn hold(&self) -> Duration {
        self.cfg.window.saturating_mul(1 << self.penalty)
    }

    /// The current anti-flap penalty (the hold is window × 2^penalty).
    pub fn penalty(&self) -> u32 {
        self.penalty
    }

    /// Forgets what was being measured (the pool is paused: a reload, WINCH).
    pub fn reset(&mut self) {
        self.surplus_since = None;
        self.min_idle = usize::MAX;
        self.saturated_since = None;
        self.quiet_since = None;
    }

    /// The decision for this sample, taken at `now`.
    pub fn decide(&mut self, s: &Sample, now: MonoTime) -> Decision {
        let cfg = self.cfg;
        // The penalty steps down after twice the current hold without a flap.
        if self.penalty > 0 && now.saturating_since(self.penalty_at) >= self.hold() * 2 {
            self.penalty -= 1;
            self.penalty_at = now;
        }
        let settled = s.starting == 0;
        if settled && !s.backlog {
            self.relieved = true;
        }
        let saturated = settled && s.backlog && s.idle == 0;
        let quiet = settled && s.backlog && !s.activity;
        self.saturated_since = if saturated {
            self.saturated_since.or(Some(now))
        } else {
            None
        };
        self.quiet_since = if quiet {
            self.quiet_since.or(Some(now))
        } else {
            None
        };
        // A connection waiting means the pool is not too big, even with idle
        // workers (with reuseport it waits in a busy worker's own queue).
        if s.idle > cfg.spare && !s.backlog {
            if self.surplus_since.is_none() {
                self.surplus_since = Some(now);
                self.min_idle = s.idle;
            }
            self.min_idle = self.min_idle.min(s.idle);
        } else {
            self.surplus_since = None;
            self.min_idle = usize::MAX;
        }

        let saturated_for = self.saturated_since.map(|t| now.saturating_since(t));
        let quiet_for = self.quiet_since.map(|t| now.saturating_since(t));
        let reason = match (saturated_for, quiet_for) {
            (Some(d), _) if d >= GROW_AFTER => Some(GrowReason::Saturated(d)),
            (_, Some(d)) if d >= cfg.stall => Some(GrowReason::Stalled(d)),
            _ => None,
        };
        if let Some(reason) = reason {
            if s.size < cfg.max {
                return self.grow(s.size, reason, now);
            }
        }
        let hold = self.hold();
        let recent = |t: Option<MonoTime>| t.is_some_and(|t| now.saturating_since(t) < hold);
        let surplus_held = self
            .surplus_since
            .is_some_and(|t| now.saturating_since(t) >= hold);
        if s.size > cfg.min
            && settled
            && surplus_held
            && s.top_idle
            && !recent(self.last_grow)
            && !recent(self.last_shrink)
        {
            let min_idle = self.min_idle;
            self.last_shrink = Some(now);
            // One per window: the next surplus is measured afresh, from
            // the next sample (the pool it sees is one worker smaller).
            self.surplus_since = None;
            self.min_idle = usize::MAX;
            return Decision::Shrink {
                min_idle,
                held: hold,
            };
        }
        Decision::Hold
    }

    fn grow(&mut self, size: usize, reason: GrowReason, now: MonoTime) -> Decision {
        let cfg = self.cfg;
        self.ramp = if !self.relieved {
            self.ramp.saturating_mul(2).max(1)
        } else {
            1
        };
        let by = self.ramp.min(cfg.max - size);
        let flap = self
            .last_shrink
            .is_some_and(|t| now.saturating_since(t) < cfg.window.saturating_mul(FLAP_WINDOWS));
        if flap && self.penalty < MAX_PENALTY {
            self.penalty += 1;
            self.penalty_at = now;
            // One flap counts once.
            self.last_shrink = None;
        }
        self.last_grow = Some(now);
        self.relieved = false;
        self.saturated_since = None;
        self.quiet_since = None;
        self.surplus_since = None;
        self.min_idle = usize::MAX;
        Decision::Grow { by, reason }
    }
}

#[cfg(test)]
mod tests;
