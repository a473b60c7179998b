//! # prefork-fdpass
//!
//! The master accepts, and hands each connection to an **idle** worker over
//! a per-slot `SOCK_SEQPACKET` socketpair with SCM_RIGHTS. The worker's
//! one-byte `D` ("done") on the same channel is also its idle report. So the
//! master knows exactly which workers are idle, gives each connection to one
//! of them, and never queues a connection behind a busy worker.
//!
//! * At most one connection is outstanding per worker.
//! * When no worker is idle, the master stops polling the listeners, so
//!   connections wait in the kernel's backlog, not in user space. It resumes
//!   as soon as a worker reports idle.
//! * The receiving side uses MSG_CMSG_CLOEXEC and takes ownership of every
//!   descriptor at once. A message with MSG_CTRUNC, several descriptors, a
//!   descriptor that is not a stream socket, or an unexpected payload is
//!   rejected, and every descriptor it carried is closed.
//! * A worker that dies holding a passed connection loses at most that one.
//!   The master never sends to a dead or retiring worker.
//! * A worker that dies **before it took** the connection sent to it (it was
//!   killed while idle, the message still in its channel) loses nothing:
//!   the master keeps its own copy of each connection until the worker has
//!   counted it as received, in a shared-memory counter per channel
//!   (incremented before the worker reads a byte). On the channel's EOF with
//!   the count short, the master hands its copy to another worker. The
//!   worker sends the FIN itself (shutdown) before closing, so the master's
//!   copy never delays the end of a connection.

#![deny(missing_docs)]
// `unsafe` is confined to `sys`: the compiler enforces it.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod sys;

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::poll::{PollFd, PollFlags};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use prefork_core::clock::{poll_timeout, MonoTime};
use prefork_core::sys::SharedMap;
use prefork_core::{
    AcceptContext, AcceptStrategy, Accepted, Connection, Error, Listener, Result, WorkerAcceptor,
};
use socket2::{Socket, Type};

/// "Here is a connection" (master → worker), with one descriptor: `C` for
/// TCP or `U` for Unix, then the index of its listener (u16, little
/// endian), so the worker needs no syscall to learn either.
const CONN_TCP: u8 = b'C';
const CONN_UNIX: u8 = b'U';
/// "I am idle" (worker → master): after boot and after each connection.
const IDLE: &[u8] = b"D";
/// "I could not take it" (worker → master): the descriptor could not be
/// installed in the worker (its descriptor limit, EMFILE), so the message
/// came without it; the master hands its own copy to a worker again.
const RETURNED: &[u8] = b"R";

fn strategy_err(reason: String) -> Error {
    Error::Strategy {
        strategy: "fdpass",
        reason,
    }
}

/// Counter cells: one per channel alive at once (a full pool, its
/// replacements during a reload, and those still stopping).
const CELLS: usize = 4 * prefork_core::supervisor::MAX_WORKERS;

/// The shared map, as u64 atomics: per cell, connections the worker counted
/// as received (`RECEIVED + cell`) and connections it finished (`FINISHED +
/// cell`); then one flag, set while the master waits for an idle worker.
const RECEIVED: usize = 0;
const FINISHED: usize = CELLS;
const WAITING: usize = 2 * CELLS;
const MAP_WORDS: usize = 2 * CELLS + 1;

/// One counter of the shared map (0 without one).
fn shared(map: Option<&SharedMap>, index: usize) -> u64 {
    map.and_then(|m| m.as_slice_of::<AtomicU64>().get(index))
        .map_or(0, |c| c.load(Ordering::SeqCst))
}

#[derive(Debug)]
struct Channel {
    master: OwnedFd,
    /// The worker's end, until the worker takes it after fork.
    worker: Option<OwnedFd>,
    /// Its counters in the shared map.
    cell: usize,
    /// Connections sent on it.
    sent: u64,
    /// Its worker said it is ready (its first `D`).
    booted: bool,
    /// `D` reports after the first: each follows a finished connection.
    reports: u64,
    /// The master's copy of the last connection sent, and when it was sent,
    /// kept until the worker counted it as received.
    held: Option<(Conn, MonoTime)>,
    /// The slot retired, or the channel was replaced or failed: never send
    /// on it again (it is still read until EOF).
    closed: bool,
    /// EOF seen: the worker is gone.
    eof: bool,
}

/// A connection the master accepted, and the listener it came in on.
#[derive(Debug)]
struct Conn {
    sock: Socket,
    listener: u16,
    unix: bool,
}

impl Conn {
    fn message(&self) -> [u8; 3] {
        let [lo, hi] = self.listener.to_le_bytes();
        [if self.unix { CONN_UNIX } else { CONN_TCP }, lo, hi]
    }
}

impl Channel {
    /// Connections its worker finished: its shared counter, or the `D`
    /// reports when they are ahead (a worker without the shared map).
    fn finished(&self, map: Option<&SharedMap>) -> u64 {
        shared(map, FINISHED + self.cell).max(self.reports)
    }

    /// Its worker has taken every connection sent (it counts one before
    /// reading a byte of it, and finishing implies taking).
    fn took_all(&self, map: Option<&SharedMap>) -> bool {
        shared(map, RECEIVED + self.cell) >= self.sent || self.finished(map) >= self.sent
    }

