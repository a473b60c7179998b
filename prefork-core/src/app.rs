//! What a user writes: the [`App`] trait, and the [`Connection`] it serves.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A boxed error from application code.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Who this worker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Stable slot number, 0..N-1; a respawned worker keeps its slot.
    pub slot: usize,
    /// This worker's pid.
    pub pid: u32,
    /// Generation: 1 at start, +1 per reload (HUP).
    pub generation: u64,
}

/// What an app's framing found in the bytes buffered for a connection
/// ([`App::frame`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The first `n` bytes hold one whole request: hand the connection to a
    /// worker with them. `Complete(0)` with nothing read dispatches at once
    /// (an app without framing).
    Complete(usize),
    /// More bytes are needed.
    Incomplete,
    /// Refuse: send these bytes (a 400, a 431), then close.
    Reject(Vec<u8>),
}

/// After one request, whether the connection stays open ([`App::handle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Close it.
    Close,
    /// Keep it for the next request. Where it waits is the strategy's
    /// business: in the worker (blocking, mutex, reuseport), or parked in
    /// the master (fdpass), which hands it to a worker again when the next
    /// request is complete.
    KeepAlive,
}

/// The part of an app the fdpass master runs on the bytes it buffers: its
/// framing, and its answer to a client too slow to send a request. Every
/// [`App`] is one.
pub trait Framing {
    /// See [`App::frame`].
    fn frame(&self, buf: &[u8]) -> Frame;
    /// See [`App::timeout_response`].
    fn timeout_response(&self) -> Option<Vec<u8>>;
}

impl<A: App + ?Sized> Framing for A {
    fn frame(&self, buf: &[u8]) -> Frame {
        App::frame(self, buf)
    }

    fn timeout_response(&self) -> Option<Vec<u8>> {
        App::timeout_response(self)
    }
}

/// An application served by prefork.
///
/// `preload` runs once in the master before any fork, so what it loads is
/// shared copy-on-write by every worker. `after_fork` runs in each worker
/// (open per-process resources here: database connections, threads, files).
/// `handle` serves one request; a worker serves one request at a time, and
/// the connection stays open for the next one when `handle` says so.
///
/// `frame` tells a master that buffers requests (the fdpass strategy) when
/// the bytes it holds are one whole request, so that a worker only ever gets
/// a request that is ready. The default dispatches every connection at
/// once, unread, which is right for protocols without framing.
pub trait App {
    /// Once, in the master, before forking. An error stops the server.
    fn preload(&mut self) -> Result<(), BoxError> {
        Ok(())
    }

    /// In each worker after fork. An error makes the worker exit with
    /// [`crate::EXIT_BOOT_FAILED`], and its slot is not respawned.
    fn after_fork(&mut self, _worker: &WorkerInfo) -> Result<(), BoxError> {
        Ok(())
    }

    /// In the master of the fdpass strategy, on the bytes buffered for a
    /// connection so far (from the first byte of a request; empty at
    /// first): is it one whole request ([`Frame::Complete`] with its length),
    /// does it need more ([`Frame::Incomplete`]), or is it refused
    /// ([`Frame::Reject`] with the response to send)? It must be cheap and
    /// must not block: it runs in the master's loop. The default,
    /// `Complete(0)`, dispatches every connection at once.
    fn frame(&self, _buf: &[u8]) -> Frame {
        Frame::Complete(0)
    }

    /// What the fdpass master sends a client whose request is not complete
    /// by the header deadline, before closing it (the http app's 408).
    /// `None` closes silently.
    fn timeout_response(&self) -> Option<Vec<u8>> {
        None
    }

    /// Serve one request, and say whether the connection stays open.
    ///
    /// The connection arrives blocking, close-on-exec, with the listener's
    /// read timeout (the accept tick, 500 ms by default) inherited from the
    /// listening socket: a read on a silent client returns `WouldBlock` then,
    /// so the app can enforce its own deadlines without a timer syscall.
    /// Change it with [`Connection::set_read_timeout`]. Bytes the master
    /// already read (and bytes this app gave back with
    /// [`Connection::unread`]) are read first.
    ///
    /// Bytes read beyond this request (a pipelined next request) must be
    /// given back with [`Connection::unread`] before returning
    /// [`Next::KeepAlive`]: they travel with the connection.
    fn handle(&mut self, conn: &mut Connection) -> io::Result<Next>;
}

/// The stream of a [`Connection`].
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix-domain connection.
    Unix(UnixStream),
}

/// One accepted connection, with the bytes already read from it that are
/// still to be served (what a buffering master read, or what the app gave
/// back): [`Read`] returns those first.
#[derive(Debug)]
pub struct Connection {
    stream: Stream,
    listener: usize,
    /// Bytes read ahead, served from `read_pos` on.
    ahead: Vec<u8>,
    read_pos: usize,
    /// Requests served on this connection before the current one.
    requests: u32,
}

