//! The accept-strategy contract: how workers get connections.
//!
//! A strategy has two sides. The master side ([`AcceptStrategy`]) lives in
//! the master: it may adjust how listeners are bound, prepare per-slot
//! resources before each fork, watch descriptors in the master's poll loop
//! (a strategy that accepts in the master and dispatches), and learn when a
//! slot's worker is gone or a slot is retired. The worker side
//! ([`WorkerAcceptor`]) is built **in the child** right after fork, from the
//! child's copy of the strategy and the listeners, so that it owns exactly
//! what the worker needs and nothing of the master's is closed in the master.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::time::Duration;

use crate::app::Connection;
use crate::error::Result;
use crate::listener::{BindOptions, Listener};

/// What the worker loop needs to know while accepting.
#[derive(Debug, Clone, Copy)]
pub struct AcceptContext<'a> {
    /// Becomes readable (EOF) when the master is gone: poll it with the
    /// listeners, or check it on every tick.
    pub master_alive: BorrowedFd<'a>,
    /// Longest time `accept` may block before returning [`Accepted::Idle`].
    pub tick: Duration,
}

/// Result of one [`WorkerAcceptor::accept`] call.
#[derive(Debug)]
pub enum Accepted {
    /// A connection to serve.
    Connection(Connection),
    /// Nothing this time (tick elapsed, interrupted by a signal, another
    /// worker won the race, an aborted connection was skipped): the worker
    /// checks its stop flag and the master, then calls `accept` again.
    Idle,
}

/// The master side of an accept strategy.
pub trait AcceptStrategy {
    /// The worker side, built in each child.
    type Acceptor: WorkerAcceptor;

    /// Name used by `--strategy` and in logs.
    fn name(&self) -> &'static str;

    /// Adjust how the master binds listeners (e.g. set SO_REUSEPORT).
    fn bind_options(&self, _opts: &mut BindOptions) {}

    /// Workers will run as this uid and gid (`--user`): whatever they open
    /// or use after fork (a lock file, a semaphore) must be theirs. Called
    /// before [`AcceptStrategy::prepare`].
    fn worker_owner(&mut self, _uid: u32, _gid: u32) {}

    /// Whether a binary upgrade (USR2) can hand this strategy's sockets to a
    /// new master without losing connections; `Err` says why not.
    fn upgrade_supported(&self) -> std::result::Result<(), String> {
        Ok(())
    }

    /// Sockets of the strategy's own (beyond the listeners) that a binary
    /// upgrade hands to the new master, each under a key that starts with
    /// [`handover_prefix`]`(self.name())` (so no `--bind` can take it).
    fn handover_fds(&self) -> Vec<(BorrowedFd<'_>, String)> {
        Vec::new()
    }

    /// In a new master started by a binary upgrade, before
    /// [`AcceptStrategy::prepare`]: the sockets the old master's strategy
    /// handed over ([`AcceptStrategy::handover_fds`]), each with its key.
    /// Dropping one closes this master's copy.
    fn adopt_handed_over(&mut self, _sockets: Vec<Listener>) {}

    /// A new master now shares what [`AcceptStrategy::handover_fds`] gave it
    /// (`true`, after USR2 started it), or no longer does (`false`: it
    /// exited, this master is the only one again).
    fn handed_over(&mut self, _active: bool) {}

    /// Once, in the master, after listeners are bound and before any fork.
    fn prepare(&mut self, _listeners: &[Listener]) -> Result<()> {
        Ok(())
    }

    /// In the master, before forking the worker of `slot`.
    fn prepare_slot(&mut self, _slot: usize, _listeners: &[Listener]) -> Result<()> {
        Ok(())
    }

    /// In the master, right after the worker of `slot` was forked: close
    /// what only the worker should hold (the worker's end of a channel).
    fn worker_spawned(&mut self, _slot: usize) {}

