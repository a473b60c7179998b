//! Many kept-alive connections that are mostly idle: each sends a request,
//! reads the response, thinks for a while, and sends the next on the same
//! connection. A server that keeps a worker on each open connection needs
//! as many workers as there are clients; one that parks idle connections
//! (the fdpass front) needs as many as there are requests in flight.
//!
//! One thread, one mio (epoll) loop; the connections' next send times are
//! a heap. A request's latency counts from when it was due, so a server
//! that cannot take a connection's request on time shows it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;

use crate::load::Percentiles;

/// One run of idle kept-alive clients.
#[derive(Debug, Clone)]
pub struct IdleConfig {
    /// The server.
    pub target: SocketAddr,
    /// Connections, each kept alive.
    pub connections: usize,
    /// Between a response and the next request on the same connection.
    pub think: Duration,
    /// How long to run (after every connection is open).
    pub duration: Duration,
    /// A response not complete within this counts as an error.
    pub timeout: Duration,
}

/// What the run saw.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    /// Connections opened (at the start, and again after one was lost).
    pub connects: u64,
    /// Requests answered with a 2xx.
    pub ok: u64,
    /// Requests that failed (reset, closed early, timed out, not 2xx).
    pub errors: u64,
    /// Connections the server closed between requests.
    pub closed_idle: u64,
    /// Latency from each request's due time to its whole response, µs.
    pub latency_us: Percentiles,
    /// How long it ran, s.
    pub elapsed_s: f64,
}

#[derive(Debug)]
enum State {
    /// Waiting until its next request is due.
    Thinking,
    /// Sending, then reading, the request due at `due`.
    Busy { due: Instant, sent: usize },
}

#[derive(Debug)]
struct Client {
    stream: Option<TcpStream>,
    state: State,
    buf: Vec<u8>,
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n";

/// Runs the clients; blocks until done.
pub fn run(cfg: &IdleConfig) -> io::Result<IdleReport> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut report = IdleReport {
        connects: 0,
        ok: 0,
        errors: 0,
        closed_idle: 0,
        latency_us: Percentiles::default(),
        elapsed_s: 0.0,
    };
    let start = Instant::now();
    // The first requests are spread over one think time, so that the load
    // is even from the start.
    let spread = |i: usize| cfg.think.mul_f64(i as f64 / cfg.connections.max(1) as f64);
    let mut due: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
    let mut clients: Vec<Client> = Vec::with_capacity(cfg.connections);
    for i in 0..cfg.connections {
        clients.push(Client {
            stream: None,
            state: State::Thinking,
            buf: Vec::new(),
        });
        due.push(Reverse((start + spread(i), i)));
    }
    let end = start + cfg.duration;
    loop {
        let now = Instant::now();
        // Start every request that is due.
        while let Some(&Reverse((at, i))) = due.peek() {
            if at > now {
                break;
            }
            due.pop();
            if at >= end {
                continue; // the run is over: nothing new is sent
            }
            let c = &mut clients[i];
            if c.stream.is_none() {
                let mut s = TcpStream::connect(cfg.target)?;
                poll.registry().register(
                    &mut s,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                c.stream = Some(s);
                report.connects += 1;
            }
            c.state = State::Busy { due: at, sent: 0 };
            c.buf.clear();
            step(c, i, &mut report, &mut hist, &mut due, cfg, &poll)?;
        }
        let busy = clients
            .iter()
            .any(|c| matches!(c.state, State::Busy { .. }));
        if now >= end && !busy {
            break;
        }
        if now >= end + cfg.timeout {
            // Whatever is still outstanding timed out.
            report.errors += clients
                .iter()
                .filter(|c| matches!(c.state, State::Busy { .. }))
                .count() as u64;
            break;
        }
        let next = due
            .peek()
            .map(|Reverse((at, _))| *at)
            .unwrap_or(end)
            .min(end + cfg.timeout);
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        poll.poll(&mut events, Some(wait))?;
        for ev in events.iter() {
            let i = ev.token().0;
            if let Some(c) = clients.get_mut(i) {
                if matches!(c.state, State::Thinking) {
                    // Readable while idle: the server closed it (or sent
                    // something unasked): reconnect at the next request.
                    if closed_or_junk(c) {
                        report.closed_idle += 1;
                        drop_stream(c, &poll);
                    }
                    continue;
                }
                step(c, i, &mut report, &mut hist, &mut due, cfg, &poll)?;
            }
        }
        // Requests that take too long.
        let now = Instant::now();
        for (i, c) in clients.iter_mut().enumerate() {
            if let State::Busy { due: at, .. } = c.state {
                if now.saturating_duration_since(at) > cfg.timeout {
                    report.errors += 1;
                    drop_stream(c, &poll);
                    c.state = State::Thinking;
                    due.push(Reverse((now + cfg.think, i)));
                }
            }
        }
    }
    report.elapsed_s = start.elapsed().as_secs_f64();
    let q = |p: f64| hist.value_at_quantile(p);
    report.latency_us = Percentiles {
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        p999: q(0.999),
        max: hist.max(),
    };
    Ok(report)
}

/// Sends what is left of the request, reads what came of the response, and
/// when it is whole records it and schedules the next.
fn step(
    c: &mut Client,
    i: usize,
    report: &mut IdleReport,
    hist: &mut Histogram<u64>,
    due: &mut BinaryHeap<Reverse<(Instant, usize)>>,
    cfg: &IdleConfig,
    poll: &Poll,
) -> io::Result<()> {
    let State::Busy { due: at, sent } = &mut c.state else {
        return Ok(());
    };
    let at = *at;
    let Some(s) = c.stream.as_mut() else {
        return Ok(());
    };
    let mut failed = false;
    while *sent < REQUEST.len() {
        match s.write(&REQUEST[*sent..]) {
            Ok(n) => *sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(()), // connecting
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    let mut chunk = [0u8; 4096];
    while !failed {
        match s.read(&mut chunk) {
            Ok(0) => failed = true,
            Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => failed = true,
        }
    }
    let whole = response_len(&c.buf);
    let now = Instant::now();
    match whole {
        Some((len, ok)) if c.buf.len() >= len => {
            if ok {
                report.ok += 1;
                let _ = hist.record(now.saturating_duration_since(at).as_micros().max(1) as u64);
            } else {
                report.errors += 1;
            }
            c.state = State::Thinking;
            due.push(Reverse((now + cfg.think, i)));
            if failed {
                drop_stream(c, poll); // answered, then closed: reconnect next time
            }
        }
        _ if failed => {
            report.errors += 1;
            drop_stream(c, poll);
            c.state = State::Thinking;
            due.push(Reverse((now + cfg.think, i)));
        }
        _ => {}
    }
    Ok(())
}

/// When the head of a response is in `buf`: its whole length (head and
/// Content-Length body) and whether its status is 2xx.
fn response_len(buf: &[u8]) -> Option<(usize, bool)> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(head)) => {
            let len = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
                .unwrap_or(0);
            let ok = resp.code.is_some_and(|c| (200..300).contains(&c));
            Some((head + len, ok))
        }
        _ => None,
    }
}

