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
