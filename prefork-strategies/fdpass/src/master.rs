//! The master side: accepts when a worker is idle, hands each connection
//! over its worker's channel, and keeps its own copy until the worker has
//! counted it as received.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use prefork_core::clock::MonoTime;
use prefork_core::{AcceptStrategy, Error, Framing, Listener, MasterIo, Prepare, Result};
use socket2::Socket;

use crate::front::{Dispatch, Front, FrontConfig};
use crate::protocol::{
    parse_kept, Receipts, RequestHeader, CELLS, HEADER, IDLE, KEPT, MAX_INLINE, RETURNED,
};
use crate::sys;
use crate::worker::FdpassAcceptor;

fn strategy_err(reason: String) -> Error {
    Error::Strategy {
        strategy: "fdpass",
        reason,
    }
}

#[derive(Debug)]
pub(crate) struct Channel {
    /// The slot of its worker.
    pub(crate) slot: usize,
    pub(crate) master: OwnedFd,
    /// The worker's end, until the worker takes it after fork.
    pub(crate) worker: Option<OwnedFd>,
    /// Its counters in the shared map.
    pub(crate) cell: usize,
    /// Connections sent on it.
    pub(crate) sent: u64,
    /// Its worker said it is ready (its first `D`).
    pub(crate) booted: bool,
    /// `D` reports after the first: each follows a finished connection.
    pub(crate) reports: u64,
    /// The master's copy of the last connection sent, and when it was sent,
    /// kept until the worker counted it as received.
    pub(crate) held: Option<(Conn, MonoTime)>,
    /// The slot retired, or the channel was replaced or failed: never send
    /// on it again (it is still read until EOF).
    pub(crate) closed: bool,
    /// EOF seen: the worker is gone.
    pub(crate) eof: bool,
}

/// A connection the master accepted (or took back), the listener it came
/// in on, and what it knows of it: the bytes it read (a whole request, when
/// it buffers requests) and the requests served on it before.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) sock: Socket,
    pub(crate) listener: u16,
    pub(crate) unix: bool,
    pub(crate) bytes: Vec<u8>,
    pub(crate) requests: u32,
}

impl Conn {
    /// A connection just accepted, nothing read.
    pub(crate) fn accepted(sock: Socket, listener: u16, unix: bool) -> Conn {
        Conn {
            sock,
            listener,
            unix,
            bytes: Vec::new(),
            requests: 0,
        }
    }

    /// The message that hands it to a worker, and the memfd that carries
    /// its bytes when they are more than a message holds.
    pub(crate) fn message(&self) -> std::io::Result<(Vec<u8>, Option<OwnedFd>)> {
        let in_memfd = self.bytes.len() > MAX_INLINE;
        let header = RequestHeader {
            unix: self.unix,
            listener: self.listener,
            requests: self.requests,
            in_memfd,
        }
        .encode();
        if !in_memfd {
            let mut m = Vec::with_capacity(HEADER + self.bytes.len());
            m.extend_from_slice(&header);
            m.extend_from_slice(&self.bytes);
            return Ok((m, None));
        }
        let memfd = nix::sys::memfd::memfd_create(
            c"prefork-request",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )?;
        let mut file = std::fs::File::from(memfd);
        std::io::Write::write_all(&mut file, &self.bytes)?;
        Ok((header.to_vec(), Some(OwnedFd::from(file))))
    }
}

impl Channel {
    /// Connections its worker finished: its shared counter, or the `D`
    /// reports when they are ahead (a worker without the shared map).
    fn finished(&self, map: Option<&Receipts>) -> u64 {
        map.map_or(0, |m| m.finished(self.cell)).max(self.reports)
    }

    /// Its worker has taken every connection sent (it counts one before
    /// reading a byte of it, and finishing implies taking).
    fn took_all(&self, map: Option<&Receipts>) -> bool {
        map.map_or(0, |m| m.received(self.cell)) >= self.sent || self.finished(map) >= self.sent
    }