fn closed_or_junk(c: &mut Client) -> bool {
    let Some(s) = c.stream.as_mut() else {
        return false;
    };
    let mut probe = [0u8; 512];
    match s.read(&mut probe) {
        Ok(0) => true,              // the server closed it
        Ok(unasked) => unasked > 0, // bytes nobody asked for
        Err(e) => e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::Interrupted,
    }
}

fn drop_stream(c: &mut Client, poll: &Poll) {
    if let Some(mut s) = c.stream.take() {
        let _ = poll.registry().deregister(&mut s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_whole_with_its_body() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(response_len(head), Some((head.len() + 3, true)));
        assert_eq!(
            response_len(b"HTTP/1.1 503 Busy\r\n\r\n"),
            Some((21, false))
        );
        assert_eq!(response_len(b"HTTP/1.1 200 OK\r\nContent-"), None);
    }

    /// A tiny kept-alive server: answers every request on a connection.
    #[test]
    fn idle_clients_send_a_request_per_think_time_on_kept_alive_connections() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let target = l.local_addr().expect("addr");
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = std::sync::Arc::clone(&accepted);
        std::thread::spawn(move || {
            for s in l.incoming().take(4) {
                let Ok(mut s) = s else { continue };
                seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                    }
                });
            }
        });
        let r = run(&IdleConfig {
            target,
            connections: 4,
            think: Duration::from_millis(100),
            duration: Duration::from_millis(1000),
            timeout: Duration::from_secs(2),
        })
        .expect("run");
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(r.connects, 4, "one connection each, kept alive: {r:?}");
        // About 10 requests per connection in 1 s at 100 ms think time.
        assert!((28..=44).contains(&r.ok), "{r:?}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), 4);
    }
}
