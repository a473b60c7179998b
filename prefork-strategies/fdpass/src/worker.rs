//! The worker side: receives connections from the master over its channel,
//! counts each before reading a byte of it, and reports when it is idle.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::poll::{PollFd, PollFlags};
use prefork_core::clock::poll_timeout;
use prefork_core::{AcceptContext, Accepted, Connection, Frame, Framing, WorkerAcceptor};
use socket2::{Socket, Type};

use crate::protocol::{Kept, Receipts, RequestHeader, HEADER, IDLE, MAX_INLINE, RETURNED};
use crate::sys;

/// The worker side: receives connections from the master.
#[derive(Debug)]
pub struct FdpassAcceptor {
    chan: OwnedFd,
    /// The master closed the channel (a reload gave the slot to a new worker).
    closed: bool,
    rejected: u64,
    /// The shared counters and this worker's cell (absent for a bare
    /// channel in tests: then every `D` is sent).
    receipt: Option<(Receipts, usize)>,
    /// SO_RCVTIMEO set on the channel (the accept tick).
    rcvtimeo: Option<std::time::Duration>,
    /// The master parks kept-alive connections (the front): hand them back.
    hand_back: bool,
}

impl FdpassAcceptor {
    /// A worker side on its end of a channel (for tests and custom masters).
    pub fn from_channel(chan: OwnedFd) -> FdpassAcceptor {
        FdpassAcceptor::new(chan, None, false)
    }