impl Connection {
    /// Wraps an accepted stream; `listener` is the index of the listener
    /// (in `--bind` order) it came from.
    pub fn new(stream: Stream, listener: usize) -> Connection {
        Connection {
            stream,
            listener,
            ahead: Vec::new(),
            read_pos: 0,
            requests: 0,
        }
    }

    /// Wraps an accepted socket of the given kind.
    pub fn from_socket(socket: socket2::Socket, unix: bool, listener: usize) -> Connection {
        let stream = if unix {
            Stream::Unix(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
        } else {
            Stream::Tcp(TcpStream::from(socket))
        };
        Connection::new(stream, listener)
    }

    /// This connection with `bytes` already read from it, to be served first.
    pub fn with_bytes(mut self, bytes: Vec<u8>) -> Connection {
        self.ahead = bytes;
        self.read_pos = 0;
        self
    }

    /// How many requests were served on this connection before the one
    /// being served now (0 for a new connection): an app limits a kept-alive
    /// connection with it (`--keepalive-requests`), and can tell a new
    /// connection from a kept-alive one.
    pub fn requests_before(&self) -> u32 {
        self.requests
    }

    /// This connection, which had `n` requests served before (it was kept
    /// alive in a master that buffers requests, and comes back).
    pub fn with_requests_before(mut self, n: u32) -> Connection {
        self.requests = n;
        self
    }

    /// One more request was served on this connection.
    pub fn count_request(&mut self) {
        self.requests = self.requests.saturating_add(1);
    }

    /// After poll(2) said readable: does the client still send (true), or
    /// did it close its side (false, a zero-byte peek)? Bytes read ahead
    /// count as sent.
    pub fn peek_open(&self) -> bool {
        if !self.buffered().is_empty() {
            return true;
        }
        let mut byte = [0u8; 1];
        !matches!(
            nix::sys::socket::recv(
                self.as_raw_fd(),
                &mut byte,
                nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT
            ),
            Ok(0)
        )
    }

    /// Gives back bytes read beyond the request served (a pipelined next
    /// request): they are read again first, before anything from the
    /// socket, and travel with the connection when it is kept alive.
    pub fn unread(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let rest = &self.ahead[self.read_pos..];
        let mut joined = Vec::with_capacity(bytes.len() + rest.len());
        joined.extend_from_slice(bytes);
        joined.extend_from_slice(rest);
        self.ahead = joined;
        self.read_pos = 0;
    }

    /// The bytes read ahead and not yet served.
    pub fn buffered(&self) -> &[u8] {
        &self.ahead[self.read_pos..]
    }

    /// Takes the bytes read ahead and not yet served.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.ahead);
        out.drain(..self.read_pos.min(out.len()));
        self.read_pos = 0;
        out
    }

    /// Index of the listener this connection came in on.
    pub fn listener(&self) -> usize {
        self.listener
    }

    /// The underlying stream.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Sets the per-read timeout (SO_RCVTIMEO).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Sets the per-write timeout (SO_SNDTIMEO).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Shuts down one or both directions.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read_pos < self.ahead.len() {
            let n = (self.ahead.len() - self.read_pos).min(buf.len());
            buf[..n].copy_from_slice(&self.ahead[self.read_pos..self.read_pos + n]);
            self.read_pos += n;
            if self.read_pos == self.ahead.len() {
                self.ahead = Vec::new();
                self.read_pos = 0;
            }
            return Ok(n);
        }
        match &mut self.stream {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        if self.read_pos < self.ahead.len() {
            let first = bufs.iter_mut().find(|b| !b.is_empty());
            return first.map_or(Ok(0), |b| self.read(b));
        }
        match &mut self.stream {
            Stream::Tcp(s) => s.read_vectored(bufs),
            Stream::Unix(s) => s.read_vectored(bufs),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.stream {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().expect("pair");
        (Connection::new(Stream::Unix(a), 0), b)
    }

    #[test]
    fn bytes_read_ahead_are_served_first_then_the_socket() {
        let (conn, mut peer) = pair();
        let mut conn = conn.with_bytes(b"GET / ".to_vec());
        peer.write_all(b"HTTP/1.1\r\n").expect("write");
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"GET ");
        assert_eq!(conn.buffered(), b"/ ");
        let mut rest = [0u8; 12];
        conn.read_exact(&mut rest).expect("read");
        assert_eq!(&rest, b"/ HTTP/1.1\r\n");
        assert!(conn.buffered().is_empty());
    }

    #[test]
    fn unread_bytes_come_back_before_what_was_still_ahead() {
        let (conn, _peer) = pair();
        let mut conn = conn.with_bytes(b"abcdef".to_vec());
        let mut buf = [0u8; 2];
        conn.read_exact(&mut buf).expect("read");
        conn.unread(b"XY");
        assert_eq!(conn.buffered(), b"XYcdef");
        assert_eq!(conn.take_buffered(), b"XYcdef");
        assert!(conn.buffered().is_empty());
    }
}
