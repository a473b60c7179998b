//! Building blocks for strategies that accept from inherited listeners:
//! blocking accept(2) on one socket, or poll(2) over several then a
//! non-blocking accept from the ready one.

use std::io;
use std::os::fd::AsFd;

use nix::poll::{PollFd, PollFlags};

use crate::app::Connection;
use crate::clock::poll_timeout;
use crate::listener::Listener;
use crate::strategy::{accept_error, AcceptContext, Accepted};

/// The listeners a worker accepts from.
#[derive(Debug)]
pub struct ListenerSet {
    listeners: Vec<Listener>,
    unix: Vec<bool>,
    /// Where polling starts next time, so one busy listener cannot starve another.
    next: usize,
}

impl ListenerSet {
    /// Wraps the worker's listeners.
    pub fn new(listeners: Vec<Listener>) -> ListenerSet {
        let unix = listeners.iter().map(Listener::is_unix).collect();
        ListenerSet {
            listeners,
            unix,
            next: 0,
        }
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.listeners.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
    }

    /// The listeners.
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// One connection, or [`Accepted::Idle`] after at most a tick.
    ///
    /// * **One listener**: accept(2) itself blocks (the listener is
    ///   blocking, and its SO_RCVTIMEO, the tick, makes it return `EAGAIN`
    ///   now and then). The kernel wakes one waiter per connection, and the
    ///   accept path costs no syscall besides accept4(2).
    /// * **Several listeners**: a worker cannot block in accept(2) on two
    ///   sockets, so it polls them ([`ListenerSet::poll_and_accept`]); the
    ///   listeners must then be non-blocking
    ///   ([`ListenerSet::set_nonblocking`]`(listeners, listeners.len() > 1)`).
    pub fn accept(&mut self, ctx: &AcceptContext<'_>) -> io::Result<Accepted> {
        if self.listeners.len() == 1 {
            return self.accept_from(0);
        }
        self.poll_and_accept(ctx)
    }

    /// Wraps accept4(2) with SOCK_CLOEXEC on listener `i`. On a blocking
    /// listener it waits up to the listener's SO_RCVTIMEO (the tick).
    pub fn accept_from(&self, i: usize) -> io::Result<Accepted> {
        match self.listeners[i].socket().accept() {
            Ok((sock, _peer)) => Ok(Accepted::Connection(Connection::from_socket(
                sock,
                self.unix[i],
                i,
            ))),
            Err(e) => accept_error(e),
        }
    }

    /// Waits up to `ctx.tick` in poll(2) for any listener (or the
    /// master-alive pipe), then accepts from the first ready listener,
    /// starting after the one served last. The listeners must be
    /// non-blocking: another worker may win the race.
    pub fn poll_and_accept(&mut self, ctx: &AcceptContext<'_>) -> io::Result<Accepted> {
        let n = self.listeners.len();
        let mut fds = Vec::with_capacity(n + 1);
        fds.push(PollFd::new(ctx.master_alive, PollFlags::POLLIN));
        for l in &self.listeners {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut fds, poll_timeout(Some(ctx.tick))) {
            Ok(0) | Err(nix::Error::EINTR) => return Ok(Accepted::Idle),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            return Ok(Accepted::Idle); // the master is gone: let the loop see it
        }
        let mut ready = 0u64; // bit i: listener i readable (n is small)
        for (i, p) in fds[1..].iter().enumerate().take(64) {
            if p.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)) {
                ready |= 1 << i;
            }
        }
        drop(fds);
        for k in 0..n {
            let i = (self.next + k) % n;
            if ready & (1 << i) != 0 {
                self.next = (i + 1) % n;
                return self.accept_from(i);
            }
        }
        Ok(Accepted::Idle)
    }

    /// Sets O_NONBLOCK on every listener (on the shared file description:
    /// call it in the master, before forking).
    pub fn set_nonblocking(listeners: &[Listener], on: bool) -> io::Result<()> {
        for l in listeners {
            l.socket().set_nonblocking(on)?;
        }
        Ok(())
    }
}
