//! The front: the connections the fdpass master holds so that no slow or
//! idle client ever holds a worker.
//!
//! A held connection is **reading** (its request is arriving: its bytes are
//! buffered, under the header deadline) or **parked** (kept alive between
//! requests: no buffer, under the keep-alive timeout). When the app's
//! framing says the buffered bytes are one whole request, the connection
//! leaves the front as a [`Conn`] with its bytes, for the master to hand to
//! an idle worker. A worker hands a kept-alive connection back, and it is
//! parked (or, with a pipelined request already read, reading).
//!
//! Every held connection is in one epoll set of its own, which the master
//! loop polls as a single descriptor, so a turn costs what is ready, not
//! what is held. The deadlines are two FIFO queues: every reading
//! connection has the same header timeout and every parked one the same
//! keep-alive timeout, so the order of arrival is the order of expiry.
//! Entries are checked against the connection's current epoch when they
//! come due, so a connection that moved on leaves a stale entry behind
//! instead of a search.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{recv, send, MsgFlags};
use prefork_core::clock::MonoTime;
use prefork_core::{Frame, Framing};
use socket2::Socket;

use crate::master::Conn;

/// How the fdpass master hands connections to workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// Hand over a request only when it is complete (the app's framing
    /// says so), and park kept-alive connections in the master: the front.
    /// An app without framing is dispatched at accept anyway.
    WhenReady,
    /// Hand over every connection at accept, unread, and let the worker
    /// keep a kept-alive connection (the plain fdpass, for comparison).
    AtAccept,
}

/// The front's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontConfig {
    /// When connections are handed over.
    pub dispatch: Dispatch,
    /// A request must be complete this long after its first byte (or after
    /// the accept); then the app's timeout response is sent and the
    /// connection closed.
    pub header_timeout: Duration,
    /// A parked connection silent this long is closed.
    pub keepalive_timeout: Duration,
    /// Connections the master holds at most (reading, parked, and complete
    /// requests waiting for a worker). At the limit it stops accepting, and
    /// new connections wait in the kernel's backlog.
    pub max_connections: usize,
    /// Bytes buffered for one request at most; a request the framing still
    /// calls incomplete beyond this is closed.
    pub max_buffer: usize,
}

impl Default for FrontConfig {
    fn default() -> Self {
        FrontConfig {
            dispatch: Dispatch::WhenReady,
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            max_connections: 4096,
            max_buffer: (1 << 20) + (64 << 10),
        }
    }
}

/// Connections the front holds, by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Requests arriving.
    pub reading: usize,
    /// Complete requests waiting for an idle worker.
    pub queued: usize,
    /// Kept alive between requests.
    pub parked: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reading,
    Parked,
}

#[derive(Debug)]
struct Client {
    sock: Socket,
    listener: u16,
    unix: bool,
    state: State,
    /// The request's bytes so far (reading); empty when parked.
    buf: Vec<u8>,
    /// Requests served on the connection before.
    requests: u32,
    /// Changes at every state change: deadline entries and epoll events of
    /// an earlier state (or an earlier client of this slab entry) are stale.
    epoch: u32,
    /// In the epoll set (a client served at once never is).
    registered: bool,
}

/// What reading a client came to.
enum Step {
    /// Wait for more.
    Wait,
    /// A whole request: hand it over.
    Ready,
    /// Close it (EOF, an error, a refusal already sent).
    Close,
}

/// The held connections.
#[derive(Debug)]
pub(crate) struct Front {
    cfg: FrontConfig,
    epoll: Epoll,
    clients: Vec<Option<Client>>,
    free: Vec<usize>,
    reading: usize,
    parked: usize,
    reading_due: VecDeque<(MonoTime, usize, u32)>,
    parked_due: VecDeque<(MonoTime, usize, u32)>,
    next_epoch: u32,
    /// Where recv(2) writes before the bytes are appended to a buffer.
    scratch: Vec<u8>,
}

impl Front {
    pub(crate) fn new(cfg: FrontConfig) -> std::io::Result<Front> {
        Ok(Front {
            cfg,
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            clients: Vec::new(),
            free: Vec::new(),
            reading: 0,
            parked: 0,
            reading_due: VecDeque::new(),
            parked_due: VecDeque::new(),
            next_epoch: 0,
            scratch: vec![0; 16 * 1024],
        })
    }

    pub(crate) fn config(&self) -> &FrontConfig {
        &self.cfg
    }

    /// The epoll set, for the master's poll.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }

