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

mod sys;

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::poll::{PollFd, PollFlags};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use prefork_core::clock::poll_timeout;
use prefork_core::sys::SharedMap;
use prefork_core::{
    AcceptContext, AcceptStrategy, Accepted, Connection, Error, Listener, Result, WorkerAcceptor,
};
use socket2::{Domain, Socket, Type};

/// "Here is a connection" (master → worker), with one descriptor.
const CONN: &[u8] = b"C";
/// "I am idle" (worker → master): after boot and after each connection.
const IDLE: &[u8] = b"D";

fn strategy_err(reason: String) -> Error {
    Error::Strategy {
        strategy: "fdpass",
        reason,
    }
}

/// Receipt counters: one per channel alive at once (a full pool, its
/// replacements during a reload, and those still stopping).
const CELLS: usize = 4 * prefork_core::supervisor::MAX_WORKERS;

#[derive(Debug)]
struct Channel {
    master: OwnedFd,
    /// The worker's end, until the worker takes it after fork.
    worker: Option<OwnedFd>,
    /// Its receipt counter in the shared map.
    cell: usize,
    /// Connections sent on it.
    sent: u64,
    idle: bool,
    /// A connection was sent and no `D` came back yet.
    outstanding: bool,
    /// The master's copy of the last connection sent, kept until the worker
    /// counted it as received.
    held: Option<Socket>,
    /// The slot retired, or the channel was replaced or failed: never send
    /// on it again (it is still read until EOF).
    closed: bool,
    /// EOF seen: the worker is gone.
    eof: bool,
}

/// How many connections the worker of receipt `cell` counted as received.
fn receipt_count(map: Option<&SharedMap>, cell: usize) -> u64 {
    map.and_then(|m| m.as_slice_of::<AtomicU64>().get(cell))
        .map_or(0, |c| c.load(Ordering::Acquire))
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
    /// The master's polling copies of the listeners (same descriptions).
    listeners: Vec<Socket>,
    slots: Vec<Option<Channel>>,
    /// Channels replaced in their slot (a reload, a respawn) whose worker may
    /// still be alive: read until EOF.
    old: Vec<Channel>,
    /// Receipt counters, shared with the workers.
    receipts: Option<SharedMap>,
    /// Free receipt cells.
    free: Vec<usize>,
    /// Where the search for an idle worker starts (round robin).
    next: usize,
    /// Accepted but not yet handed over (a send failed): bounded by the
    /// number of slots, because the master accepts only for idle workers.
    pending: VecDeque<Socket>,
    /// Connections handed over, those lost in a dead worker's hands, and
    /// those handed again after a worker died before taking them.
    passed: u64,
    lost: u64,
    rescued: u64,
}

impl Fdpass {
    /// Creates the strategy.
    pub fn new() -> Fdpass {
        Fdpass::default()
    }

    fn any_idle(&self) -> bool {
        self.slots.iter().flatten().any(|c| c.idle && !c.closed)
    }

