//! `--daemon`: the master detaches from the terminal, the way Unicorn's
//! `-D` and nginx's `daemon on` do, and the command that started it returns
//! only once the server is ready (or failed to start, with its error and
//! exit code).
//!
//! [`daemonize`] forks once. The child starts a new session (no controlling
//! terminal, not in the shell's process group), takes `/dev/null` as stdin
//! and stdout, and sends its stderr (the start-up logs, and an `error: ...`
//! line if it fails) through a pipe to the parent, which copies it to the
//! terminal. The master moves stderr off the pipe (to `--log-file`, or
//! `/dev/null`) before it forks any worker ([`crate::MasterConfig::detached`]),
//! so no worker holds the pipe. When the server is ready the child sends
//! its ready line through [`ReadyPipe`] and closes it; the parent prints it
//! on stdout and exits 0. If the pipe closes first, the child failed: the
//! parent exits with the child's exit code.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::sys::{self, Forked};

/// Which side of [`daemonize`] this is.
#[derive(Debug)]
pub enum Daemon {
    /// The command the user ran: wait for the server with [`Starter::wait`].
    Starter(Starter),
    /// The server, detached: start it, and say when it is ready.
    Server(ReadyPipe),
}

/// The starting side: waits for the detached server's verdict.
#[derive(Debug)]
pub struct Starter {
    child: Pid,
    from_server: OwnedFd,
}

/// The server side: where the ready line goes (only the master holds it).
#[derive(Debug)]
pub struct ReadyPipe(Option<OwnedFd>);

impl ReadyPipe {
    /// Sends the ready line and closes the pipe: the starting command prints
    /// it and exits 0. Later calls do nothing.
    pub fn send(&mut self, line: &str) {
        if let Some(fd) = self.0.take() {
            let mut f = std::fs::File::from(fd);
            let _ = writeln!(f, "{READY_MARK}{line}");
        }
    }
}

/// Marks the ready line among the start-up log lines on the pipe.
const READY_MARK: &str = "\u{1}ready\u{1}";

/// Forks the server off the terminal. Call it before anything else starts
/// (before binding, logging may already be set up: it writes to stderr).
pub fn daemonize() -> crate::Result<Daemon> {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| crate::Error::sys("pipe2() for --daemon", e))?;
    match sys::fork().map_err(|e| crate::Error::sys("fork() to detach", e))? {
        Forked::Parent(child) => {
            drop(wr);
            Ok(Daemon::Starter(Starter {
                child,
                from_server: rd,
            }))
        }
        Forked::Child => {
            drop(rd);
            // sys::fork leaves every signal blocked in the child; this one
            // goes on as a process that installs its own handlers.
            sys::unblock_all_signals().map_err(|e| crate::Error::sys("sigprocmask()", e))?;
            nix::unistd::setsid().map_err(|e| crate::Error::sys("setsid()", e))?;
            let null = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(|e| crate::Error::sys("opening /dev/null", e))?;
            let stdio = |what: &str, r: nix::Result<()>| {
                r.map_err(|e| crate::Error::sys(format!("dup2() onto {what}"), e))
            };
            stdio("stdin", nix::unistd::dup2_stdin(null.as_fd()))?;
            stdio("stdout", nix::unistd::dup2_stdout(null.as_fd()))?;
            stdio("stderr", nix::unistd::dup2_stderr(wr.as_fd()))?;
            Ok(Daemon::Server(ReadyPipe(Some(wr))))
        }
    }
}

impl Starter {
    /// Copies the server's start-up output to stderr until it is ready
    /// (returns its ready line, to print) or gone (returns its exit code).
    pub fn wait(self) -> Result<String, i32> {
        let mut lines = BufReader::new(std::fs::File::from(self.from_server));
        let mut line = String::new();
        let mut stderr = io::stderr();
        loop {
            line.clear();
            match lines.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) => match line.strip_prefix(READY_MARK) {
                    Some(ready) => return Ok(ready.trim_end().to_string()),
                    None => {
                        let _ = stderr.write_all(line.as_bytes());
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // The pipe closed without a ready line: the server is gone.
        loop {
            match waitpid(self.child, None) {
                Ok(WaitStatus::Exited(_, code)) => return Err(code),
                Ok(WaitStatus::Signaled(..)) => return Err(1),
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return Err(1),
            }
        }
    }
}
