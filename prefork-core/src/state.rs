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
    /// Serving a connection since `since`.
    Busy {
        /// When it took the connection.
        since: MonoTime,
    },
}
