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
    Scoreboard(Cell<'a>),
    Pipe(&'a StatusWriter),
}

impl Reporter<'_> {
    #[inline]
    pub(crate) fn busy(&self) {
        match self {
            Reporter::Scoreboard(c) => c.busy(MonoTime::now()),
            Reporter::Pipe(w) => w.send(StatusKind::Busy),
            Reporter::Off => {}
        }
    }

    #[inline]
    pub(crate) fn kept_alive(&self) {
        match self {
            Reporter::Scoreboard(c) => c.kept_alive(MonoTime::now()),
            Reporter::Pipe(w) => w.send(StatusKind::KeepAlive),
            Reporter::Off => {}
        }
    }

    /// A kept-alive connection ended without another request: idle again,
    /// nothing more served.
    pub(crate) fn released(&self) {
        match self {
            Reporter::Scoreboard(c) => c.ready(MonoTime::now()),
            Reporter::Pipe(w) => w.send(StatusKind::Released),
            Reporter::Off => {}
        }
    }

    #[inline]
    pub(crate) fn idle(&self) {
        match self {
            Reporter::Scoreboard(c) => c.idle(MonoTime::now()),
            Reporter::Pipe(w) => w.send(StatusKind::Idle),
            Reporter::Off => {}
        }
    }
}
