//! What a worker is doing, as the master last saw it.

use crate::clock::MonoTime;

/// What a worker does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Booting (nothing reported yet).
    Booting,
    /// Waiting for a connection since `since`.
    Idle {
        /// When it became idle.
        since: MonoTime,
    },
    /// Serving a request since `since`.
    Busy {
        /// When it took the request.
        since: MonoTime,
    },
    /// Waiting in place for the next request on a kept-alive connection
    /// since `since` (blocking, mutex and reuseport keep the connection in
    /// the worker): not busy, so not timed out as frozen, but not available
    /// for a new connection either.
    KeepAlive {
        /// When the last response was sent.
        since: MonoTime,
    },
}

/// A worker's last sign of life between connections: it stores one at
/// every accept tick (idle) and every keep-alive poll, so that the master
/// can tell a worker waiting for work from one that stopped (SIGSTOP, a
/// deadlocked thread) while the strategy still counts on it: a stopped
/// mutex lock holder stalls every accept, a stopped fdpass worker is
/// handed connections it never takes (RELIABILITY C4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// When it was stored ([`MonoTime`] zero: never).
    pub at: MonoTime,
    /// Stored on entering a wait that holds nothing and may last longer
    /// than a tick (flock(2) and fcntl(2) lock waits): a worker stopped
    /// there keeps no one else from working, so its silence is not held
    /// against it.
    pub holds_nothing: bool,
}