    /// A worker side with its cell of the shared counters.
    pub(crate) fn new(
        chan: OwnedFd,
        receipt: Option<(Receipts, usize)>,
        hand_back: bool,
    ) -> FdpassAcceptor {
        FdpassAcceptor {
            chan,
            closed: false,
            rejected: 0,
            receipt,
            rcvtimeo: None,
            hand_back,
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
        let header = RequestHeader::decode(&msg.data);
        let want_fds = if header.is_some_and(|h| h.in_memfd) {
            2
        } else {
            1
        };
        if header.is_some() && msg.truncated && msg.fds.len() < want_fds && !msg.foreign_cmsg {
            // A connection whose descriptor the kernel could not install
            // here (this worker is at its descriptor limit: the message
            // comes with MSG_CTRUNC and without it). Nothing is counted: the
            // master still holds its copy and hands it on. The worker loop
            // backs off, as after EMFILE from accept(2).
            sys::send_with_fds(self.chan.as_fd(), RETURNED, &[])?;
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        let header = match header {
            Some(h) if !msg.truncated && !msg.foreign_cmsg && msg.fds.len() == want_fds => h,
            _ => {
                return Ok(self.reject(format!(
                    "{} descriptors, {} payload bytes{}",
                    msg.fds.len(),
                    msg.data.len(),
                    if msg.truncated { ", truncated" } else { "" }
                )))
            }
        };
        let mut fds = msg.fds.into_iter();
        let Some(fd) = fds.next() else {
            return Ok(self.reject("no descriptor".into()));
        };
        let sock = Socket::from(fd);
        // One getsockopt(SO_TYPE): it fails for anything but a socket.
        if !matches!(sock.r#type(), Ok(t) if t == Type::STREAM) {
            return Ok(self.reject("the descriptor is not a stream socket".into()));
        }
        let bytes = match fds.next() {
            None => msg.data[HEADER..].to_vec(),
            Some(memfd) => match read_memfd(memfd) {
                Ok(bytes) => bytes,
                Err(e) => return Ok(self.reject(format!("the request's bytes: {e}"))),
            },
        };
        // Counted before a byte is read: from here on the master must not
        // hand this connection to anyone else.
        self.count_received();
        Ok(Accepted::Connection(
            Connection::from_socket(sock, header.unix, usize::from(header.listener))
                .with_bytes(bytes)
                .with_requests_before(header.requests),
        ))
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
        self.count_received();
        self.finished();
        Accepted::Idle
    }

    /// The master waits for an idle worker (requests are queued there).
    fn master_waiting(&self) -> bool {
        self.receipt.as_ref().map_or(true, |(r, _)| r.waiting())
    }

    /// Counts one connection as taken (before a byte of it is read).
    fn count_received(&self) {
        if let Some((r, cell)) = &self.receipt {
            r.count_received(*cell);
        }
    }

    /// One connection finished: counted, and reported with a `D` only if
    /// the master waits for an idle worker (see `Fdpass::set_waiting`).
    fn finished(&mut self) {
        if let Some((r, cell)) = &self.receipt {
            r.count_finished(*cell);
        }
        if self.closed {
            return;
        }
        let tell = self.receipt.as_ref().map_or(true, |(r, _)| r.waiting());
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

    fn keep_alive(
        &mut self,
        conn: Connection,
        app: &dyn Framing,
    ) -> io::Result<Option<Connection>> {
        // The master parks it: this worker is free at once. A connection
        // that cannot go back (the channel is closed by a reload, or more
        // bytes are read ahead than a message holds) waits here instead.
        if !self.hand_back || self.closed || conn.buffered().len() > MAX_INLINE {
            return Ok(Some(conn));
        }
        // A client that sends its next request at once (a closed loop) would
        // make a round trip through the master for nothing: when its next
        // request is already whole in the socket, and no request waits in
        // the master for a worker, it is served here. Only a whole one:
        // serving a partial request here would let a slow client hold this
        // worker again.
        // While requests wait in the master for a worker, only a request
        // already here counts (no waiting); a connection serves at most
        // `--keepalive-requests` in a row, so the others are not starved.
        let window = if self.master_waiting() {
            std::time::Duration::ZERO
        } else {
            LINGER
        };
        if next_request_ready(&conn, app, window) {
            return Ok(Some(conn));
        }
        let msg = Kept {
            requests: conn.requests_before(),
            listener: u16::try_from(conn.listener()).unwrap_or(u16::MAX),
            unix: matches!(conn.stream(), prefork_core::Stream::Unix(_)),
            ahead: conn.buffered(),
        }
        .encode();
        sys::send_with_fds(self.chan.as_fd(), &msg, &[conn.as_raw_fd()])?;
        // Done with it: the `K` is also this worker's idle report.
        if let Some((r, cell)) = &self.receipt {
            r.count_finished(*cell);
        }
        Ok(None)
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

/// How long a worker looks for the next request of a kept-alive connection
/// before handing the connection back to the master.
const LINGER: std::time::Duration = std::time::Duration::from_micros(500);

/// Whether the next request on `conn` arrives whole within `window`: the
/// bytes read ahead and those in the socket (peeked, not read), framed by
/// the app.
fn next_request_ready(conn: &Connection, app: &dyn Framing, window: std::time::Duration) -> bool {
    let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
    if conn.buffered().is_empty()
        && !window.is_zero()
        && !matches!(nix::poll::poll(&mut fds, poll_timeout(Some(window))), Ok(n) if n > 0)
    {
        return false;
    }
    let mut peeked = [0u8; 16 * 1024];
    let n = nix::sys::socket::recv(
        conn.as_raw_fd(),
        &mut peeked,
        nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    )
    .unwrap_or(0);
    if n == 0 && conn.buffered().is_empty() {
        return false; // closed, or nothing after all
    }
    let mut whole = conn.buffered().to_vec();
    whole.extend_from_slice(&peeked[..n]);
    matches!(app.frame(&whole), Frame::Complete(_))
}

/// The largest request a memfd may carry (the master buffers far less).
const MAX_MEMFD: u64 = 64 << 20;

/// The bytes of a request that came in a memfd: a regular file of at most
/// [`MAX_MEMFD`] bytes, read whole from its start.
fn read_memfd(fd: OwnedFd) -> io::Result<Vec<u8>> {
    use std::io::{Read, Seek};
    let mut file = std::fs::File::from(fd);
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() > MAX_MEMFD {
        return Err(io::Error::other("not a memfd of a request"));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.rewind()?;
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}
