//! The accept-strategy contract: how workers get connections.
//!
//! A strategy has two sides. The master side ([`AcceptStrategy`]) lives in
//! the master: it prepares per-slot resources before each fork and learns
//! when a slot is retired. Two optional capabilities serve the strategies
//! that need them: [`MasterIo`] (descriptors watched in the master's loop,
//! for a strategy that accepts in the master and dispatches) and
//! [`OwnSockets`] (listening sockets of its own, handed across a binary
//! upgrade under a typed [`SlotKey`]). The worker side
//! ([`WorkerAcceptor`]) is built **in the child** right after fork, from the
//! child's copy of the strategy and the listeners, so that it owns exactly
//! what the worker needs and nothing of the master's is closed in the master.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

use crate::app::{Connection, Framing};
use crate::clock::MonoTime;
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
    /// The worker's heartbeat. The worker loop beats after every `accept`
    /// that returns; a strategy whose wait can outlast a tick while holding
    /// nothing (a flock(2) queue) says so first, and beats once it holds
    /// something again.
    pub liveness: Liveness<'a>,
    /// In [`WorkerAcceptor::drain`]: the master stops for good and new
    /// connections are dropped at the SYN, so a worker of a shared listener
    /// empties the accept queue before it exits (in a reload the new
    /// workers take the queue instead).
    pub final_stop: bool,
}

/// A worker's heartbeat in its scoreboard cell (nothing when busy/idle go
/// through the status pipe): how the master tells an idle worker from a
/// stopped one (RELIABILITY C4).
#[derive(Debug, Clone, Copy, Default)]
pub struct Liveness<'a> {
    cell: Option<crate::scoreboard::Cell<'a>>,
}

impl<'a> Liveness<'a> {
    /// Beats into `cell`.
    pub fn new(cell: Option<crate::scoreboard::Cell<'a>>) -> Liveness<'a> {
        Liveness { cell }
    }

    /// Alive now (one clock read and one store).
    #[inline]
    pub fn beat(&self) {
        if let Some(c) = &self.cell {
            c.beat(MonoTime::now());
        }
    }

    /// About to wait, without a deadline, for something that holds
    /// nothing others need (a lock queue): silence from now on is not held
    /// against this worker until its next [`Liveness::beat`].
    #[inline]
    pub fn holds_nothing(&self) {
        if let Some(c) = &self.cell {
            c.holds_nothing(MonoTime::now());
        }
    }
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

/// What [`AcceptStrategy::prepare`] is given: everything the master settled
/// before it, so that no call has to come "before prepare" by convention.
#[derive(Debug)]
pub struct Prepare<'a> {
    /// The master's listening sockets, bound or adopted.
    pub listeners: &'a [Listener],
    /// Workers will run as this uid and gid (`--user`): whatever they open
    /// or use after fork (a lock file, a semaphore) must be theirs.
    pub worker_owner: Option<(u32, u32)>,
    /// In a new master started by a binary upgrade: the sockets of this
    /// strategy's own that the old master handed over
    /// ([`OwnSockets::handover`]). Dropping one closes this master's copy.
    pub handed_over: Vec<SlotSocket>,
}

/// Which slot's socket on which address: the typed key under which a
/// strategy's own socket crosses a binary upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotKey {
    /// The worker slot the socket belongs to.
    pub slot: usize,
    /// The address it is bound to.
    pub addr: SocketAddr,
}

impl SlotKey {
    /// The key in `PREFORK_INHERIT`: `@NAME/SLOT/ADDR`. `@` is in no
    /// address, host name or path a `--bind` could give, so these never mix
    /// with the listeners' keys.
    pub(crate) fn encode(&self, strategy: &str) -> String {
        format!("{HANDOVER_MARK}{strategy}/{}/{}", self.slot, self.addr)
    }

    /// Reads back what [`SlotKey::encode`] wrote for `strategy`; `None` for
    /// another strategy's key or a malformed one.
    pub(crate) fn decode(strategy: &str, key: &str) -> Option<SlotKey> {
        let rest = key.strip_prefix(HANDOVER_MARK)?.strip_prefix(strategy)?;
        let (slot, addr) = rest.strip_prefix('/')?.split_once('/')?;
        Some(SlotKey {
            slot: slot.parse().ok()?,
            addr: addr.parse().ok()?,
        })
    }
}

/// A strategy's own socket handed over by an old master, with its key.
#[derive(Debug)]
pub struct SlotSocket {
    /// Whose it is.
    pub key: SlotKey,
    /// The socket, adopted by this master.
    pub listener: Listener,
}

/// The master side of an accept strategy: what every strategy provides.
///
/// The master calls, in this order: [`OwnSockets::bind_options`] (if the
/// strategy has own sockets) while binding; [`AcceptStrategy::prepare`]
/// once, before any fork; then for each worker [`AcceptStrategy::prepare_slot`]
/// before its fork and, in the child, [`AcceptStrategy::into_acceptor`];
/// [`AcceptStrategy::slot_retired`] when a slot is no longer wanted; and
/// [`AcceptStrategy::shutdown`] when the master exits.
///
/// What only some strategies need is a capability they return when they
/// have it: [`MasterIo`] for one that does I/O in the master loop,
/// [`OwnSockets`] for one with sockets of its own beyond the listeners.
pub trait AcceptStrategy {
    /// The worker side, built in each child.
    type Acceptor: WorkerAcceptor;

    /// Name used by `--strategy` and in logs.
    fn name(&self) -> &'static str;

    /// Once, in the master, after listeners are bound and before any fork.
    fn prepare(&mut self, _ctx: Prepare<'_>) -> Result<()> {
        Ok(())
    }