    /// Connections held (reading and parked).
    pub(crate) fn len(&self) -> usize {
        self.reading + self.parked
    }

    pub(crate) fn counts(&self, queued: usize) -> Held {
        Held {
            reading: self.reading,
            queued,
            parked: self.parked,
        }
    }

    /// The earliest deadline, for the master's sleep.
    pub(crate) fn next_deadline(&self) -> Option<MonoTime> {
        let r = self.reading_due.front().map(|e| e.0);
        let p = self.parked_due.front().map(|e| e.0);
        match (r, p) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes in a connection: a new one, or one a worker kept alive (with
    /// the requests served on it and the bytes read ahead). Returns it as a
    /// whole request at once when its bytes (read now, or already read)
    /// complete one; otherwise it is held, reading or parked.
    pub(crate) fn admit(&mut self, conn: Conn, app: &dyn Framing, now: MonoTime) -> Option<Conn> {
        let parked = conn.bytes.is_empty() && conn.requests > 0;
        let idx = self.free.pop().unwrap_or_else(|| {
            self.clients.push(None);
            self.clients.len() - 1
        });
        self.next_epoch = self.next_epoch.wrapping_add(1);
        let client = Client {
            sock: conn.sock,
            listener: conn.listener,
            unix: conn.unix,
            state: if parked {
                State::Parked
            } else {
                State::Reading
            },
            buf: conn.bytes,
            requests: conn.requests,
            epoch: self.next_epoch,
            registered: false,
        };
        self.clients[idx] = Some(client);
        if parked {
            self.parked += 1;
            self.parked_due
                .push_back((now + self.cfg.keepalive_timeout, idx, self.next_epoch));
        } else {
            self.reading += 1;
            self.reading_due
                .push_back((now + self.cfg.header_timeout, idx, self.next_epoch));
        }
        // Its bytes are often here already (TCP_DEFER_ACCEPT; a client that
        // sent its next request while the worker handed the connection
        // back): no need to wait for epoll to say so.
        match self.read(idx, app) {
            Step::Ready => return self.take(idx),
            Step::Close => {
                self.close(idx);
                return None;
            }
            Step::Wait => {}
        }
        if parked
            && self.clients[idx]
                .as_ref()
                .is_some_and(|c| !c.buf.is_empty())
        {
            // Part of its next request came already: reading, not parked.
            self.start_reading(idx, now);
        }
        let c = self.clients[idx].as_mut()?;
        let event = EpollEvent::new(
            EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP,
            token(idx, c.epoch),
        );
        match self.epoll.add(&c.sock, event) {
            Ok(()) => c.registered = true,
            Err(e) => {
                tracing::warn!(
                    "fdpass: epoll_ctl(ADD) of a held connection failed: {e}; closing it"
                );
                self.close(idx);
            }
        }
        None
    }

    /// A parked client's next request begins: reading, under the header
    /// deadline, with a new epoch (its parked deadline is stale now).
    fn start_reading(&mut self, idx: usize, now: MonoTime) {
        let Some(c) = self.clients.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        if c.state != State::Parked {
            return;
        }
        c.state = State::Reading;
        self.next_epoch = self.next_epoch.wrapping_add(1);
        c.epoch = self.next_epoch;
        if c.registered {
            let _ = self.epoll.modify(
                &c.sock,
                &mut EpollEvent::new(
                    EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP,
                    token(idx, c.epoch),
                ),
            );
        }
        self.parked -= 1;
        self.reading += 1;
        self.reading_due
            .push_back((now + self.cfg.header_timeout, idx, self.next_epoch));
    }

    /// Reads what epoll says is ready; whole requests are pushed to `out`.
    pub(crate) fn ready(&mut self, app: &dyn Framing, now: MonoTime, out: &mut Vec<Conn>) {
        let mut events = [EpollEvent::empty(); 256];
        let n = match self.epoll.wait(&mut events, EpollTimeout::ZERO) {
            Ok(n) => n,
            Err(nix::Error::EINTR) => return,
            Err(e) => {
                tracing::warn!("fdpass: epoll_wait failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let (idx, epoch) = untoken(ev.data());
            let state = match self.clients.get(idx).and_then(Option::as_ref) {
                Some(c) if c.epoch == epoch => c.state,
                _ => continue, // closed or moved on earlier in this batch
            };
            if state == State::Parked {
                // The next request starts: reading, under the header deadline.
                self.start_reading(idx, now);
            }
            match self.read(idx, app) {
                Step::Wait => {}
                Step::Ready => out.extend(self.take(idx)),
                Step::Close => self.close(idx),
            }
        }
    }

    /// Closes the connections whose deadline has passed: a reading one gets
    /// the app's timeout response first (the http app's 408).
    pub(crate) fn expire(&mut self, app: &dyn Framing, now: MonoTime) {
        while let Some(&(due, idx, epoch)) = self.reading_due.front() {
            if due > now {
                break;
            }
            self.reading_due.pop_front();
            if self.is_current(idx, epoch, State::Reading) {
                if let (Some(resp), Some(c)) = (app.timeout_response(), &self.clients[idx]) {
                    let _ = send(
                        c.sock.as_raw_fd(),
                        &resp,
                        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                    );
                }
                self.close(idx);
            }
        }
        while let Some(&(due, idx, epoch)) = self.parked_due.front() {
            if due > now {
                break;
            }
            self.parked_due.pop_front();
            if self.is_current(idx, epoch, State::Parked) {
                self.close(idx);
            }
        }
    }

    /// A graceful stop: parked connections are idle, so they close now;
    /// requests still arriving are served (or cut at their deadline).
    pub(crate) fn close_parked(&mut self) {
        for idx in 0..self.clients.len() {
            if self.clients[idx]
                .as_ref()
                .is_some_and(|c| c.state == State::Parked)
            {
                self.close(idx);
            }
        }
        self.parked_due.clear();
    }

    /// A fast stop: everything held closes now.
    pub(crate) fn close_all(&mut self) {
        for idx in 0..self.clients.len() {
            if self.clients[idx].is_some() {
                self.close(idx);
            }
        }
        self.reading_due.clear();
        self.parked_due.clear();
    }

    fn is_current(&self, idx: usize, epoch: u32, state: State) -> bool {
        matches!(self.clients.get(idx).and_then(Option::as_ref), Some(c) if c.epoch == epoch && c.state == state)
    }

    /// Reads what the client sent (never blocking) and runs the framing.
    /// A parked client stays parked until bytes come.
    fn read(&mut self, idx: usize, app: &dyn Framing) -> Step {
        let Some(c) = self.clients.get_mut(idx).and_then(Option::as_mut) else {
            return Step::Close;
        };
        loop {
            match recv(
                c.sock.as_raw_fd(),
                &mut self.scratch,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => return Step::Close,
                Ok(n) => {
                    c.buf.extend_from_slice(&self.scratch[..n]);
                    if c.buf.len() > self.cfg.max_buffer {
                        tracing::debug!(
                            "fdpass: a request grew past {} bytes unframed; closing it",
                            self.cfg.max_buffer
                        );
                        return Step::Close;
                    }
                    if n < self.scratch.len() {
                        break; // drained for now
                    }
                }
                Err(nix::Error::EAGAIN) => break,
                Err(nix::Error::EINTR) => {}
                Err(_) => return Step::Close,
            }
        }
        if c.buf.is_empty() {
            return Step::Wait;
        }
        match app.frame(&c.buf) {
            Frame::Complete(_) => Step::Ready,
            Frame::Incomplete => Step::Wait,
            Frame::Reject(resp) => {
                let fd = c.sock.as_raw_fd();
                let _ = send(fd, &resp, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL);
                // Our side done; what the client still sends is discarded
                // by the kernel's close without turning into a reset of the
                // response already queued, as far as it can be helped.
                let _ = c.sock.shutdown(std::net::Shutdown::Write);
                Step::Close
            }
        }
    }

    /// Removes a client whose request is whole, as a connection to hand over.
    fn take(&mut self, idx: usize) -> Option<Conn> {
        let c = self.remove(idx)?;
        Some(Conn {
            sock: c.sock,
            listener: c.listener,
            unix: c.unix,
            bytes: c.buf,
            requests: c.requests,
        })
    }

    fn close(&mut self, idx: usize) {
        drop(self.remove(idx));
    }

    fn remove(&mut self, idx: usize) -> Option<Client> {
        let c = self.clients.get_mut(idx)?.take()?;
        if c.registered {
            let _ = self.epoll.delete(&c.sock);
        }
        match c.state {
            State::Reading => self.reading -= 1,
            State::Parked => self.parked -= 1,
        }
        self.free.push(idx);
        Some(c)
    }
}

fn token(idx: usize, epoch: u32) -> u64 {
    (u64::from(epoch) << 32) | idx as u64
}

fn untoken(data: u64) -> (usize, u32) {
    ((data & 0xffff_ffff) as usize, (data >> 32) as u32)
}
