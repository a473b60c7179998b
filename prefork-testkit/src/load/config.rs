//! What one load run does: where to connect, what to speak, how hard.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl Target {
    /// Parses `HOST:PORT`, `[V6]:PORT` or `unix:/path`.
    pub fn parse(s: &str) -> Result<Target, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Target::Unix(PathBuf::from(p)));
        }
        use std::net::ToSocketAddrs;
        s.to_socket_addrs()
            .map_err(|e| format!("invalid target {s:?}: {e}"))?
            .next()
            .map(Target::Tcp)
            .ok_or_else(|| format!("invalid target {s:?}: no address"))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(a) => write!(f, "{a}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// GET a path; a 2xx status is success; `X-Worker` names the worker.
    Http,
    /// Send nothing, read until the server closes (a server that speaks
    /// first); `worker=N` in the line names the worker.
    Line,
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Targets; connections are spread over them in turn.
    pub targets: Vec<Target>,
    /// Protocol.
    pub protocol: Protocol,
    /// Path to GET (http).
    pub path: String,
    /// A slow path and the fraction of requests that use it (the `mixed` scenario).
    pub slow: Option<(String, f64)>,
    /// Concurrent connections (closed loop), or the most in flight (open loop).
    pub concurrency: usize,
    /// Requests per second (open loop); `None` for closed loop.
    pub rate: Option<f64>,
    /// Stop issuing after this long.
    pub duration: Option<Duration>,
    /// Stop issuing after this many requests.
    pub requests: Option<u64>,
    /// Generator threads.
    pub threads: usize,
    /// Keep connections alive between requests (http only).
    pub keepalive: bool,
    /// A request not answered within this is a timeout.
    pub timeout: Duration,
    /// Record every request's outcome with its time (fault scenarios).
    pub record_outcomes: bool,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            targets: Vec::new(),
            protocol: Protocol::Http,
            path: "/".into(),
            slow: None,
            concurrency: 8,
            rate: None,
            duration: Some(Duration::from_secs(5)),
            requests: None,
            threads: 1,
            keepalive: false,
            timeout: Duration::from_secs(5),
            record_outcomes: false,
        }
    }
}
