//! How workers report busy and idle: the choice ([`ReportMode`]) and the
//! worker's side of it.

use crate::clock::MonoTime;
use crate::scoreboard::Cell;
use crate::status::{StatusKind, StatusWriter};

/// How workers report busy and idle to the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportMode {
    /// Atomic stores into a shared-memory scoreboard (no syscall).
    Scoreboard,
    /// A message per transition on the worker's status pipe.
    Pipe,
    /// Not at all (measurement only: timeouts, recycling and the status
    /// interface then see no busy/idle).
    Off,
}

/// Where busy/idle go.
pub(crate) enum Reporter<'a> {
    Off,
    /// The cell, and whether each request's duration is counted in it
    /// (for the metrics' histogram).
    Scoreboard(Cell<'a>, bool),
    Pipe(&'a StatusWriter),
}

/// A request ended at `now`: its duration, from the busy time the cell
/// holds, goes into the cell's histogram.
#[inline]
fn record(c: &Cell<'_>, now: MonoTime) {
    if let crate::state::WorkerState::Busy { since } = c.state() {
        c.record_duration(now.saturating_since(since));
    }
}

impl Reporter<'_> {
    #[inline]
    pub(crate) fn busy(&self) {
        match self {
            Reporter::Scoreboard(c, _) => c.busy(MonoTime::now()),
            Reporter::Pipe(w) => w.send(StatusKind::Busy),
            Reporter::Off => {}
        }
    }

    #[inline]
    pub(crate) fn kept_alive(&self) {
        match self {
            Reporter::Scoreboard(c, timed) => {
                let now = MonoTime::now();
                if *timed {
                    record(c, now);
                }
                c.kept_alive(now)
            }
            Reporter::Pipe(w) => w.send(StatusKind::KeepAlive),
            Reporter::Off => {}
        }
    }

    /// A kept-alive connection ended without another request: idle again,
    /// nothing more served.
    pub(crate) fn released(&self) {
        match self {
            Reporter::Scoreboard(c, _) => c.ready(MonoTime::now()),
            Reporter::Pipe(w) => w.send(StatusKind::Released),
            Reporter::Off => {}
        }
    }

    #[inline]
    pub(crate) fn idle(&self) {
        match self {
            Reporter::Scoreboard(c, timed) => {
                let now = MonoTime::now();
                if *timed {
                    record(c, now);
                }
                c.idle(now)
            }
            Reporter::Pipe(w) => w.send(StatusKind::Idle),
            Reporter::Off => {}
        }
    }
}