    /// Ready, not closed, and done with everything sent to it.
    fn idle(&self, map: Option<&SharedMap>) -> bool {
        self.booted && !self.closed && self.finished(map) >= self.sent
    }
}

/// A channel: the current one of a slot, or a replaced one.
#[derive(Debug, Clone, Copy)]
enum Which {
    Slot(usize),
    Old(usize),
}

/// The fdpass strategy (master side).
#[derive(Debug, Default)]
pub struct Fdpass {
    /// The master's polling copies of the listeners (same descriptions),
    /// and whether each is a Unix socket.
    listeners: Vec<(Socket, bool)>,
    /// Per listener: poll(2) said readable and accept(2) has not yet found
    /// it empty. Only these are tried, so an idle listener costs no
    /// accept(2) per connection of another.
    readable: Vec<bool>,
    /// accept(2) hit the descriptor limit: the listeners are left alone
    /// until then, instead of spinning on a readable listener (the master
    /// wakes at least once a second, so it resumes within one).
    accept_paused_until: Option<MonoTime>,
    slots: Vec<Option<Channel>>,
    /// Channels replaced in their slot (a reload, a respawn) whose worker may
    /// still be alive: read until EOF.
    old: Vec<Channel>,
    /// Counters shared with the workers (see [`RECEIVED`]).
    receipts: Option<SharedMap>,
    /// Free counter cells.
    free: Vec<usize>,
    /// Where the search for an idle worker starts (round robin).
    next: usize,
    /// Accepted but not yet handed over (a send failed): bounded by the
    /// number of slots, because the master accepts only for idle workers.
    pending: VecDeque<Conn>,
    /// Connections handed over, those lost in a dead worker's hands, and
    /// those handed again after a worker died before taking them.
    passed: u64,
    lost: u64,
    rescued: u64,
    /// Connections a worker at its descriptor limit could not take.
    returned: u64,
}

impl Fdpass {
    /// Creates the strategy.
    pub fn new() -> Fdpass {
        Fdpass::default()
    }

    fn accept_paused(&self) -> bool {
        self.accept_paused_until
            .is_some_and(|t| MonoTime::now() < t)
    }

    fn any_idle(&self) -> bool {
        let map = self.receipts.as_ref();
        self.slots.iter().flatten().any(|c| c.idle(map))
    }

    /// Tells the workers whether the master waits for one of them to be
    /// idle. While it does not, a worker that finishes a connection only
    /// counts it in shared memory and sends no `D`, which saves a wakeup of
    /// the master per connection. The flag is set before the idle counters
    /// are read again, and a worker counts before it reads the flag (both
    /// sequentially consistent), so a worker going idle is either seen
    /// here or sends its `D`.
    fn set_waiting(&self, on: bool) {
        if let Some(flag) = self
            .receipts
            .as_ref()
            .and_then(|m| m.as_slice_of::<AtomicU64>().get(WAITING))
        {
            flag.store(u64::from(on), Ordering::SeqCst);
        }
    }

    /// After each turn: hand on what can be handed on; then either some
    /// worker is idle and nothing is pending (the listeners are polled, no
    /// `D` is needed), or the flag is up and the next idle worker says so.
    fn settle(&mut self) {
        loop {
            self.deliver_pending();
            self.accept_ready();
            // After the hand-overs: the copy released is usually the last
            // reference of a connection its worker already closed, and its
            // teardown need not delay the next connection.
            self.release_received(None);
            if self.pending.is_empty() && self.any_idle() {
                self.set_waiting(false);
                return;
            }
            self.set_waiting(true);
            if !self.any_idle() {
                return;
            }
            // A worker went idle before it could see the flag: again.
        }
    }

