//! `--metrics ADDR`: the Prometheus text exposition, served by the master.
//!
//! The exposition is written by the Prometheus project's own Rust client
//! (`prometheus-client`, its Prometheus text encoder), from a [`Snapshot`]
//! of the master's state taken at each scrape: nothing is counted twice,
//! and no metric object lives in the hot path. The request-duration
//! histogram comes from the workers' scoreboard cells, where each worker
//! adds its own busy-to-idle durations (two atomic adds per request, only
//! with `--metrics`).
//!
//! The endpoint is a small HTTP/1.0 server in the master's single thread:
//! a non-blocking listener, at most [`MAX_CLIENTS`] clients, each with
//! [`CLIENT_DEADLINE`] to send its request head; the answer (a few KiB) is
//! written at once and the connection closed.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::clock::MonoTime;
use crate::scoreboard::{Durations, DURATION_BOUNDS_US};

/// Clients served at once; more wait in the listen queue.
pub const MAX_CLIENTS: usize = 16;
/// A client that has not sent its request head by then is closed.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(2);

/// Why workers exited, as the `reason` label says.
pub const EXIT_REASONS: [&str; 9] = [
    "crash",
    "boot_failure",
    "timeout_kill",
    "unresponsive_kill",
    "recycle",
    "scale_down",
    "reload",
    "shutdown",
    "other",
];

/// What a scrape shows: the master's state at that moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Workers by state (busy, idle, keepalive, booting, stopping).
    pub workers: BTreeMap<&'static str, u64>,
    /// The pool's target size.
    pub target: u64,
    /// Requests served, by every worker ever.
    pub requests: u64,
    /// Worker exits by reason ([`EXIT_REASONS`]).
    pub exits: BTreeMap<&'static str, u64>,
    /// Per listener: (address, connections queued, backlog).
    pub listen_queues: Vec<(String, u64, u64)>,
    /// TcpExtListenOverflows of this host (/proc/net/netstat).
    pub listen_overflows: Option<u64>,
    /// Connections the fdpass master holds: reading, queued, parked.
    pub held: Option<(u64, u64, u64)>,
    /// Pool size decisions: (grow, shrink).
    pub scale_events: (u64, u64),
    /// The worker generation (bumped by each reload).
    pub generation: u64,
    /// Binary upgrades (USR2) started by this master.
    pub upgrades: u64,
    /// Request durations.
    pub durations: Durations,
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = |enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
            let g = ConstGauge::new(v as i64);
            let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
            g.encode(m)
        };
        let counter = |enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
            let c = ConstCounter::new(v);
            let m = enc.encode_descriptor(name, help, None, c.metric_type())?;
            c.encode(m)
        };
        {
            let mut m = enc.encode_descriptor(
                "prefork_workers",
                "Worker processes by state.",
                None,
                MetricType::Gauge,
            )?;
            for state in ["busy", "idle", "keepalive", "booting", "stopping"] {
                let n = self.workers.get(state).copied().unwrap_or(0) as i64;
                ConstGauge::new(n).encode(m.encode_family(&[("state", state)])?)?;
            }
        }
        gauge(
            &mut enc,
            "prefork_workers_target",
            "Workers the pool wants.",
            self.target,
        )?;
        counter(
            &mut enc,
            "prefork_requests",
            "Requests served by the workers (connections without keep-alive).",
            self.requests,
        )?;
        {
            let mut m = enc.encode_descriptor(
                "prefork_worker_exits",
                "Worker exits by reason.",
                None,
                MetricType::Counter,
            )?;
            for reason in EXIT_REASONS {
                let n = self.exits.get(reason).copied().unwrap_or(0);
                ConstCounter::new(n).encode(m.encode_family(&[("reason", reason)])?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "prefork_listen_queue",
                "Connections waiting in a listener's accept queue.",
                None,
                MetricType::Gauge,
            )?;
            for (addr, queued, _) in &self.listen_queues {
                ConstGauge::new(*queued as i64)
                    .encode(m.encode_family(&[("listener", addr.as_str())])?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "prefork_listen_backlog",
                "A listener's backlog (the most its accept queue holds).",
                None,
                MetricType::Gauge,
            )?;
            for (addr, _, backlog) in &self.listen_queues {
                ConstGauge::new(*backlog as i64)
                    .encode(m.encode_family(&[("listener", addr.as_str())])?)?;
            }
        }
        if let Some(n) = self.listen_overflows {
            counter(
                &mut enc,
                "prefork_host_listen_overflows",
                "Connections this host dropped because an accept queue was full (TcpExtListenOverflows, every socket of the host).",
                n,
            )?;
        }
        if let Some((reading, queued, parked)) = self.held {
            let mut m = enc.encode_descriptor(
                "prefork_held_connections",
                "Connections the fdpass master holds, by state.",
                None,
                MetricType::Gauge,
            )?;
            for (state, n) in [("reading", reading), ("queued", queued), ("parked", parked)] {
                ConstGauge::new(n as i64).encode(m.encode_family(&[("state", state)])?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "prefork_scale_events",
                "Pool size decisions of the sizing policy.",
                None,
                MetricType::Counter,
            )?;
            for (direction, n) in [
                ("grow", self.scale_events.0),
                ("shrink", self.scale_events.1),
            ] {
                ConstCounter::new(n).encode(m.encode_family(&[("direction", direction)])?)?;
            }
        }
        gauge(
            &mut enc,
            "prefork_generation",
            "The worker generation: 1 at start, one more each reload.",
            self.generation,
        )?;
        counter(
            &mut enc,
            "prefork_upgrades",
            "Binary upgrades (USR2) this master started.",
            self.upgrades,
        )?;
        // Per-bucket counts: the encoder writes them cumulated.
        let buckets: Vec<(f64, u64)> = DURATION_BOUNDS_US
            .iter()
            .map(|&b| b as f64 / 1e6)
            .chain([f64::INFINITY])
            .zip(self.durations.buckets)
            .collect();
        let mut m = enc.encode_descriptor(
            "prefork_request_duration_seconds",
            "Time from a worker taking a request to its answer (busy to idle).",
            None,
            MetricType::Histogram,
        )?;
        m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.durations.sum_us as f64 / 1e6,
            self.durations.count(),
            &buckets,
            None,
        )
    }
}