    /// Ready, not closed, and done with everything sent to it.
    fn idle(&self, map: Option<&Receipts>) -> bool {
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
    pub(crate) listeners: Vec<(Socket, bool)>,
    /// Per listener: poll(2) said readable and accept(2) has not yet found
    /// it empty. Only these are tried, so an idle listener costs no
    /// accept(2) per connection of another.
    pub(crate) readable: Vec<bool>,
    /// accept(2) hit the descriptor limit: the listeners are left alone
    /// until then, instead of spinning on a readable listener (the master
    /// wakes at least once a second, so it resumes within one).
    pub(crate) accept_paused_until: Option<MonoTime>,
    pub(crate) slots: Vec<Option<Channel>>,
    /// Channels replaced in their slot (a reload, a respawn) whose worker may
    /// still be alive: read until EOF.
    pub(crate) old: Vec<Channel>,
    /// Counters shared with the workers.
    pub(crate) receipts: Option<Receipts>,
    /// Free counter cells.
    pub(crate) free: Vec<usize>,
    /// Where the search for an idle worker starts (round robin).
    pub(crate) next: usize,
    /// Accepted but not yet handed over (a send failed): bounded by the
    /// number of slots, because the master accepts only for idle workers.
    pub(crate) pending: VecDeque<Conn>,
    /// Connections handed over, those lost in a dead worker's hands, and
    /// those handed again after a worker died before taking them.
    pub(crate) passed: u64,
    pub(crate) lost: u64,
    pub(crate) rescued: u64,
    /// Connections a worker at its descriptor limit could not take.
    pub(crate) returned: u64,
    /// The front's settings; `None` for plain dispatch at accept.
    front_cfg: Option<FrontConfig>,
    /// The connections the master holds (the front), once prepared.
    pub(crate) front: Option<Front>,
    /// New connections go through the front: it exists and the app has
    /// framing (one without is dispatched at accept). Set at each turn.
    pub(crate) front_active: bool,
    /// The master is stopping: park nothing more, and through the front
    /// accept nothing more (what it holds is still handed over).
    stopping: bool,
    /// Connections workers handed back to be parked.
    pub(crate) kept: u64,
    /// Descriptors kept free for connections handed back: see
    /// [`Reserve`].
    pub(crate) reserve: Reserve,
}

/// Descriptors held in reserve for connections handed back (`K`).
///
/// A descriptor passed with SCM_RIGHTS is installed when the master reads
/// the message; at the descriptor limit the kernel cannot, sets MSG_CTRUNC
/// and closes it: the client's kept-alive connection would be lost. So the
/// master holds a few spare descriptors (of /dev/null). Near its limit
/// (accept hit EMFILE, or an accepted descriptor's number came within a
/// margin of the limit), it closes one before each read of a channel, so
/// the next handed-back connection has a place, and it accepts nothing
/// while the reserve is not full again: freed descriptors go to the
/// reserve first. Each worker holds at most one connection, so a reserve
/// of one per channel (plus two) covers every hand-back in flight. Far from
/// the limit it costs nothing per message.
#[derive(Debug, Default)]
pub(crate) struct Reserve {
    spare: Vec<OwnedFd>,
    /// Near the limit until then.
    tight_until: Option<MonoTime>,
    /// RLIMIT_NOFILE (soft), read at each turn.
    limit: u64,
    /// Descriptors in use as of the last accept (its number + 1: every
    /// lower number was taken).
    last_fd: u64,
}

impl Reserve {
    /// Near the limit: accept hit EMFILE lately, or the highest descriptor
    /// accepted is within twice the margin of the limit as read now.
    fn tight(&self, margin: usize) -> bool {
        (self.limit > 0 && self.last_fd + 2 * margin as u64 >= self.limit)
            || self.tight_until.is_some_and(|t| MonoTime::now() < t)
    }

    pub(crate) fn mark_tight(&mut self) {
        self.tight_until = Some(MonoTime::now() + std::time::Duration::from_secs(1));
    }

    /// Fills the reserve up to `target`; true when it is full.
    fn refill(&mut self, target: usize) -> bool {
        self.spare.truncate(target);
        while self.spare.len() < target {
            match std::fs::File::open("/dev/null") {
                Ok(f) => self.spare.push(OwnedFd::from(f)),
                Err(_) => return false,
            }
        }
        true
    }

    /// Rereads the descriptor limit at every turn: it can be lowered from
    /// outside (prlimit(1)) at any moment, and a hand-back read past it is
    /// a lost connection. One getrlimit(2) per turn.
    fn read_limit(&mut self) {
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            self.limit = soft;
        }
    }

    /// An accepted descriptor numbered `fd`: descriptors are allocated
    /// lowest first, so every number below it is in use.
    fn accepted(&mut self, fd: RawFd, margin: usize) {
        self.last_fd = u64::try_from(fd).unwrap_or(0) + 1;
        if self.tight(margin) {
            self.mark_tight();
        }
    }
}

impl Fdpass {
    /// The strategy as the front (the default settings of [`FrontConfig`]):
    /// requests are handed to a worker only when they are whole, and
    /// kept-alive connections are parked in the master.
    pub fn new() -> Fdpass {
        Fdpass::with(FrontConfig::default())
    }