    /// Hands `conn` to an idle worker, or keeps it for the next one.
    fn dispatch(&mut self, conn: Conn) {
        let n = self.slots.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            let Some(ch) = self.slots[i].as_mut() else {
                continue;
            };
            if !ch.idle(self.receipts.as_ref()) {
                continue;
            }
            match sys::send_with_fds(ch.master.as_fd(), &conn.message(), &[conn.sock.as_raw_fd()]) {
                Ok(()) => {
                    ch.sent += 1;
                    // Kept until the worker counts it received (see above).
                    ch.held = Some((conn, MonoTime::now()));
                    self.next = (i + 1) % n;
                    self.passed += 1;
                    return;
                }
                Err(e) => {
                    tracing::warn!("fdpass: sending to worker {i} failed: {e}; trying another");
                    ch.closed = true;
                }
            }
        }
        self.pending.push_back(conn);
    }

    fn accept_ready(&mut self) {
        // Accept only as many as there are idle workers, from the listeners
        // poll(2) found readable, each until it is empty.
        if self.accept_paused() {
            return;
        }
        while self.pending.is_empty() && self.any_idle() {
            let mut got = None;
            for (i, (l, unix)) in self.listeners.iter().enumerate() {
                if !self.readable.get(i).copied().unwrap_or(false) {
                    continue;
                }
                match l.accept() {
                    Ok((sock, _)) => {
                        got = Some(Conn {
                            sock,
                            listener: u16::try_from(i).unwrap_or(u16::MAX),
                            unix: *unix,
                        });
                        break;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
                        got = None; // gone before it was taken; try again
                        break;
                    }
                    Err(e)
                        if e.raw_os_error() == Some(libc::EMFILE)
                            || e.raw_os_error() == Some(libc::ENFILE) =>
                    {
                        tracing::warn!("fdpass: accept failed: {e}; pausing accept for 100 ms");
                        self.accept_paused_until =
                            Some(MonoTime::now() + std::time::Duration::from_millis(100));
                        return;
                    }
                    Err(_) => {
                        // EAGAIN: empty until poll(2) says otherwise.
                        if let Some(r) = self.readable.get_mut(i) {
                            *r = false;
                        }
                    }
                }
            }
            match got {
                Some(s) => self.dispatch(s),
                None if self.readable.iter().any(|&r| r) => {}
                None => return,
            }
        }
    }

    /// Reads one message from a ready channel: a `D` report, or the EOF that
    /// says its worker is gone (then a connection it never took is handed
    /// on). One per readiness saves the recvmsg that would only find the
    /// channel empty; poll(2) is level-triggered, so anything more is read
    /// on the next turn.
    fn read_channel(&mut self, which: Which) {
        let ch = match which {
            Which::Slot(i) => self.slots.get_mut(i).and_then(Option::as_mut),
            Which::Old(i) => self.old.get_mut(i),
        };
        let Some(ch) = ch.filter(|c| !c.eof) else {
            return;
        };
        match sys::recv_with_fds(ch.master.as_fd(), true) {
            // Workers send no descriptors; any that came are closed with `msg`.
            Ok(Some(msg)) if msg.data == IDLE && msg.fds.is_empty() => {
                if ch.booted {
                    ch.reports += 1;
                }
                ch.booted = true;
            }
            Ok(Some(msg)) if msg.data == RETURNED && msg.fds.is_empty() => match ch.held.take() {
                Some((conn, _)) => {
                    // As if never sent: the worker is idle again, and the
                    // connection (its bytes unread) goes to the next one.
                    ch.sent = ch.sent.saturating_sub(1);
                    self.returned += 1;
                    if self.returned <= 3 || self.returned.is_power_of_two() {
                        tracing::warn!(
                            "fdpass: a worker could not take a connection (its descriptor limit); handing it on ({} so far)",
                            self.returned
                        );
                    }
                    self.pending.push_front(conn);
                }
                None => tracing::warn!(
                    "fdpass: a worker returned a connection the master no longer holds"
                ),
            },
            Ok(Some(_)) => tracing::warn!("fdpass: a worker sent a malformed message; ignored"),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {}
            // EOF, or a reset: the worker is gone.
            Ok(None) | Err(_) => {
                ch.closed = true;
                ch.eof = true;
                let map = self.receipts.as_ref();
                let took = ch.took_all(map);
                let outstanding = ch.finished(map) < ch.sent;
                match ch.held.take() {
                    Some((conn, _)) if !took => {
                        // It died before taking it: nothing was read.
                        self.rescued += 1;
                        tracing::info!(
                            "fdpass: a worker died before taking the connection sent to it; handing it to another"
                        );
                        self.pending.push_front(conn);
                    }
                    _ if outstanding => {
                        self.lost += 1;
                        tracing::warn!("fdpass: a worker died holding a connection");
                    }
                    _ => {}
                }
                self.free.push(ch.cell);
            }
        }
    }

    /// Closes the master's copies the workers have counted as received
    /// (only those sent before `sent_before`, when given).
    fn release_received(&mut self, sent_before: Option<MonoTime>) {
        let map = self.receipts.as_ref();
        let chans = self.slots.iter_mut().flatten().chain(self.old.iter_mut());
        let due = |c: &&mut Channel| {
            c.held
                .as_ref()
                .is_some_and(|(_, at)| sent_before.map_or(true, |t| *at < t))
        };
        for ch in chans.filter(due) {
            if ch.took_all(map) {
                ch.held = None;
            }
        }
    }

    fn deliver_pending(&mut self) {
        while self.any_idle() {
            match self.pending.pop_front() {
                Some(conn) => self.dispatch(conn),
                None => return,
            }
        }
    }

    /// Connections handed to workers so far.
    pub fn passed(&self) -> u64 {
        self.passed
    }
}

impl AcceptStrategy for Fdpass {
    type Acceptor = FdpassAcceptor;