    /// Hands `conn` to an idle worker, or keeps it for the next one.
    fn dispatch(&mut self, conn: Socket) {
        let n = self.slots.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            let Some(ch) = self.slots[i].as_mut() else {
                continue;
            };
            if !ch.idle || ch.closed {
                continue;
            }
            match sys::send_with_fds(ch.master.as_fd(), CONN, &[conn.as_raw_fd()]) {
                Ok(()) => {
                    ch.idle = false;
                    ch.outstanding = true;
                    ch.sent += 1;
                    // Kept until the worker counts it received (see above).
                    ch.held = Some(conn);
                    self.next = (i + 1) % n;
                    self.passed += 1;
                    return;
                }
                Err(e) => {
                    tracing::warn!("fdpass: sending to worker {i} failed: {e}; trying another");
                    ch.idle = false;
                    ch.closed = true;
                }
            }
        }
        self.pending.push_back(conn);
    }

    fn accept_ready(&mut self) {
        // Accept only as many as there are idle workers.
        while self.pending.is_empty() && self.any_idle() {
            let mut got = None;
            for l in &self.listeners {
                match l.accept() {
                    Ok((s, _)) => {
                        got = Some(s);
                        break;
                    }
                    Err(e)
                        if e.raw_os_error() == Some(libc::EMFILE)
                            || e.raw_os_error() == Some(libc::ENFILE) =>
                    {
                        tracing::warn!("fdpass: accept failed: {e}");
                        return;
                    }
                    Err(_) => {} // EAGAIN, ECONNABORTED: next listener
                }
            }
            match got {
                Some(s) => self.dispatch(s),
                None => return,
            }
        }
    }

    /// Reads everything on a channel: `D` reports, or the EOF that says its
    /// worker is gone (then a connection it never took is handed on).
    fn read_channel(&mut self, which: Which) {
        let ch = match which {
            Which::Slot(i) => self.slots.get_mut(i).and_then(Option::as_mut),
            Which::Old(i) => self.old.get_mut(i),
        };
        let Some(ch) = ch else { return };
        while !ch.eof {
            match sys::recv_with_fds(ch.master.as_fd(), true) {
                Ok(Some(msg)) => {
                    // Workers send no descriptors; any that came are closed
                    // with `msg`.
                    if msg.data == IDLE && msg.fds.is_empty() {
                        ch.outstanding = false;
                        ch.held = None; // served: the worker had it
                        ch.idle = !ch.closed;
                    } else {
                        tracing::warn!("fdpass: a worker sent a malformed message; ignored");
                    }
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {
                    return; // read everything there was
                }
                // EOF, or a reset: the worker is gone.
                Ok(None) | Err(_) => {
                    ch.idle = false;
                    ch.closed = true;
                    ch.eof = true;
                    let took = receipt_count(self.receipts.as_ref(), ch.cell) >= ch.sent;
                    match ch.held.take() {
                        Some(conn) if !took => {
                            // It died before taking it: nothing was read.
                            self.rescued += 1;
                            tracing::info!(
                                "fdpass: a worker died before taking the connection sent to it; handing it to another"
                            );
                            self.pending.push_front(conn);
                        }
                        _ if ch.outstanding => {
                            self.lost += 1;
                            tracing::warn!("fdpass: a worker died holding a connection");
                        }
                        _ => {}
                    }
                    ch.outstanding = false;
                    self.free.push(ch.cell);
                }
            }
        }
    }

    /// Closes the master's copies the workers have counted as received.
    fn release_received(&mut self) {
        let map = self.receipts.as_ref();
        let chans = self.slots.iter_mut().flatten().chain(self.old.iter_mut());
        for ch in chans.filter(|c| c.held.is_some()) {
            if receipt_count(map, ch.cell) >= ch.sent {
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
            self.listeners.push(dup);
        }
        let map = SharedMap::new(CELLS * std::mem::size_of::<AtomicU64>())
            .map_err(|e| Error::sys("mmap() for the fdpass receipt counters", e))?;
        self.receipts = Some(map);
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
        if let Some(c) = self
            .receipts
            .as_ref()
            .and_then(|m| m.as_slice_of::<AtomicU64>().get(cell))
        {
            c.store(0, Ordering::Release);
        }
        // An earlier worker of the slot (a reload, or one that died and is
        // not yet seen gone) keeps its channel until its EOF: it may still
        // serve what it holds, and a connection it never took is handed on.
        let previous = self.slots[slot].replace(Channel {
            master,
            worker: Some(worker),
            cell,
            sent: 0,
            idle: false,
            outstanding: false,
            held: None,
            closed: false,
            eof: false,
        });
        if let Some(mut prev) = previous {
            prev.idle = false;
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
        })
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
        // No idle worker: leave connections in the kernel's backlog.
        if self.pending.is_empty() && self.any_idle() {
            fds.extend(self.listeners.iter().map(AsFd::as_fd));
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
            self.old.retain(|c| !c.eof);
        }
        self.release_received();
        self.deliver_pending();
        self.accept_ready();
    }

    // worker_exited is not used: a slot may hold two workers during a
    // reload, and the slot's channel may already be the new one's. Each
    // channel belongs to exactly one worker, and its EOF (read_channel) says
    // precisely when that worker is gone.

    fn slot_retired(&mut self, slot: usize) {
        if let Some(ch) = self.slots.get_mut(slot).and_then(Option::as_mut) {
            ch.idle = false;
            ch.closed = true;
        }
    }

    fn shutdown(&mut self) {
        tracing::info!(
            "fdpass: {} connections handed to workers, {} handed again after a worker died before taking them, {} lost with workers that died holding them",
            self.passed,
            self.rescued,
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
    /// This worker's receipt counter (absent for a bare channel in tests).
    receipt: Option<(SharedMap, usize)>,
}

impl FdpassAcceptor {
    /// A worker side on its end of a channel (for tests and custom masters).
    pub fn from_channel(chan: OwnedFd) -> FdpassAcceptor {
        FdpassAcceptor {
            chan,
            closed: false,
            rejected: 0,
            receipt: None,
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
        let well_formed =
            !msg.truncated && !msg.foreign_cmsg && msg.data == CONN && msg.fds.len() == 1;
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
        let unix = match (sock.r#type(), sock.domain()) {
            (Ok(t), Ok(d)) if t == Type::STREAM => d == Domain::UNIX,
            _ => return Ok(self.reject("the descriptor is not a stream socket".into())),
        };
        // Counted before a byte is read: from here on the master must not
        // hand this connection to anyone else.
        if let Some((map, cell)) = &self.receipt {
            if let Some(c) = map.as_slice_of::<AtomicU64>().get(*cell) {
                c.fetch_add(1, Ordering::AcqRel);
            }
        }
        Ok(Accepted::Connection(Connection::from_socket(sock, unix, 0)))
    }

    fn reject(&mut self, why: String) -> Accepted {
        self.rejected += 1;
        if self.rejected <= 3 || self.rejected.is_power_of_two() {
            tracing::warn!(
                "fdpass: rejected a message from the master ({why}); {} so far",
                self.rejected
            );
        }
        // Tell the master this worker is still idle.
        let _ = sys::send_with_fds(self.chan.as_fd(), IDLE, &[]);
        Accepted::Idle
    }
}

impl WorkerAcceptor for FdpassAcceptor {
    fn init(&mut self) -> io::Result<()> {
        sys::send_with_fds(self.chan.as_fd(), IDLE, &[])
    }

    fn accept(&mut self, ctx: &AcceptContext<'_>) -> io::Result<Accepted> {
        let mut fds = vec![PollFd::new(ctx.master_alive, PollFlags::POLLIN)];
        if !self.closed {
            fds.push(PollFd::new(self.chan.as_fd(), PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut fds, poll_timeout(Some(ctx.tick))) {
            Ok(0) | Err(nix::Error::EINTR) => return Ok(Accepted::Idle),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        let chan_ready = fds
            .get(1)
            .and_then(PollFd::revents)
            .is_some_and(|r| !r.is_empty());
        drop(fds);
        if chan_ready {
            return self.receive(true);
        }
        Ok(Accepted::Idle)
    }

    fn closing(&mut self, conn: &Connection) {
        // The master may still hold its copy: send the FIN now.
        let _ = conn.shutdown(Shutdown::Write);
    }

    fn done(&mut self) {
        if !self.closed {
            let _ = sys::send_with_fds(self.chan.as_fd(), IDLE, &[]);
        }
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

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
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
        m.dispatch(conn());
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
        m.dispatch(conn());
        assert!(matches!(
            w0.receive(true).expect("w0"),
            Accepted::Connection(_)
        ));
        assert!(matches!(
            w1.receive(true).expect("w1"),
            Accepted::Connection(_)
        ));
        // Both busy: the next one waits.
        m.dispatch(conn());
        assert_eq!(m.pending.len(), 1);
        assert!(
            m.master_fds().len() == 2,
            "listeners are not polled while nobody is idle"
        );
    }

    /// A worker killed with a connection still in its channel (it never took
    /// it) loses nothing: the master hands its copy to another worker, and
    /// the client is served. One that took it (counted) loses only that one.
    #[test]
    fn a_connection_the_dead_worker_never_took_goes_to_another_worker() {
        use std::io::{Read, Write};
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (mut m, mut w0, mut w1) = master_with_two_workers();
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        client.write_all(b"ping").expect("send");
        // Only worker 0 is idle: the connection is sent to it.
        w0.init().expect("idle");
        let fd0 = m.slots[0].as_ref().expect("ch").master.as_raw_fd();
        m.master_ready(fd0);
        m.dispatch(Socket::from(l.accept().expect("accept").0));
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
        m.dispatch(Socket::from(l.accept().expect("accept").0));
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
}
