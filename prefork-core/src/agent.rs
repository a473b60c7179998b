//! `--agent ADDR`: HAProxy's agent-check protocol, answered by the master.
//!
//! HAProxy connects, may send a line, and reads one line back:
//! * `up N%`: the weight, as a percentage of the server's configured
//!   weight. prefork reports its **idle capacity**: N = idle workers × 100 /
//!   `scale` (at least 1, so a host whose workers are all busy still gets a
//!   trickle rather than none, and a fleet whose hosts are all busy still
//!   serves). With the same configured weight on every host (256 gives the
//!   most resolution), a host with four idle workers weighs four times one
//!   with one: the balancer sends new connections where workers wait.
//! * `drain`: stop sending new connections, keep the ones open (during
//!   `--drain` before a graceful stop);
//! * `maint`: take the host out (no worker: WINCH stopped them all).
//!
//! The master answers in its own loop: accept, one write, close.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd};

/// What the master's state says to the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// Serving, with this many idle workers.
    Up {
        /// Idle workers now.
        idle: usize,
    },
    /// Draining before a stop.
    Drain,
    /// No worker to serve with.
    Maint,
}

/// The line for `state`, with `scale` idle workers worth 100 %.
pub fn line(state: AgentState, scale: usize) -> String {
    match state {
        AgentState::Up { idle } => {
            let pct = (idle * 100 / scale.max(1)).max(1);
            format!("up {pct}%\n")
        }
        AgentState::Drain => "drain\n".into(),
        AgentState::Maint => "maint\n".into(),
    }
}

/// The master's agent endpoint.
#[derive(Debug)]
pub struct AgentServer {
    listener: TcpListener,
}

impl AgentServer {
    /// Binds `addr` (non-blocking, close-on-exec; SO_REUSEPORT so that a
    /// USR2 master can bind it too).
    pub fn bind(addr: SocketAddr) -> io::Result<AgentServer> {
        Ok(AgentServer {
            listener: crate::metrics::side_listener(addr)?,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The listener, to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// Answers every waiting check with `reply` (made once).
    pub fn answer(&self, reply: impl FnOnce() -> String) {
        let mut reply = Some(reply);
        let mut text = String::new();
        loop {
            match self.listener.accept() {
                Ok((mut c, _)) => {
                    if let Some(f) = reply.take() {
                        text = f();
                    }
                    // What HAProxy sent (agent-send) is read and ignored,
                    // so that closing does not reset the answer.
                    let _ = c.set_nonblocking(true);
                    let mut sink = [0u8; 512];
                    let _ = c.read(&mut sink);
                    let _ = c.write_all(text.as_bytes());
                    let _ = c.shutdown(std::net::Shutdown::Write);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_follow_idle_capacity() {
        assert_eq!(line(AgentState::Up { idle: 4 }, 16), "up 25%\n");
        assert_eq!(line(AgentState::Up { idle: 1 }, 16), "up 6%\n");
        assert_eq!(line(AgentState::Up { idle: 0 }, 16), "up 1%\n", "never 0");
        assert_eq!(line(AgentState::Up { idle: 32 }, 16), "up 200%\n");
        assert_eq!(line(AgentState::Drain, 16), "drain\n");
        assert_eq!(line(AgentState::Maint, 16), "maint\n");
    }
}
