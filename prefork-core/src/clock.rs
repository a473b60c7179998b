//! Monotonic time shared by master and workers.
//!
//! Every timeout is measured on `CLOCK_MONOTONIC`, never the wall clock, so a
//! clock jump (L10) cannot make a worker look frozen. The value is plain
//! nanoseconds so that a worker can send it to the master, whose clock is the
//! same one.

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on `CLOCK_MONOTONIC`, in nanoseconds.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MonoTime(u64);

impl MonoTime {
    /// Reads `CLOCK_MONOTONIC` (a vDSO call: no syscall).
    pub fn now() -> MonoTime {
        // clock_gettime(CLOCK_MONOTONIC) cannot fail on Linux with a valid clock id.
        match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
            Ok(ts) => MonoTime(ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64),
            Err(_) => MonoTime(0),
        }
    }

    /// Builds a time from raw nanoseconds (as sent over a status channel).
    pub const fn from_nanos(ns: u64) -> MonoTime {
        MonoTime(ns)
    }

    /// Raw nanoseconds.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// `self - earlier`, or zero if `earlier` is later.
    pub fn saturating_since(self, earlier: MonoTime) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for MonoTime {
    type Output = MonoTime;
    fn add(self, d: Duration) -> MonoTime {
        MonoTime(
            self.0
                .saturating_add(d.as_nanos().min(u64::MAX as u128) as u64),
        )
    }
}

impl Sub<MonoTime> for MonoTime {
    type Output = Duration;
    fn sub(self, rhs: MonoTime) -> Duration {
        self.saturating_since(rhs)
    }
}

impl Sub<Duration> for MonoTime {
    type Output = MonoTime;
    fn sub(self, d: Duration) -> MonoTime {
        MonoTime(
            self.0
                .saturating_sub(d.as_nanos().min(u64::MAX as u128) as u64),
        )
    }
}

impl fmt::Debug for MonoTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:09}s",
            self.0 / 1_000_000_000,
            self.0 % 1_000_000_000
        )
    }
}

/// A poll(2) timeout for `d`, rounded up to whole milliseconds so that a
/// sub-millisecond wait does not become a busy zero-timeout poll.
pub fn poll_timeout(d: Option<Duration>) -> nix::poll::PollTimeout {
    match d {
        None => nix::poll::PollTimeout::NONE,
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128);
            nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_monotonic_and_arithmetic_saturates() {
        let a = MonoTime::now();
        let b = MonoTime::now();
        assert!(b >= a);
        assert_eq!(a - b, Duration::ZERO.max(a.saturating_since(b)));
        let c = a + Duration::from_millis(5);
        assert_eq!(c - a, Duration::from_millis(5));
        assert_eq!(a - c, Duration::ZERO);
    }
}
