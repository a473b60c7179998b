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

#![deny(missing_docs)]

mod sys;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::poll::{PollFd, PollFlags};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use prefork_core::clock::poll_timeout;
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

#[derive(Debug)]
struct Channel {
    master: OwnedFd,
    /// The worker's end, until the worker takes it after fork.
    worker: Option<OwnedFd>,
    idle: bool,
    /// A connection was sent and no `D` came back yet.
    outstanding: bool,
    /// EOF seen, or the slot retired: never send again.
    closed: bool,
}

/// The fdpass strategy (master side).
#[derive(Debug, Default)]
pub struct Fdpass {
    /// The master's polling copies of the listeners (same descriptions).
    listeners: Vec<Socket>,
    slots: Vec<Option<Channel>>,
    /// Where the search for an idle worker starts (round robin).
    next: usize,
    /// Accepted but not yet handed over (a send failed): bounded by the
    /// number of slots, because the master accepts only for idle workers.
    pending: VecDeque<Socket>,
    /// Connections handed over, and those lost in a dead worker's hands.
    passed: u64,
    lost: u64,
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
                    self.next = (i + 1) % n;
                    self.passed += 1;
                    return; // `conn` is closed here; the worker has its own copy
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

    fn read_channel(&mut self, slot: usize) {
        loop {
            let Some(ch) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            match sys::recv_with_fds(ch.master.as_fd(), true) {
                Ok(Some(msg)) => {
                    // Workers send no descriptors; any that came are closed
                    // with `msg`.
                    if msg.data == IDLE && msg.fds.is_empty() && !ch.closed {
                        ch.idle = true;
                        ch.outstanding = false;
                    } else {
                        tracing::warn!("fdpass: worker {slot} sent a malformed message; ignored");
                    }
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {
                    return; // read everything there was
                }
                // EOF, or a reset: the worker is gone.
                Ok(None) | Err(_) => {
                    if ch.outstanding {
                        self.lost += 1;
                        tracing::warn!("fdpass: worker {slot} died holding a connection");
                    }
                    ch.idle = false;
                    ch.outstanding = false;
                    ch.closed = true;
                    return;
                }
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
        // An earlier worker of the slot (a reload) keeps serving what it
        // holds: a connection still in its channel stays readable there.
        // Read its pending reports first: closing a Unix socket with unread
        // data resets the other end.
        self.read_channel(slot);
        self.slots[slot] = Some(Channel {
            master,
            worker: Some(worker),
            idle: false,
            outstanding: false,
            closed: false,
        });
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
        let chan = self
            .slots
            .get_mut(slot)
            .and_then(Option::as_mut)
            .and_then(|c| c.worker.take())
            .ok_or_else(|| io::Error::other(format!("no channel for slot {slot}")))?;
        Ok(FdpassAcceptor {
            chan,
            closed: false,
            rejected: 0,
        })
    }

    fn master_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds: Vec<BorrowedFd<'_>> = self
            .slots
            .iter()
            .flatten()
            .filter(|c| !c.closed)
            .map(|c| c.master.as_fd())
            .collect();
        // No idle worker: leave connections in the kernel's backlog.
        if self.pending.is_empty() && self.any_idle() {
            fds.extend(self.listeners.iter().map(AsFd::as_fd));
        }
        fds
    }

    fn master_ready(&mut self, fd: RawFd) {
        if let Some(slot) = self
            .slots
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.master.as_raw_fd() == fd))
        {
            self.read_channel(slot);
            self.deliver_pending();
        }
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
            "fdpass: {} connections handed to workers, {} lost with workers that died holding them",
            self.passed,
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
}

impl FdpassAcceptor {
    /// A worker side on its end of a channel (for tests and custom masters).
    pub fn from_channel(chan: OwnedFd) -> FdpassAcceptor {
        FdpassAcceptor {
            chan,
            closed: false,
            rejected: 0,
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

    #[test]
    fn the_master_hands_connections_only_to_idle_workers_round_robin() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let mut m = Fdpass::new();
        let (w0, w1) = {
            m.prepare_slot(0, &[]).expect("slot 0");
            m.prepare_slot(1, &[]).expect("slot 1");
            let take = |m: &mut Fdpass, s: usize| {
                FdpassAcceptor::from_channel(
                    m.slots[s]
                        .as_mut()
                        .and_then(|c| c.worker.take())
                        .expect("end"),
                )
            };
            (take(&mut m, 0), take(&mut m, 1))
        };
        let (mut w0, mut w1) = (w0, w1);
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
}