/// The exposition of `snapshot`, in the Prometheus text format.
pub fn render(snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::error!("metrics: encoding failed: {e}");
    }
    out
}

/// A listener of the master's own (metrics, agent): non-blocking,
/// close-on-exec, with SO_REUSEPORT so that a new master started by USR2
/// binds the same port while the old one still answers.
pub(crate) fn side_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    sock.listen(64)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// TcpExtListenOverflows from /proc/net/netstat.
pub fn host_listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?.split_whitespace();
    let values = lines.next()?.split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
}

struct Client {
    stream: TcpStream,
    head: Vec<u8>,
    deadline: MonoTime,
}

/// The master's metrics endpoint.
pub struct MetricsServer {
    listener: TcpListener,
    clients: Vec<Client>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.listener.local_addr().ok())
            .field("clients", &self.clients.len())
            .finish()
    }
}

impl MetricsServer {
    /// Binds `addr` (close-on-exec, non-blocking). SO_REUSEPORT lets a
    /// new master started by USR2 bind the same port while this one still
    /// serves: during an upgrade either answers a scrape.
    pub fn bind(addr: SocketAddr) -> io::Result<MetricsServer> {
        let listener = side_listener(addr)?;
        Ok(MetricsServer {
            listener,
            clients: Vec::new(),
        })
    }

    /// The bound address (its real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The descriptors to poll: the listener while there is room, and
    /// every client.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut v: Vec<BorrowedFd<'_>> = self.clients.iter().map(|c| c.stream.as_fd()).collect();
        if self.clients.len() < MAX_CLIENTS {
            v.push(self.listener.as_fd());
        }
        v
    }

    /// True when `fd` is one of [`MetricsServer::fds`].
    pub fn owns(&self, fd: RawFd) -> bool {
        fd == self.listener.as_raw_fd() || self.clients.iter().any(|c| c.stream.as_raw_fd() == fd)
    }

    /// Accepts what waits, reads what clients sent, answers each whose
    /// request head is whole with `page()` (made once per turn, if any
    /// client needs it), and drops clients past their deadline.
    pub fn turn(&mut self, page: impl FnOnce() -> String) {
        let now = MonoTime::now();
        while self.clients.len() < MAX_CLIENTS {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        self.clients.push(Client {
                            stream,
                            head: Vec::new(),
                            deadline: now + CLIENT_DEADLINE,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break, // WouldBlock, or EMFILE: the next turn
            }
        }
        let mut ready = Vec::new();
        self.clients.retain_mut(|c| {
            let mut buf = [0u8; 1024];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => return false,
                    Ok(n) => {
                        c.head.extend_from_slice(&buf[..n]);
                        if c.head.len() > 8192 {
                            return false;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return false,
                }
            }
            if c.head.windows(4).any(|w| w == b"\r\n\r\n") {
                ready.push(c.stream.try_clone());
                return false;
            }
            now < c.deadline
        });
        if ready.is_empty() {
            return;
        }
        let body = page();
        let response = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        for stream in ready.into_iter().flatten() {
            // A few KiB: the socket buffer takes it at once; a client that
            // cannot take it loses its scrape, never the master's time.
            let mut s = stream;
            let _ = s.write_all(response.as_bytes());
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
    }

    /// When the next client deadline passes.
    pub fn next_deadline(&self) -> Option<MonoTime> {
        self.clients.iter().map(|c| c.deadline).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_every_family() {
        let mut s = Snapshot {
            target: 4,
            requests: 12,
            generation: 2,
            upgrades: 1,
            held: Some((1, 2, 3)),
            listen_overflows: Some(7),
            ..Snapshot::default()
        };
        s.workers.insert("busy", 1);
        s.workers.insert("idle", 3);
        s.exits.insert("crash", 2);
        s.listen_queues.push(("127.0.0.1:8080".into(), 5, 1024));
        s.durations.buckets[0] = 3;
        s.durations.buckets[13] = 1;
        s.durations.sum_us = 20_001_500;
        let text = render(s);
        for needle in [
            "prefork_workers{state=\"busy\"} 1",
            "prefork_workers{state=\"idle\"} 3",
            "prefork_workers_target 4",
            "prefork_requests_total 12",
            "prefork_worker_exits_total{reason=\"crash\"} 2",
            "prefork_worker_exits_total{reason=\"recycle\"} 0",
            "prefork_listen_queue{listener=\"127.0.0.1:8080\"} 5",
            "prefork_host_listen_overflows_total 7",
            "prefork_held_connections{state=\"parked\"} 3",
            "prefork_generation 2",
            "prefork_upgrades_total 1",
            "prefork_request_duration_seconds_bucket{le=\"0.001\"} 3",
            "prefork_request_duration_seconds_bucket{le=\"10\"} 3",
            "prefork_request_duration_seconds_bucket{le=\"+Inf\"} 4",
            "prefork_request_duration_seconds_count 4",
            "prefork_request_duration_seconds_sum 20.0015",
        ] {
            assert!(text.contains(needle), "{needle} in:\n{text}");
        }
    }
}