    /// In the child, right after fork: build the worker side. `listeners`
    /// is the child's copy; whatever is not kept is closed in the child only.
    fn into_acceptor(self, slot: usize, listeners: Vec<Listener>) -> io::Result<Self::Acceptor>;

    /// At the start of each master turn, before [`AcceptStrategy::master_fds`]:
    /// housekeeping that must not wait for one of its descriptors to be ready
    /// (the master turns at least once a second).
    fn master_turn(&mut self) {}

    /// Descriptors the master loop should poll for this strategy.
    fn master_fds(&self) -> Vec<BorrowedFd<'_>> {
        Vec::new()
    }

    /// Where connections wait to be accepted, for the pool sizing's backlog
    /// probe (`--workers MIN:MAX`): the master polls these with a zero
    /// timeout. The default is the listeners; a strategy with sockets of
    /// its own (one per slot) returns those of the live slots.
    fn backlog_fds<'a>(&'a self, listeners: &'a [Listener]) -> Vec<BorrowedFd<'a>> {
        listeners.iter().map(|l| l.as_fd()).collect()
    }

    /// One of [`AcceptStrategy::master_fds`] is ready.
    fn master_ready(&mut self, _fd: RawFd) {}

    /// The worker in `slot` exited (the slot may be respawned).
    fn worker_exited(&mut self, _slot: usize) {}

    /// Slot `slot` is no longer wanted: the pool shrank, or the master is
    /// stopping. Called before its worker is signalled.
    fn slot_retired(&mut self, _slot: usize) {}

    /// The master is exiting: release what outlives processes (lock files,
    /// semaphores).
    fn shutdown(&mut self) {}
}

/// The worker side of an accept strategy.
pub trait WorkerAcceptor {
    /// After the app's `after_fork`, before the first accept. An error makes
    /// the worker exit with [`crate::EXIT_BOOT_FAILED`].
    fn init(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Wait for one connection, at most `ctx.tick`.
    ///
    /// Transient errors (EINTR, EAGAIN, ECONNABORTED, EPROTO) become
    /// [`Accepted::Idle`]. Resource exhaustion (EMFILE, ENFILE, ENOBUFS,
    /// ENOMEM) is returned as an error: the worker loop backs off.
    fn accept(&mut self, ctx: &AcceptContext<'_>) -> io::Result<Accepted>;

    /// The connection from the last `accept` was served and is about to be
    /// closed (a strategy whose master may still hold a copy of it sends the
    /// FIN here, so the client does not wait for the master's close).
    fn closing(&mut self, _conn: &Connection) {}

    /// The connection from the last `accept` was served and closed.
    fn done(&mut self) {}

    /// After a graceful stop was asked: a connection still waiting that no
    /// other worker will take (a per-worker socket's queue), or `Idle` when
    /// there is none. The worker serves what this returns before exiting.
    /// Shared listeners need nothing: the other workers take their queue.
    fn drain(&mut self, _ctx: &AcceptContext<'_>) -> io::Result<Accepted> {
        Ok(Accepted::Idle)
    }
}

/// Classifies an accept(2) error: `Ok(Idle)` for the ones to skip, `Err`
/// for the ones the caller must see.
pub fn accept_error(e: io::Error) -> io::Result<Accepted> {
    match e.raw_os_error() {
        Some(
            libc::EAGAIN
            | libc::EINTR
            | libc::ECONNABORTED
            | libc::EPROTO
            | libc::EPERM
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH,
        ) => Ok(Accepted::Idle),
        _ => Err(e),
    }
}

/// Starts every key under which a strategy hands its own sockets to a new
/// master: `@` is in no address, host name or path a `--bind` could give, so
/// these never mix with the listeners.
pub const HANDOVER_MARK: &str = "@";

/// The start of the keys of strategy `strategy`'s own sockets (`@NAME/`).
pub fn handover_prefix(strategy: &str) -> String {
    format!("{HANDOVER_MARK}{strategy}/")
}
