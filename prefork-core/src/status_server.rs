//! The status interface: a Unix socket (mode 0600) on which the master
//! answers every connection with the scoreboard as JSON, then closes.
//!
//! Only the master's own uid and root are answered (SO_PEERCRED). The master
//! never reads from a client, so whatever a client writes cannot hurt it;
//! each answer is written with a short send timeout so a client that does
//! not read cannot stall the master's loop.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt};
use serde_json::json;

use crate::clock::MonoTime;
use crate::error::Result;
use crate::listener::{self, BindOptions, BindSpec, Listener};
use crate::scoreboard::WorkerState;
use crate::supervisor::WorkerView;

/// The master's status socket.
#[derive(Debug)]
pub struct StatusServer {
    listener: Listener,
    path: PathBuf,
}

/// One worker in the status document.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    /// Slot.
    pub slot: usize,
    /// Pid.
    pub pid: i32,
    /// Generation.
    pub generation: u64,
    /// booting, idle, busy, keepalive (waiting in place on a kept-alive
    /// connection), stopping.
    pub state: &'static str,
    /// Seconds in that state (since fork while booting).
    pub for_s: f64,
    /// Connections served.
    pub requests: u64,
    /// The worker's last reading of its own memory.
    pub memory: Option<crate::memory::Memory>,
}

impl WorkerStatus {
    /// From the supervisor's view, the observed state and memory.
    pub fn new(
        v: &WorkerView,
        state: WorkerState,
        memory: Option<crate::memory::Memory>,
        now: MonoTime,
    ) -> WorkerStatus {
        let (name, since) = match (v.stopping, state) {
            (true, _) => ("stopping", None),
            (false, WorkerState::Busy { since }) => ("busy", Some(since)),
            (false, WorkerState::Idle { since }) => ("idle", Some(since)),
            (false, WorkerState::KeepAlive { since }) => ("keepalive", Some(since)),
            (false, WorkerState::Booting) if v.ready => ("idle", None),
            (false, WorkerState::Booting) => ("booting", None),
        };
        WorkerStatus {
            slot: v.slot,
            pid: v.pid.as_raw(),
            generation: v.generation,
            state: name,
            for_s: now
                .saturating_since(since.unwrap_or(v.spawned_at))
                .as_secs_f64(),
            requests: v.requests,
            memory,
        }
    }
}

/// Resident set size now, KiB (/proc/PID/statm: a counter, no page walk).
fn rss_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * (crate::sys::page_size() as u64 / 1024))
}

/// Memory for the document: RSS, PSS, private (USS) and shared, KiB.
fn memory_json(m: Option<crate::memory::Memory>) -> serde_json::Value {
    match m {
        Some(m) => json!({ "rss_kib": m.rss_kib, "pss_kib": m.pss_kib,
                           "private_kib": m.private_kib, "shared_kib": m.shared_kib }),
        None => serde_json::Value::Null,
    }
}

/// The JSON document.
#[allow(clippy::too_many_arguments)]
pub fn document(
    master: u32,
    strategy: &str,
    generation: u64,
    uptime: Duration,
    target: usize,
    scale: Option<&crate::scaling::ScaleConfig>,
    workers: &[WorkerStatus],
    retired_requests: u64,
    listeners: &[(String, Option<(u32, u32)>)],
    held: Option<(usize, usize, usize)>,
) -> String {
    let count = |s: &str| workers.iter().filter(|w| w.state == s).count();
    let served: u64 = workers.iter().map(|w| w.requests).sum::<u64>() + retired_requests;
    // The master's own reading, made here (one read per status request);
    // the workers' come from their cells (each worker reads its own).
    let own = crate::memory::read(master as i32).ok();
    let doc = json!({
        "master": { "pid": master, "strategy": strategy, "generation": generation,
                    "uptime_s": uptime.as_secs_f64(), "rss_kib": own.map(|m| m.rss_kib),
                    "memory": memory_json(own) },
        "workers": workers.iter().map(|w| {
            let mem = memory_json(w.memory);
            json!({
                "slot": w.slot, "pid": w.pid, "generation": w.generation, "state": w.state,
                "for_s": (w.for_s * 1000.0).round() / 1000.0, "requests": w.requests,
                "rss_kib": rss_kib(w.pid), "memory": mem,
            })
        }).collect::<Vec<_>>(),
        "scale": scale.map(|c| json!({
            "min": c.min, "max": c.max, "spare": c.spare,
            "window_s": c.window.as_secs_f64(), "stall_s": c.stall.as_secs_f64(),
        })),
        "totals": { "target": target, "workers": workers.len(), "busy": count("busy"),
                    "idle": count("idle"), "keepalive": count("keepalive"), "booting": count("booting"),
                    "stopping": count("stopping"), "requests": served },
        "held": held.map(|(reading, queued, parked)| json!({
            "reading": reading, "queued": queued, "parked": parked,
            "total": reading + queued + parked,
        })),
        "listeners": listeners.iter().map(|(addr, q)| json!({
            "addr": addr,
            "accept_queue": q.map(|(n, _)| n),
            "backlog": q.map(|(_, b)| b),
        })).collect::<Vec<_>>(),
    });
    let mut s = doc.to_string();
    s.push('\n');
    s
}

impl StatusServer {
    /// Binds `path` (a stale socket is replaced, a live one refused), mode
    /// 0600 before listen(2), non-blocking.
    pub fn bind(path: &Path) -> Result<StatusServer> {
        let opts = BindOptions {
            backlog: 64,
            unix_mode: Some(0o600),
            ..BindOptions::default()
        };
        let mut ls = listener::bind_all(&[BindSpec::Unix(path.to_path_buf())], &opts)?;
        let listener = ls.remove(0);
        listener
            .socket()
            .set_nonblocking(true)
            .map_err(|e| crate::Error::sys(format!("O_NONBLOCK on unix:{}", path.display()), e))?;
        Ok(StatusServer {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts every waiting client and answers those allowed.
    pub fn answer_all(&self, doc: &str) {
        let me = nix::unistd::geteuid().as_raw();
        for _ in 0..64 {
            let Ok((conn, _)) = self.listener.socket().accept() else {
                return; // EAGAIN: nobody left (or a transient error)
            };
            let uid = getsockopt(&conn, sockopt::PeerCredentials).map(|c| c.uid());
            match uid {
                Ok(uid) if uid == me || uid == 0 => {
                    let _ = conn.set_write_timeout(Some(Duration::from_millis(200)));
                    let mut stream =
                        std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(conn));
                    let _ = stream.write_all(doc.as_bytes());
                    // Whatever the client sent (a request line, say) is never
                    // needed, but closing with it unread would reset the
                    // connection and could cost the client the document.
                    drain(&mut stream);
                }
                Ok(uid) => tracing::warn!(
                    "status socket: refused a client with uid {uid} (only uid {me} and root)"
                ),
                Err(e) => tracing::warn!("status socket: SO_PEERCRED failed: {e}"),
            }
        }
    }

    /// In a worker: close the socket, leave the file to the master.
    pub fn forget_in_child(self) {
        drop(self.listener);
    }

    /// On exit: close and remove the socket file if it is still ours.
    pub fn remove(mut self) {
        self.listener.remove_socket_file();
    }
}

/// Reads and drops what a client has sent so far (at most 64 KiB), without
/// waiting for more.
fn drain(stream: &mut std::os::unix::net::UnixStream) {
    use std::io::Read;
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

impl AsFd for StatusServer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}