    fn name(&self) -> &'static str {
        "fdpass"
    }

    fn prepare(&mut self, listeners: &[Listener]) -> Result<()> {
        for l in listeners {
            let dup = l
                .socket()
                .try_clone()
                .map_err(|e| strategy_err(format!("dup() of {}: {e}", l.addr())))?;
            dup.set_nonblocking(true)
                .map_err(|e| strategy_err(format!("O_NONBLOCK on {}: {e}", l.addr())))?;
            self.listeners.push((dup, l.is_unix()));
            self.readable.push(false);
        }
        let map = SharedMap::new(MAP_WORDS * std::mem::size_of::<AtomicU64>())
            .map_err(|e| Error::sys("mmap() for the fdpass counters", e))?;
        self.receipts = Some(map);
        // Until the first turn, every worker reports when it is idle.
        self.set_waiting(true);
        self.free = (0..CELLS).rev().collect();
        Ok(())
    }

    fn prepare_slot(&mut self, slot: usize, _listeners: &[Listener]) -> Result<()> {
        // A new channel for every new worker: nothing of an earlier worker
        // of the slot can be read, and its end closes with it.
        let (master, worker) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| strategy_err(format!("socketpair() for slot {slot}: {e}")))?;
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, || None);
        }
        let cell = self
            .free
            .pop()
            .ok_or_else(|| strategy_err(format!("no free receipt counter for slot {slot}")))?;
        if let Some(words) = self.receipts.as_ref().map(|m| m.as_slice_of::<AtomicU64>()) {
            for i in [RECEIVED + cell, FINISHED + cell] {
                if let Some(c) = words.get(i) {
                    c.store(0, Ordering::SeqCst);
                }
            }
        }
        // An earlier worker of the slot (a reload, or one that died and is
        // not yet seen gone) keeps its channel until its EOF: it may still
        // serve what it holds, and a connection it never took is handed on.
        let previous = self.slots[slot].replace(Channel {
            master,
            worker: Some(worker),
            cell,
            sent: 0,
            booted: false,
            reports: 0,
            held: None,
            closed: false,
            eof: false,
        });
        if let Some(mut prev) = previous {
            prev.closed = true;
            if !prev.eof {
                self.old.push(prev);
            }
        }
        Ok(())
    }

    fn worker_spawned(&mut self, slot: usize) {
        // Only the worker may hold its end: the master's copy would keep the
        // channel open after the worker died, and hide its death.
        if let Some(ch) = self.slots.get_mut(slot).and_then(Option::as_mut) {
            ch.worker = None;
        }
    }

    fn into_acceptor(
        mut self,
        slot: usize,
        _listeners: Vec<Listener>,
    ) -> io::Result<FdpassAcceptor> {
        // The worker keeps its end of its own channel and nothing else: no
        // listener, no other worker's channel (all closed with `self`).
        let (chan, cell) = self
            .slots
            .get_mut(slot)
            .and_then(Option::as_mut)
            .and_then(|c| c.worker.take().map(|w| (w, c.cell)))
            .ok_or_else(|| io::Error::other(format!("no channel for slot {slot}")))?;
        Ok(FdpassAcceptor {
            chan,
            closed: false,
            rejected: 0,
            receipt: self.receipts.take().map(|m| (m, cell)),
            rcvtimeo: None,
        })
    }

    fn master_turn(&mut self) {
        // A copy is released after the hand-overs of a turn (settle), so
        // its teardown never delays the next connection. One that lingers
        // there (its worker counted it only after that turn, and no other
        // connection came) is released here once it is 100 ms old: on a
        // quiet server it would otherwise keep the last connection's socket
        // open in the master indefinitely. The master turns at least once a
        // second.
        self.release_received(Some(
            MonoTime::now() - std::time::Duration::from_millis(100),
        ));
    }

    fn master_fds(&self) -> Vec<BorrowedFd<'_>> {
        // Every channel until its EOF (a retired or replaced one too: its
        // worker's death must be seen, with what it held).
        let mut fds: Vec<BorrowedFd<'_>> = self
            .slots
            .iter()
            .flatten()
            .chain(self.old.iter())
            .filter(|c| !c.eof)
            .map(|c| c.master.as_fd())
            .collect();
        // No idle worker: leave connections in the kernel's backlog, and
        // have the next idle worker say so (a retirement since the last turn
        // may have taken the last idle one). Read the counters again after
        // raising the flag: a worker that went idle just before is seen.
        let mut idle = self.any_idle();
        if !idle {
            self.set_waiting(true);
            idle = self.any_idle();
        }
        if self.pending.is_empty() && idle && !self.accept_paused() {
            fds.extend(self.listeners.iter().map(|(l, _)| l.as_fd()));
        }
        fds
    }

    fn master_ready(&mut self, fd: RawFd) {
        let which = self
            .slots
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.master.as_raw_fd() == fd))
            .map(Which::Slot)
            .or_else(|| {
                self.old
                    .iter()
                    .position(|c| c.master.as_raw_fd() == fd)
                    .map(Which::Old)
            });
        if let Some(w) = which {
            self.read_channel(w);
            // A channel whose worker is gone is closed at once: a slot
            // retired by TTOU may never be used again, and its channel
            // would stay open for the master's lifetime.
            self.old.retain(|c| !c.eof);
            if let Which::Slot(i) = w {
                if let Some(slot) = self.slots.get_mut(i) {
                    if slot.as_ref().is_some_and(|c| c.eof) {
                        *slot = None;
                    }
                }
            }
        } else if let Some(i) = self.listeners.iter().position(|(l, _)| l.as_raw_fd() == fd) {
            self.readable[i] = true;
        }
        self.settle();
    }

    // worker_exited is not used: a slot may hold two workers during a
    // reload, and the slot's channel may already be the new one's. Each
    // channel belongs to exactly one worker, and its EOF (read_channel) says
    // precisely when that worker is gone.

    fn slot_retired(&mut self, slot: usize) {
        if let Some(ch) = self.slots.get_mut(slot).and_then(Option::as_mut) {
            ch.closed = true;
        }
    }

    fn shutdown(&mut self) {
        tracing::info!(
            "fdpass: {} connections handed to workers, {} handed again after a worker died before taking them, {} handed again after a worker at its descriptor limit could not take them, {} lost with workers that died holding them",
            self.passed,
            self.rescued,
            self.returned,
            self.lost
        );
    }
}