    /// In the master, before forking the worker of `slot`.
    fn prepare_slot(&mut self, _slot: usize) -> Result<()> {
        Ok(())
    }

    /// In the child, right after fork: build the worker side. `listeners`
    /// is the child's copy; whatever is not kept is closed in the child only.
    fn into_acceptor(self, slot: usize, listeners: Vec<Listener>) -> io::Result<Self::Acceptor>;

    /// Slot `slot` is no longer wanted: the pool shrank, or the master is
    /// stopping. Called before its worker is signalled.
    fn slot_retired(&mut self, _slot: usize) {}

    /// The master is exiting: release what outlives processes (lock files,
    /// semaphores).
    fn shutdown(&mut self) {}

    /// The strategy does I/O in the master loop (fdpass).
    fn master_io(&mut self) -> Option<&mut dyn MasterIo> {
        None
    }

    /// The strategy has listening sockets of its own (reuseport).
    fn own_sockets(&mut self) -> Option<&mut dyn OwnSockets> {
        None
    }
}

/// Capability of a strategy that works in the master loop: it polls
/// descriptors of its own there (fdpass accepts, holds connections and
/// dispatches requests).
///
/// Each master turn calls [`MasterIo::turn`], then polls
/// [`MasterIo::fds`] with everything else, then calls [`MasterIo::ready`]
/// for each one that is ready. The app's [`Framing`] is passed in, so the
/// strategy can tell when a buffered request is whole.
pub trait MasterIo {
    /// Right after the worker of `slot` was forked, in the master: close
    /// what only the worker should hold (the worker's end of a channel).
    fn worker_spawned(&mut self, _slot: usize) {}

    /// At the start of each master turn: housekeeping that must not wait for
    /// one of its descriptors to be ready (deadlines that passed; the master
    /// turns at least once a second, and by [`MasterIo::next_deadline`]).
    fn turn(&mut self, _app: &dyn Framing) {}

    /// The descriptors to poll this turn. A query: it changes nothing.
    fn fds(&self) -> Vec<BorrowedFd<'_>>;

    /// One of [`MasterIo::fds`] is ready.
    fn ready(&mut self, fd: RawFd, app: &dyn Framing);

    /// When [`MasterIo::turn`] next has work to do (a held connection's
    /// deadline): the master sleeps no longer than that.
    fn next_deadline(&self) -> Option<MonoTime> {
        None
    }

    /// The master begins to stop (QUIT when `graceful`; TERM, INT): close
    /// what is only waiting (kept-alive connections) and take nothing new
    /// in. A graceful stop then waits until [`MasterIo::held`] shows no
    /// request reading or queued (or the graceful timeout) before the
    /// workers are told to stop.
    fn stopping(&mut self, _graceful: bool) {}

    /// Connections held in the master, by state, for the status document:
    /// (reading, queued, parked).
    fn held(&self) -> Option<(usize, usize, usize)> {
        None
    }
}

/// Capability of a strategy with listening sockets of its own beyond the
/// master's listeners (reuseport's per-slot sockets).
pub trait OwnSockets {
    /// Adjust how the master binds its listeners (e.g. set SO_REUSEPORT).
    fn bind_options(&self, _opts: &mut BindOptions) {}

    /// Where connections wait to be accepted, for the pool sizing's backlog
    /// probe (`--workers MIN:MAX`): the master polls these with a zero
    /// timeout instead of the listeners.
    fn backlog_fds(&self) -> Vec<BorrowedFd<'_>>;

    /// The sockets a binary upgrade hands to the new master, each under its
    /// key; the new master's strategy receives them in [`Prepare::handed_over`].
    fn handover(&self) -> Vec<(SlotKey, BorrowedFd<'_>)> {
        Vec::new()
    }

    /// A new master now shares what [`OwnSockets::handover`] gave it
    /// (`true`, after USR2 started it), or no longer does (`false`: it
    /// exited, this master is the only one again).
    fn handed_over(&mut self, _active: bool) {}

    /// Slot `slot` has no worker now (its worker was reaped, or forking its
    /// replacement failed), and is not retired: its socket should get no
    /// new connection until [`AcceptStrategy::prepare_slot`] is called for
    /// it again (a crash loop, fork failing, a slot that failed to boot).
    fn slot_vacant(&mut self, _slot: usize) {}
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

    /// The app served a request and keeps the connection open for the next
    /// one. The default keeps it in this worker (`Some`), which waits in
    /// place for the next request; a strategy whose master parks kept-alive
    /// connections takes it (`None`: handed back, with the bytes already
    /// read ahead, and this worker is done with it). `app` is the app's
    /// framing, to tell whether a next request is already whole.
    fn keep_alive(
        &mut self,
        conn: Connection,
        _app: &dyn Framing,
    ) -> io::Result<Option<Connection>> {
        Ok(Some(conn))
    }

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
/// master (see [`SlotKey`]).
pub(crate) const HANDOVER_MARK: &str = "@";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_keys_round_trip_and_stay_with_their_strategy() {
        let key = SlotKey {
            slot: 3,
            addr: "[::1]:8080".parse().expect("addr"),
        };
        let text = key.encode("reuseport");
        assert_eq!(text, "@reuseport/3/[::1]:8080");
        assert_eq!(SlotKey::decode("reuseport", &text), Some(key));
        assert_eq!(SlotKey::decode("fdpass", &text), None);
        assert_eq!(SlotKey::decode("reuseport", "@reuseport/x/1.2.3.4:5"), None);
        assert_eq!(SlotKey::decode("reuseport", "127.0.0.1:80"), None);
    }
}
