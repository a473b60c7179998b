//! Typed errors. Each says what failed, on which object, and carries the OS error.

use std::io;
use std::path::PathBuf;

/// Errors returned by prefork-core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--bind` value that is not `HOST:PORT`, `[V6]:PORT`, `unix:/path` or `fd:N`.
    #[error("invalid listen address {spec:?}: {reason}")]
    BadAddress {
        /// The text as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// socket/bind/listen failed for an address.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address as the user wrote it.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A Unix socket path is held by a live server.
    #[error("cannot listen on unix:{}: another server is accepting on it", path.display())]
    UnixSocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// A Unix socket path exists and is not a socket; it is never removed.
    #[error("cannot listen on unix:{}: the path exists and is not a socket", path.display())]
    UnixPathNotSocket {
        /// The path.
        path: PathBuf,
    },
    /// Systemd socket-activation variables are malformed.
    #[error("socket activation: {0}")]
    SocketActivation(String),
    /// Writing or checking the pid file failed.
    #[error("pid file {}: {reason}", path.display())]
    PidFile {
        /// The pid file path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A syscall failed; `what` names the call and the object.
    #[error("{what}: {source}")]
    Sys {
        /// e.g. `fork() while spawning worker 3`.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The master would fork with more than one thread.
    #[error("refusing to fork: the master has {0} threads (it must stay single-threaded)")]
    NotSingleThreaded(usize),
    /// The application's preload failed.
    #[error("application preload failed: {0}")]
    Preload(String),
    /// The strategy could not prepare.
    #[error("strategy {strategy}: {reason}")]
    Strategy {
        /// Strategy name.
        strategy: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// Settings that cannot work together.
    #[error("{0}")]
    Config(String),
    /// Every worker slot failed to boot; the master gives up.
    #[error("every worker failed to boot (exit code {0}); see the worker errors above")]
    AllWorkersFailedToBoot(i32),
}

impl Error {
    /// Wrap an OS error with the name of the call and its object.
    pub fn sys(what: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Sys {
            what: what.into(),
            source: source.into(),
        }
    }
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Error::sys("system call", io::Error::from(e))
    }
}

/// Result alias for prefork-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;