/// The worker side: receives connections from the master.
#[derive(Debug)]
pub struct FdpassAcceptor {
    chan: OwnedFd,
    /// The master closed the channel (a reload gave the slot to a new worker).
    closed: bool,
    rejected: u64,
    /// The shared counters and this worker's cell (absent for a bare
    /// channel in tests: then every `D` is sent).
    receipt: Option<(SharedMap, usize)>,
    /// SO_RCVTIMEO set on the channel (the accept tick).
    rcvtimeo: Option<std::time::Duration>,
}

impl FdpassAcceptor {
    /// A worker side on its end of a channel (for tests and custom masters).
    pub fn from_channel(chan: OwnedFd) -> FdpassAcceptor {
        FdpassAcceptor {
            chan,
            closed: false,
            rejected: 0,
            receipt: None,
            rcvtimeo: None,
        }
    }

    /// Messages rejected so far.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Reads one message; a valid one is a connection.
    pub fn receive(&mut self, nonblocking: bool) -> io::Result<Accepted> {
        let msg = match sys::recv_with_fds(self.chan.as_fd(), nonblocking) {
            Ok(Some(m)) => m,
            Ok(None) => {
                self.closed = true;
                return Ok(Accepted::Idle);
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {
                return Ok(Accepted::Idle)
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::EPIPE)) => {
                // The master gave this slot to a new worker (reload).
                self.closed = true;
                return Ok(Accepted::Idle);
            }
            Err(e) => return Err(e),
        };
        let (kind, listener) = match msg.data.as_slice() {
            &[k @ (CONN_TCP | CONN_UNIX), lo, hi] => (k, u16::from_le_bytes([lo, hi])),
            _ => (0, 0),
        };
        if kind != 0 && msg.truncated && msg.fds.is_empty() && !msg.foreign_cmsg {
            // A connection whose descriptor the kernel could not install
            // here (this worker is at its descriptor limit: the message
            // comes with MSG_CTRUNC and without it). Nothing is counted: the
            // master still holds its copy and hands it on. The worker loop
            // backs off, as after EMFILE from accept(2).
            sys::send_with_fds(self.chan.as_fd(), RETURNED, &[])?;
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        let well_formed = kind != 0 && !msg.truncated && !msg.foreign_cmsg && msg.fds.len() == 1;
        if !well_formed {
            return Ok(self.reject(format!(
                "{} descriptors, {} payload bytes{}",
                msg.fds.len(),
                msg.data.len(),
                if msg.truncated { ", truncated" } else { "" }
            )));
        }
        let Some(fd) = msg.fds.into_iter().next() else {
            return Ok(self.reject("no descriptor".into()));
        };
        let sock = Socket::from(fd);
        // One getsockopt(SO_TYPE): it fails for anything but a socket.
        if !matches!(sock.r#type(), Ok(t) if t == Type::STREAM) {
            return Ok(self.reject("the descriptor is not a stream socket".into()));
        }
        // Counted before a byte is read: from here on the master must not
        // hand this connection to anyone else.
        self.count(RECEIVED);
        Ok(Accepted::Connection(Connection::from_socket(
            sock,
            kind == CONN_UNIX,
            usize::from(listener),
        )))
    }

    fn reject(&mut self, why: String) -> Accepted {
        self.rejected += 1;
        if self.rejected <= 3 || self.rejected.is_power_of_two() {
            tracing::warn!(
                "fdpass: rejected a message from the master ({why}); {} so far",
                self.rejected
            );
        }
        // Whatever came is dealt with: the master may drop its copy, and
        // this worker is idle again.
        self.count(RECEIVED);
        self.finished();
        Accepted::Idle
    }

    /// Adds one to this worker's counter `base + cell`.
    fn count(&self, base: usize) {
        if let Some((map, cell)) = &self.receipt {
            if let Some(c) = map.as_slice_of::<AtomicU64>().get(base + *cell) {
                c.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// One connection finished: counted, and reported with a `D` only if
    /// the master waits for an idle worker (see `Fdpass::set_waiting`).
    fn finished(&mut self) {
        self.count(FINISHED);
        if self.closed {
            return;
        }
        let tell = match &self.receipt {
            Some((map, _)) => map
                .as_slice_of::<AtomicU64>()
                .get(WAITING)
                .map_or(true, |w| w.load(Ordering::SeqCst) != 0),
            None => true,
        };
        if tell {
            let _ = sys::send_with_fds(self.chan.as_fd(), IDLE, &[]);
        }
    }
}

impl WorkerAcceptor for FdpassAcceptor {
    fn init(&mut self) -> io::Result<()> {
        sys::send_with_fds(self.chan.as_fd(), IDLE, &[])
    }

    fn accept(&mut self, ctx: &AcceptContext<'_>) -> io::Result<Accepted> {
        if self.closed {
            // Nothing more will come: wait for the master's word, or its end.
            let mut fds = [PollFd::new(ctx.master_alive, PollFlags::POLLIN)];
            return match nix::poll::poll(&mut fds, poll_timeout(Some(ctx.tick))) {
                Ok(_) | Err(nix::Error::EINTR) => Ok(Accepted::Idle),
                Err(e) => Err(e.into()),
            };
        }
        // Block in recvmsg(2) itself, at most a tick (SO_RCVTIMEO; a signal
        // interrupts it). The master's death needs no poll: only the master
        // holds the other end, so its death is this channel's EOF.
        if self.rcvtimeo != Some(ctx.tick) {
            socket2::SockRef::from(&self.chan).set_read_timeout(Some(ctx.tick))?;
            self.rcvtimeo = Some(ctx.tick);
        }
        self.receive(false)
    }

    fn closing(&mut self, conn: &Connection) {
        // The master may still hold its copy: send the FIN now.
        let _ = conn.shutdown(Shutdown::Write);
    }

    fn done(&mut self) {
        self.finished();
    }

    fn drain(&mut self, _ctx: &AcceptContext<'_>) -> io::Result<Accepted> {
        // A connection already handed to this worker is served before it exits.
        if self.closed {
            return Ok(Accepted::Idle);
        }
        self.receive(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    const CONN: &[u8] = b"C\0\0";

    fn tcp(sock: impl Into<Socket>) -> Conn {
        Conn {
            sock: sock.into(),
            listener: 0,
            unix: false,
        }
    }

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    /// This process with no descriptor number left: the limit just above the
    /// highest one in use, every free number below it taken. Dropping it
    /// gives them back and restores the limit.
    struct AtLimit {
        fillers: Vec<std::fs::File>,
        limits: (u64, u64),
    }

    impl AtLimit {
        fn new() -> AtLimit {
            use nix::sys::resource::{getrlimit, setrlimit, Resource};
            let limits = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
            let highest = std::fs::read_dir("/proc/self/fd")
                .expect("fds")
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
                .max()
                .expect("some fd");
            setrlimit(Resource::RLIMIT_NOFILE, highest + 1, limits.1).expect("setrlimit");
            let mut fillers = Vec::new();
            while let Ok(f) = std::fs::File::open("/dev/null") {
                fillers.push(f);
            }
            AtLimit { fillers, limits }
        }
    }

    impl Drop for AtLimit {
        fn drop(&mut self) {
            use nix::sys::resource::{setrlimit, Resource};
            self.fillers.clear();
            let _ = setrlimit(Resource::RLIMIT_NOFILE, self.limits.0, self.limits.1);
        }
    }

    /// The tests count this process's descriptors: run them one at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").expect("fds").count()
    }

    /// F1: extra descriptors, a wrong type, a truncated control buffer and
    /// 10,000 messages: each bad one rejected, every descriptor closed, the
    /// descriptor count steady; a good one is a connection, close-on-exec.
    #[test]
    fn f1_bad_messages_are_rejected_and_every_descriptor_closed() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (master, worker) = pair();
        let mut w = FdpassAcceptor::from_channel(worker);
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        let file = std::fs::File::open("/proc/self/stat").expect("file");
        let before = open_fds();
        for round in 0..10_000 {
            let (data, fds): (&[u8], Vec<RawFd>) = match round % 5 {
                0 => (CONN, vec![b.as_raw_fd(), a.as_raw_fd()]), // two descriptors
                1 => (CONN, vec![file.as_raw_fd()]),             // not a socket
                2 => (CONN, vec![b.as_raw_fd(); 20]),            // more than fits: MSG_CTRUNC
                3 => (b"junk", vec![b.as_raw_fd()]),             // wrong payload
                _ => (CONN, vec![]),                             // no descriptor
            };
            sys::send_with_fds(master.as_fd(), data, &fds).expect("send");
            assert!(
                matches!(w.receive(true).expect("receive"), Accepted::Idle),
                "round {round}"
            );
            // Drain the worker's idle replies.
            while let Ok(Some(_)) = sys::recv_with_fds(master.as_fd(), true) {}
        }
        assert_eq!(open_fds(), before, "no descriptor leaked");
        assert_eq!(w.rejected(), 10_000);
        // A good message is a connection, close-on-exec.
        sys::send_with_fds(master.as_fd(), CONN, &[b.as_raw_fd()]).expect("send");
        match w.receive(true).expect("receive") {
            Accepted::Connection(c) => {
                let flags = nix::fcntl::fcntl(&c, nix::fcntl::FcntlArg::F_GETFD).expect("getfd");
                assert_ne!(flags & libc::FD_CLOEXEC, 0);
            }
            Accepted::Idle => panic!("a good message was rejected"),
        }
    }

    /// The message names the connection's listener and its kind: a Unix
    /// connection from listener 2 arrives as one (other strategies report
    /// the listener index too).
    #[test]
    fn the_listener_index_and_kind_travel_with_the_connection() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (master, worker) = pair();
        let mut w = FdpassAcceptor::from_channel(worker);
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let conn = Conn {
            sock: Socket::from(OwnedFd::from(a)),
            listener: 2,
            unix: true,
        };
        sys::send_with_fds(master.as_fd(), &conn.message(), &[conn.sock.as_raw_fd()])
            .expect("send");
        match w.receive(true).expect("receive") {
            Accepted::Connection(c) => {
                assert_eq!(c.listener(), 2);
                assert!(matches!(c.stream(), prefork_core::Stream::Unix(_)));
            }
            Accepted::Idle => panic!("rejected"),
        }
    }

    /// A master side with slots 0 and 1, and the two workers' sides on
    /// their channels (no fork).
    fn master_with_two_workers() -> (Fdpass, FdpassAcceptor, FdpassAcceptor) {
        let mut m = Fdpass::new();
        m.prepare(&[]).expect("prepare");
        let mut take = |s: usize| {
            m.prepare_slot(s, &[]).expect("slot");
            FdpassAcceptor::from_channel(
                m.slots[s]
                    .as_mut()
                    .and_then(|c| c.worker.take())
                    .expect("end"),
            )
        };
        let (w0, w1) = (take(0), take(1));
        (m, w0, w1)
    }

    /// A client connects and sends `ping`; worker 0 (the only idle one)
    /// is sent the connection. Returns the listener, the client and the
    /// master's end of worker 0's channel.
    fn ping_sent_to_worker_0(
        m: &mut Fdpass,
        w0: &mut FdpassAcceptor,
    ) -> (TcpListener, TcpStream, RawFd) {
        use std::io::Write;
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        client.write_all(b"ping").expect("send");
        w0.init().expect("idle");
        let fd0 = m.slots[0].as_ref().expect("ch").master.as_raw_fd();
        m.master_ready(fd0);
        m.dispatch(tcp(l.accept().expect("accept").0));
        (l, client, fd0)
    }

    #[test]
    fn the_master_hands_connections_only_to_idle_workers_round_robin() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (mut m, mut w0, mut w1) = master_with_two_workers();
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let conn = || {
            let _c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
            Socket::from(l.accept().expect("accept").0)
        };
        // Nobody idle yet: kept, not sent.
        m.dispatch(tcp(conn()));
        assert_eq!(m.pending.len(), 1);
        w0.init().expect("idle");
        w1.init().expect("idle");
        for s in 0..2 {
            let fd = m.slots[s].as_ref().expect("ch").master.as_raw_fd();
            m.master_ready(fd);
        }
        assert!(
            m.pending.is_empty(),
            "the kept connection went to the first idle worker"
        );
        m.dispatch(tcp(conn()));
        assert!(matches!(
            w0.receive(true).expect("w0"),
            Accepted::Connection(_)
        ));
        assert!(matches!(
            w1.receive(true).expect("w1"),
            Accepted::Connection(_)
        ));
        // Both busy: the next one waits.
        m.dispatch(tcp(conn()));
        assert_eq!(m.pending.len(), 1);
        assert!(
            m.master_fds().len() == 2,
            "listeners are not polled while nobody is idle"
        );
    }

    /// accept(2) failing with EMFILE pauses accepting instead of spinning:
    /// the listener leaves the poll set, the connection stays in the
    /// kernel's backlog, and it is handed over once the pause is over.
    #[test]
    fn emfile_pauses_accept_and_loses_nothing() {
        use std::io::{Read, Write};
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let std_l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = std_l.local_addr().expect("addr");
        let listener =
            Listener::from_socket(Socket::from(std_l), prefork_core::ListenAddr::Tcp(addr));
        let mut m = Fdpass::new();
        m.prepare(std::slice::from_ref(&listener)).expect("prepare");
        m.prepare_slot(0, &[]).expect("slot");
        let mut w0 = FdpassAcceptor::from_channel(
            m.slots[0]
                .as_mut()
                .and_then(|c| c.worker.take())
                .expect("end"),
        );
        w0.init().expect("idle");
        let ch = m.slots[0].as_ref().expect("ch").master.as_raw_fd();
        m.master_ready(ch);
        let lfd = m.listeners[0].0.as_raw_fd();
        assert!(
            m.master_fds().iter().any(|f| f.as_raw_fd() == lfd),
            "an idle worker: the listener is polled"
        );
        let mut client = TcpStream::connect(addr).expect("connect");
        client.write_all(b"ping").expect("send");

        let at_limit = AtLimit::new();
        m.master_ready(lfd);
        let paused = m.accept_paused();
        let polled = m.master_fds().iter().any(|f| f.as_raw_fd() == lfd);
        drop(at_limit);
        assert!(paused, "EMFILE paused accepting");
        assert!(!polled, "a paused listener is not polled (no spinning)");
        assert_eq!(m.passed(), 0);

        // The pause ends (at most 100 ms): the connection, still in the
        // backlog, goes to the idle worker intact.
        m.accept_paused_until = Some(MonoTime::now());
        m.master_ready(lfd);
        assert_eq!(m.passed(), 1);
        let Accepted::Connection(mut c) = w0.receive(true).expect("w0") else {
            panic!("worker 0 got nothing");
        };
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).expect("the request is intact");
        assert_eq!(&buf, b"ping");
    }

    /// A worker killed with a connection still in its channel (it never took
    /// it) loses nothing: the master hands its copy to another worker, and
    /// the client is served. One that took it (counted) loses only that one.
    #[test]
    fn a_connection_the_dead_worker_never_took_goes_to_another_worker() {
        use std::io::{Read, Write};
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (mut m, mut w0, mut w1) = master_with_two_workers();
        // Only worker 0 is idle: the connection is sent to it.
        let (l, mut client, fd0) = ping_sent_to_worker_0(&mut m, &mut w0);
        assert!(m.slots[0].as_ref().expect("ch").held.is_some());
        // Worker 0 dies without receiving it: its end closes.
        drop(w0);
        m.master_ready(fd0);
        assert_eq!((m.rescued, m.lost), (1, 0));
        assert_eq!(m.pending.len(), 1, "kept for the next idle worker");
        w1.init().expect("idle");
        let fd1 = m.slots[1].as_ref().expect("ch").master.as_raw_fd();
        m.master_ready(fd1);
        assert!(m.pending.is_empty());
        let Accepted::Connection(mut c) = w1.receive(true).expect("w1") else {
            panic!("worker 1 got nothing");
        };
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).expect("the request is intact");
        assert_eq!(&buf, b"ping");
        c.write_all(b"pong").expect("reply");
        // The worker loop calls this before closing: the master still holds
        // its copy, so without it the client would not see the end.
        w1.closing(&c);
        drop(c);
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).expect("read");
        assert_eq!(reply, b"pong");
        // A connection worker 1 counted as received is its own: if it dies
        // now, that one is lost (and not sent twice).
        let mut client2 = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        w1.done();
        m.master_ready(fd1);
        m.dispatch(tcp(l.accept().expect("accept").0));
        // (This test's acceptors have no counter: count for worker 1 what a
        // forked worker counts itself, both connections it received.)
        let (cell, sent) = m.slots[1].as_ref().map(|c| (c.cell, c.sent)).expect("ch");
        assert_eq!(sent, 2);
        m.receipts.as_ref().expect("map").as_slice_of::<AtomicU64>()[cell]
            .store(sent, Ordering::Release);
        drop(w1);
        m.master_ready(fd1);
        assert_eq!((m.rescued, m.lost), (1, 1));
        assert!(m.pending.is_empty());
        client2
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let mut rest = Vec::new();
        let _ = client2.read_to_end(&mut rest);
        assert!(rest.is_empty(), "closed, not served");
    }

    /// On a quiet server the master's copy of the last connection is
    /// released at a turn once 100 ms old, not kept until another connection
    /// comes;
    /// and a slot's channel is closed as soon as its worker is gone (a slot
    /// retired by TTOU may never be used again).
    #[test]
    fn a_quiet_master_keeps_no_copy_and_no_dead_channel() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (mut m, mut w0, w1) = master_with_two_workers();
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let _client = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        w0.init().expect("idle");
        let fd0 = m.slots[0].as_ref().expect("ch").master.as_raw_fd();
        m.master_ready(fd0);
        m.dispatch(tcp(l.accept().expect("accept").0));
        assert!(m.slots[0].as_ref().expect("ch").held.is_some());
        let Accepted::Connection(_c) = w0.receive(true).expect("w0") else {
            panic!("worker 0 got nothing");
        };
        // What a forked worker counts itself on receiving it.
        let cell = m.slots[0].as_ref().expect("ch").cell;
        m.receipts.as_ref().expect("map").as_slice_of::<AtomicU64>()[RECEIVED + cell]
            .store(1, Ordering::SeqCst);
        // A fresh copy waits for the next hand-over (its teardown must not
        // delay the next connection); one 100 ms old goes at the next turn.
        m.master_turn();
        assert!(m.slots[0].as_ref().expect("ch").held.is_some());
        if let Some((_, at)) = m.slots[0].as_mut().and_then(|c| c.held.as_mut()) {
            *at = MonoTime::now() - std::time::Duration::from_millis(150);
        }
        m.master_turn();
        assert!(
            m.slots[0].as_ref().expect("ch").held.is_none(),
            "released at the next turn"
        );
        let fd1 = m.slots[1].as_ref().expect("ch").master.as_raw_fd();
        m.slot_retired(1);
        drop(w1);
        m.master_ready(fd1);
        assert!(m.slots[1].is_none(), "the dead worker's channel is closed");
        assert!(!m.master_fds().iter().any(|f| f.as_raw_fd() == fd1));
    }

    /// L14 for fdpass: a worker at its descriptor limit cannot take the
    /// descriptor (the message comes with MSG_CTRUNC and without it). It
    /// hands the connection back and backs off (EMFILE); the master, which
    /// still holds its copy, hands it on, and once the limit is relieved the
    /// connection is served with its bytes intact. Nothing is lost.
    #[test]
    fn a_worker_at_its_descriptor_limit_hands_the_connection_back() {
        use std::io::Read;
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (mut m, mut w0, _w1) = master_with_two_workers();
        let (_l, _client, fd0) = ping_sent_to_worker_0(&mut m, &mut w0);
        assert_eq!(m.slots[0].as_ref().expect("ch").sent, 1);

        // No descriptor number left for the worker side to receive into.
        let at_limit = AtLimit::new();
        let got = w0.receive(true);
        drop(at_limit);
        let err = got.expect_err("EMFILE, not a connection");
        assert_eq!(err.raw_os_error(), Some(libc::EMFILE), "{err}");
        assert_eq!(w0.rejected(), 0, "handed back, not rejected");

        // The master takes it back and hands it on (here: to the same
        // worker, the only idle one, now relieved).
        m.master_ready(fd0);
        assert_eq!((m.returned, m.lost), (1, 0));
        assert!(m.pending.is_empty(), "handed on at once");
        let Accepted::Connection(mut c) = w0.receive(true).expect("w0") else {
            panic!("worker 0 got nothing after relief");
        };
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).expect("the request is intact");
        assert_eq!(&buf, b"ping");
    }
}
