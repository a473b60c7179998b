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
//!
//! # Example
//!
//! Two workers; the master accepts and hands each connection to an idle
//! one. The master does this in its own loop, and the ready callback runs in
//! that loop, so the callback must not wait for a reply: it connects, asks
//! for a graceful stop (QUIT), and the reply is read once `run` returns. A
//! graceful stop serves every connection already handed over.
//!
//! ```
//! use std::io::{Read, Write};
//! use std::net::TcpStream;
//!
//! use prefork_core::{App, BindSpec, Connection, ListenAddr, Master, MasterConfig, Next};
//! use prefork_fdpass::Fdpass;
//!
//! struct Hello;
//!
//! impl App for Hello {
//!     fn handle(&mut self, conn: &mut Connection) -> std::io::Result<Next> {
//!         conn.write_all(b"hello\n")?;
//!         Ok(Next::Close)
//!     }
//! }
//!
//! let cfg = MasterConfig {
//!     binds: vec![BindSpec::parse("127.0.0.1:0")?],
//!     workers: 2,
//!     ..MasterConfig::default()
//! };
//! let master = Master::start(cfg, Fdpass::new(), Hello)?;
//! let mut client: Option<TcpStream> = None;
//! let code = master.run(|ready| {
//!     let ListenAddr::Tcp(addr) = ready.addrs[0] else { unreachable!("a TCP bind") };
//!     client = Some(TcpStream::connect(addr).expect("connect"));
//!     let me = nix::unistd::Pid::from_raw(ready.pid as i32);
//!     nix::sys::signal::kill(me, nix::sys::signal::Signal::SIGQUIT).expect("QUIT");
//! })?;
//! assert_eq!(code, 0, "a graceful stop");
//! let mut reply = String::new();
//! client.expect("connected").read_to_string(&mut reply).expect("read");
//! assert_eq!(reply, "hello\n");
//! # Ok::<(), prefork_core::Error>(())
//! ```

#![deny(missing_docs)]
// `unsafe` is confined to `sys`: the compiler enforces it.
#![deny(unsafe_code)]

mod front;
mod master;
mod protocol;
#[allow(unsafe_code)]
mod sys;
#[cfg(test)]
mod tests;
mod worker;

pub use front::{Dispatch, FrontConfig, Held};
pub use master::Fdpass;
pub use worker::FdpassAcceptor;