    /// The strategy with these front settings; `Dispatch::AtAccept` is the
    /// plain fdpass: every connection handed over at accept, unread.
    pub fn with(cfg: FrontConfig) -> Fdpass {
        Fdpass {
            front_cfg: (cfg.dispatch == Dispatch::WhenReady).then_some(cfg),
            ..Fdpass::default()
        }
    }

    /// Spare descriptors to hold: one per open channel (a worker that may
    /// hand a connection back), plus two.
    fn reserve_target(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .chain(self.old.iter())
            .filter(|c| !c.eof)
            .count()
            + 2
    }

    pub(crate) fn accept_paused(&self) -> bool {
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
        if let Some(r) = &self.receipts {
            r.set_waiting(on);
        }
    }

    /// After each turn: hand on what can be handed on; then either some
    /// worker is idle and nothing is pending (the listeners are polled, no
    /// `D` is needed), or the flag is up and the next idle worker says so.
    fn settle(&mut self, app: &dyn Framing) {
        loop {
            self.deliver_pending();
            self.accept_ready(app);
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
    pub(crate) fn dispatch(&mut self, conn: Conn) {
        let n = self.slots.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            let Some(ch) = self.slots[i].as_mut() else {
                continue;
            };
            if !ch.idle(self.receipts.as_ref()) {
                continue;
            }
            let (message, memfd) = match conn.message() {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(
                        "fdpass: a memfd for a request's bytes: {e}; closing the connection"
                    );
                    return;
                }
            };
            let fds: &[RawFd] = match &memfd {
                None => &[conn.sock.as_raw_fd()],
                Some(m) => &[conn.sock.as_raw_fd(), m.as_raw_fd()],
            };
            match sys::send_with_fds(ch.master.as_fd(), &message, fds) {
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

    /// Room to accept: the front takes connections while it holds fewer
    /// than its limit; plain dispatch only as many as there are idle
    /// workers (the rest wait in the kernel's backlog).
    fn room(&self) -> bool {
        // Stopping, the front takes nothing new in (it drains what it
        // holds); plain dispatch still hands a connection already waiting
        // to an idle worker, as before the workers are told to stop.
        if self.stopping && self.front_active {
            return false;
        }
        match (&self.front, self.front_active) {
            (Some(f), true) => f.len() + self.pending.len() < f.config().max_connections,
            _ => self.pending.is_empty() && self.any_idle(),
        }
    }

    fn accept_ready(&mut self, app: &dyn Framing) {
        // From the listeners poll(2) found readable, each until it is empty.
        if self.accept_paused() {
            return;
        }
        // Descriptors freed since go to the reserve first.
        let target = self.reserve_target();
        if self.reserve.spare.len() < target && !self.reserve.refill(target) {
            self.reserve.mark_tight();
            self.accept_paused_until =
                Some(MonoTime::now() + std::time::Duration::from_millis(100));
            return;
        }
        while self.room() {
            let mut got = None;
            for (i, (l, unix)) in self.listeners.iter().enumerate() {
                if !self.readable.get(i).copied().unwrap_or(false) {
                    continue;
                }
                match l.accept() {
                    Ok((sock, _)) => {
                        self.reserve.accepted(sock.as_raw_fd(), target);
                        got = Some(Conn::accepted(
                            sock,
                            u16::try_from(i).unwrap_or(u16::MAX),
                            *unix,
                        ));
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
                        self.reserve.mark_tight();
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
                Some(conn) => self.take_in(conn, app),
                None if self.readable.iter().any(|&r| r) => {}
                None => return,
            }
        }
    }

    /// A connection to serve: through the front (held until its request is
    /// whole), or straight to a worker.
    fn take_in(&mut self, conn: Conn, app: &dyn Framing) {
        let now = MonoTime::now();
        let ready = match (&mut self.front, self.front_active) {
            (Some(front), true) => front.admit(conn, app, now),
            _ => Some(conn),
        };
        if let Some(conn) = ready {
            self.dispatch(conn);
        }
    }

    /// Reads one message from a ready channel: a `D` report, or the EOF that
    /// says its worker is gone (then a connection it never took is handed
    /// on). One per readiness saves the recvmsg that would only find the
    /// channel empty; poll(2) is level-triggered, so anything more is read
    /// on the next turn.
    fn read_channel(&mut self, which: Which, app: &dyn Framing) {
        if let Some(conn) = self.read_one_message(which) {
            // A kept-alive connection handed back: parked (or, with a
            // pipelined request, reading) in the front.
            self.kept += 1;
            match (&self.front, self.stopping) {
                (Some(_), false) => self.take_kept(conn, app),
                _ => drop(conn), // nothing is held while stopping
            }
        }
    }

    /// A connection a worker handed back after keeping it alive.
    fn take_kept(&mut self, conn: Conn, app: &dyn Framing) {
        let now = MonoTime::now();
        if let Some(ready) = self.front.as_mut().and_then(|f| f.admit(conn, app, now)) {
            self.dispatch(ready);
        }
    }

    /// Reads one message from a channel; returns a connection its worker
    /// handed back.
    fn read_one_message(&mut self, which: Which) -> Option<Conn> {
        if self.reserve.tight(self.reserve_target()) {
            // A place for the descriptor the message may carry.
            drop(self.reserve.spare.pop());
        }
        let ch = match which {
            Which::Slot(i) => self.slots.get_mut(i).and_then(Option::as_mut),
            Which::Old(i) => self.old.get_mut(i),
        };
        let ch = ch.filter(|c| !c.eof)?;
        match sys::recv_with_fds(ch.master.as_fd(), true) {
            Ok(Some(msg)) if msg.data.first() == Some(&KEPT) => {
                // Also the worker's idle report.
                if ch.booted {
                    ch.reports += 1;
                }
                let kept = parse_kept(&msg.data);
                let mut fds = msg.fds.into_iter();
                match (kept, fds.next(), fds.next(), msg.truncated) {
                    (Some(k), Some(fd), None, false) => {
                        let sock = Socket::from(fd);
                        if matches!(sock.r#type(), Ok(t) if t == socket2::Type::STREAM) {
                            return Some(Conn {
                                sock,
                                listener: k.listener,
                                unix: k.unix,
                                bytes: k.ahead.to_vec(),
                                requests: k.requests,
                            });
                        }
                        tracing::warn!("fdpass: a worker handed back a descriptor that is not a stream socket; closed");
                    }
                    _ => tracing::warn!("fdpass: a worker sent a malformed keep-alive message; closed what came with it"),
                }
            }
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
        None
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

    fn master_io(&mut self) -> Option<&mut dyn MasterIo> {
        Some(self)
    }

    fn prepare(&mut self, ctx: Prepare<'_>) -> Result<()> {
        let listeners = ctx.listeners;
        if let Some(cfg) = self.front_cfg {
            self.front = Some(
                Front::new(cfg).map_err(|e| strategy_err(format!("epoll for the front: {e}")))?,
            );
            raise_descriptor_limit(cfg.max_connections);
        }
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
        let map = Receipts::new().map_err(|e| Error::sys("mmap() for the fdpass counters", e))?;
        self.receipts = Some(map);
        // Until the first turn, every worker reports when it is idle.
        self.set_waiting(true);
        self.free = (0..CELLS).rev().collect();
        Ok(())
    }

    fn prepare_slot(&mut self, slot: usize) -> Result<()> {
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
        if let Some(r) = &self.receipts {
            r.reset(cell);
        }
        // An earlier worker of the slot (a reload, or one that died and is
        // not yet seen gone) keeps its channel until its EOF: it may still
        // serve what it holds, and a connection it never took is handed on.
        let previous = self.slots[slot].replace(Channel {
            slot,
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
        Ok(FdpassAcceptor::new(
            chan,
            self.receipts.take().map(|m| (m, cell)),
            self.front.is_some(),
        ))
    }

    fn slot_retired(&mut self, slot: usize) {
        if let Some(ch) = self.slots.get_mut(slot).and_then(Option::as_mut) {
            ch.closed = true;
        }
    }

    fn shutdown(&mut self) {
        tracing::info!(
            "fdpass: {} requests handed to workers, {} kept-alive connections handed back, {} handed again after a worker died before taking them, {} handed again after a worker at its descriptor limit could not take them, {} lost with workers that died holding them",
            self.passed,
            self.kept,
            self.rescued,
            self.returned,
            self.lost
        );
    }
}

/// The master's work in its loop: read the channels, accept for idle
/// workers, and hand on what is pending. Each channel belongs to exactly one
/// worker, and its EOF says precisely when that worker is gone (so no
/// "worker exited" hook is needed: during a reload a slot holds two
/// workers, and the slot's channel may already be the new one's).
impl MasterIo for Fdpass {
    fn worker_spawned(&mut self, slot: usize) {
        // Only the worker may hold its end: the master's copy would keep the
        // channel open after the worker died, and hide its death.
        if let Some(ch) = self.slots.get_mut(slot).and_then(Option::as_mut) {
            ch.worker = None;
        }
    }

    fn turn(&mut self, app: &dyn Framing) {
        self.reserve.read_limit();
        let target = self.reserve_target();
        if self.reserve.spare.len() != target {
            self.reserve.refill(target); // grows, or shrinks with the pool
        }
        self.front_active =
            self.front.is_some() && app.frame(&[]) != prefork_core::Frame::Complete(0);
        if let Some(front) = &mut self.front {
            front.expire(app, MonoTime::now());
        }
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
        // No idle worker: leave connections in the kernel's backlog, and
        // have the next idle worker say so (a retirement since the last turn
        // may have taken the last idle one). `fds` reads the counters again
        // after this: a worker that went idle just before is seen there.
        if !self.any_idle() {
            self.set_waiting(true);
        }
    }

    fn fds(&self) -> Vec<BorrowedFd<'_>> {
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
        // The listeners while there is room (plain dispatch: a worker is
        // idle, and `turn` raised the waiting flag otherwise; the front: it
        // holds fewer than its limit); beyond, connections wait in the
        // kernel's backlog.
        if self.room() && !self.accept_paused() {
            fds.extend(self.listeners.iter().map(|(l, _)| l.as_fd()));
        }
        if let Some(front) = self.front.as_ref().filter(|f| f.len() > 0) {
            fds.push(front.fd());
        }
        fds
    }

    fn next_deadline(&self) -> Option<MonoTime> {
        self.front.as_ref().and_then(Front::next_deadline)
    }

    fn stopping(&mut self, graceful: bool) {
        self.stopping = true;
        if let Some(front) = &mut self.front {
            if graceful {
                front.close_parked();
            } else {
                front.close_all();
            }
        }
    }

    fn held(&self) -> Option<(usize, usize, usize)> {
        self.front.as_ref().map(|f| {
            let h = f.counts(self.pending.len());
            (h.reading, h.queued, h.parked)
        })
    }

    fn ready(&mut self, fd: RawFd, app: &dyn Framing) {
        if self
            .front
            .as_ref()
            .is_some_and(|f| f.fd().as_raw_fd() == fd)
        {
            let mut whole = Vec::new();
            if let Some(front) = &mut self.front {
                front.ready(app, MonoTime::now(), &mut whole);
            }
            for conn in whole {
                self.dispatch(conn);
            }
            self.settle(app);
            return;
        }
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
            self.read_channel(w, app);
            // A channel whose worker is gone is closed at once: a slot
            // retired by TTOU may never be used again, and its channel
            // would stay open for the master's lifetime.
            self.old.retain(|c| !c.eof);
            if let Which::Slot(i) = w {
                if let Some(slot) = self.slots.get_mut(i) {
                    if let Some(gone) = slot.take_if(|c| c.eof) {
                        // A new worker that died before it was ever ready
                        // (a reload whose worker failed to boot): the worker
                        // it was to replace still runs, and serves on.
                        if !gone.booted {
                            if let Some(k) = self.old.iter().rposition(|c| c.slot == i && !c.eof) {
                                let mut back = self.old.remove(k);
                                back.closed = false;
                                tracing::info!("fdpass: slot {i}'s new worker never booted; its previous worker serves on");
                                *slot = Some(back);
                            }
                        }
                    }
                }
            }
        } else if let Some(i) = self.listeners.iter().position(|(l, _)| l.as_raw_fd() == fd) {
            self.readable[i] = true;
        }
        self.settle(app);
    }

    // worker_exited is not used: a slot may hold two workers during a
    // reload, and the slot's channel may already be the new one's. Each
    // channel belongs to exactly one worker, and its EOF (read_channel) says
    // precisely when that worker is gone.
}

/// The front holds up to `max_connections` descriptors: raise the soft
/// RLIMIT_NOFILE to the hard one, and warn when even that is too low.
fn raise_descriptor_limit(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!("fdpass: raising RLIMIT_NOFILE from {soft} to {hard}: {e}");
        }
    }
    // Each held connection is one descriptor; the master needs some more.
    let need = max_connections as u64 + 64;
    if hard < need {
        tracing::warn!(
            "fdpass: RLIMIT_NOFILE is {hard}, below the {need} descriptors --max-connections {max_connections} needs; \
             accepting pauses at the limit (raise it with ulimit -n or LimitNOFILE=)"
        );
    }
}
