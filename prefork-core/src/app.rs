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

/// An application served by prefork.
///
/// `preload` runs once in the master before any fork, so what it loads is
/// shared copy-on-write by every worker. `after_fork` runs in each worker
/// (open per-process resources here: database connections, threads, files).
/// `handle` serves one connection; a worker serves one connection at a time.
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

    /// Serve one connection. It is closed when this returns.
    ///
    /// The connection arrives blocking, close-on-exec, with the listener's
    /// read timeout (the accept tick, 500 ms by default) inherited from the
    /// listening socket: a read on a silent client returns `WouldBlock` then,
    /// so the app can enforce its own deadlines without a timer syscall.
    /// Change it with [`Connection::set_read_timeout`].
    fn handle(&mut self, conn: &mut Connection) -> io::Result<()>;
}

/// The stream of a [`Connection`].
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix-domain connection.
    Unix(UnixStream),
}

/// One accepted connection.
#[derive(Debug)]
pub struct Connection {
    stream: Stream,
    listener: usize,
}

impl Connection {
    /// Wraps an accepted stream; `listener` is the index of the listener
    /// (in `--bind` order) it came from.
    pub fn new(stream: Stream, listener: usize) -> Connection {
        Connection { stream, listener }
    }

    /// Wraps an accepted socket of the given kind.
    pub fn from_socket(socket: socket2::Socket, unix: bool, listener: usize) -> Connection {
        let stream = if unix {
            Stream::Unix(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
        } else {
            Stream::Tcp(TcpStream::from(socket))
        };
        Connection { stream, listener }
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
        match &mut self.stream {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
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
