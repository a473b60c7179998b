//! fdpass as the front: the master buffers each request and parks idle
//! kept-alive connections, so that no slow or idle client holds a worker.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn front(extra: &[&str]) -> (Server, tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = format!("unix:{}", dir.path().join("status.sock").display());
    let mut args = vec!["--app", "http", "--status", sock.as_str()];
    args.extend_from_slice(extra);
    let s = start("fdpass", &args);
    (s, dir, sock)
}

fn connect(addr: &str) -> TcpStream {
    let c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(T)).expect("timeout");
    c
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";

fn held(sock: &str) -> (u64, u64, u64) {
    let doc = status_json(sock);
    let h = &doc["held"];
    (
        h["reading"].as_u64().expect("reading"),
        h["queued"].as_u64().expect("queued"),
        h["parked"].as_u64().expect("parked"),
    )
}

/// 100 slow clients, each trickling a header line a second, while normal
/// clients come and go: every normal request is answered promptly (the
/// bound separates "served" from "starved until the 10 s header
/// deadline"), no worker is ever busy with a slow client, and the master
/// holds the slow ones as reading.
#[test]
fn slow_clients_hold_no_worker() {
    let (s, _dir, sock) = front(&["--workers", "4"]);
    let mut slow: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut c = connect(s.addr());
            c.write_all(b"GET / HTTP/1.1\r\n").expect("first line");
            c
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let dripping = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for c in &mut slow {
                    let _ = c.write_all(b"X-Slow: 1\r\n");
                }
                std::thread::sleep(Duration::from_millis(1000));
            }
            slow
        })
    };
    assert!(
        wait_until(T, || held(&sock).0 >= 100),
        "the master holds the slow clients as reading: {:?}",
        held(&sock)
    );
    let mut slowest = Duration::ZERO;
    for _ in 0..30 {
        let t0 = Instant::now();
        let mut c = connect(s.addr());
        let r = request(
            &mut c,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .expect("a normal request is answered");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        slowest = slowest.max(t0.elapsed());
        let doc = status_json(&sock);
        let busy = doc["totals"]["busy"].as_u64().expect("busy");
        // At most the one normal request in flight at a time is busy.
        assert!(busy <= 1, "a worker busy with a slow client: {doc}");
    }
    stop.store(true, Ordering::Relaxed);
    drop(dripping.join().expect("drip"));
    assert!(
        slowest < Duration::from_secs(2),
        "slowest normal request {slowest:?}"
    );
}

/// Connections parked in the master survive SIGKILL of every worker: the
/// next request on each is answered by the replacements.
#[test]
fn parked_connections_survive_the_death_of_every_worker() {
    let (s, _dir, sock) = front(&["--workers", "2"]);
    let mut conns: Vec<TcpStream> = (0..10).map(|_| connect(s.addr())).collect();
    for c in &mut conns {
        let r = request(c, GET).expect("first request");
        assert!(r.contains("Connection: keep-alive"), "{r}");
    }
    assert!(wait_until(T, || held(&sock).2 == 10), "{:?}", held(&sock));
    let old = s.workers();
    for pid in &old {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGKILL);
    }
    let old: std::collections::HashSet<i32> = old.into_iter().collect();
    assert!(wait_replaced(&s, &old, 2), "{}", s.log());
    for c in &mut conns {
        let r = request(c, GET).expect("the parked connection is answered");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
}

/// HUP replaces every worker and keeps what the master holds: the next
/// request on each parked connection is answered by the new generation.
#[test]
fn parked_connections_survive_a_reload() {
    let (s, _dir, sock) = front(&["--workers", "2"]);
    let mut conns: Vec<TcpStream> = (0..5).map(|_| connect(s.addr())).collect();
    for c in &mut conns {
        request(c, GET).expect("first request");
    }
    assert!(wait_until(T, || held(&sock).2 == 5), "{:?}", held(&sock));
    let old: std::collections::HashSet<i32> = s.workers().into_iter().collect();
    s.signal(Signal::SIGHUP);
    assert!(wait_replaced(&s, &old, 2), "{}", s.log());
    for c in &mut conns {
        let r = request(c, GET).expect("the parked connection is answered after HUP");
        let worker: i32 = r
            .lines()
            .find_map(|l| l.strip_prefix("X-Worker: "))
            .and_then(|w| w.split('/').nth(1))
            .and_then(|p| p.trim().parse().ok())
            .expect("X-Worker");
        assert!(!old.contains(&worker), "served by the new generation: {r}");
    }
}

/// A pipelined pair, and a body sent in two slow halves, are served whole.
#[test]
fn a_pipelined_pair_and_a_body_in_two_slow_halves_are_served_whole() {
    let (s, _dir, _sock) = front(&["--workers", "2"]);
    let mut c = connect(s.addr());
    c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /sleep/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut all = String::new();
    c.read_to_string(&mut all).expect("read until close");
    assert_eq!(all.matches("HTTP/1.1 200 OK").count(), 2, "{all}");
    assert!(all.contains("slept 1ms"), "the second request whole: {all}");

    let mut c = connect(s.addr());
    c.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
        .expect("first half");
    std::thread::sleep(Duration::from_millis(500));
    let r = request(&mut c, b"world").expect("answered once the body is whole");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // A body larger than a message carries (handed over in a memfd).
    let big = vec![b'x'; 200 * 1024];
    let mut req = format!(
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        big.len()
    )
    .into_bytes();
    req.extend_from_slice(&big);
    let r = request(&mut c, &req).expect("a 200 KiB body");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

/// At --max-connections the master stops accepting and connections wait
/// in the kernel's backlog: nothing is lost.
#[test]
fn max_connections_backpressure_loses_nothing() {
    let (s, _dir, _sock) = front(&["--workers", "1", "--max-connections", "4"]);
    let addr = s.addr().to_string();
    let clients: Vec<_> = (0..24)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut c = connect(&addr);
                request(
                    &mut c,
                    b"GET /sleep/20 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                )
            })
        })
        .collect();
    let answered = clients
        .into_iter()
        .map(|h| h.join().expect("client"))
        .filter(|r| r.as_ref().is_ok_and(|t| t.starts_with("HTTP/1.1 200")))
        .count();
    assert_eq!(answered, 24, "{}", s.log());
}

/// QUIT closes parked connections at once, lets the request in flight
/// finish, and serves the request the master already took in and queued
/// behind it (the workers are told to stop only once it is handed over);
/// the master exits 0.
#[test]
fn quit_closes_parked_connections_and_loses_no_request_in_flight() {
    let (mut s, _dir, sock) = front(&["--workers", "1"]);
    let mut parked = connect(s.addr());
    request(&mut parked, GET).expect("first request");
    assert!(wait_until(T, || held(&sock).2 == 1), "{:?}", held(&sock));
    let ask = |path: &'static str| {
        let addr = s.addr().to_string();
        std::thread::spawn(move || {
            let mut c = connect(&addr);
            let req = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            request(&mut c, req.as_bytes())
        })
    };
    let in_flight = ask("/sleep/1500");
    assert!(
        s.wait_worker_sleeping(T),
        "the slow request is in the worker"
    );
    let queued = ask("/sleep/1");
    assert!(
        wait_until(T, || held(&sock).1 == 1),
        "the second request waits in the master: {:?}",
        held(&sock)
    );
    let quit = Instant::now();
    s.signal(Signal::SIGQUIT);
    let mut rest = Vec::new();
    parked
        .read_to_end(&mut rest)
        .expect("the parked connection is closed");
    assert!(rest.is_empty());
    assert!(
        quit.elapsed() < Duration::from_secs(1),
        "closed after {:?}",
        quit.elapsed()
    );
    let r = in_flight
        .join()
        .expect("client")
        .expect("the request in flight is answered");
    assert!(r.contains("slept 1500ms"), "{r}");
    let r = queued
        .join()
        .expect("client")
        .expect("the queued request is answered");
    assert!(r.contains("slept 1ms"), "{r}");
    assert_eq!(s.wait_exit(T).and_then(|st| st.code()), Some(0));
}

/// The master at its descriptor limit with connections held: accept
/// pauses (no spinning), and serving resumes once descriptors are free.
#[test]
fn the_master_at_its_descriptor_limit_does_not_spin_and_recovers() {
    let (s, _dir, sock) = front(&["--workers", "1"]);
    let pid = s.pid().to_string();
    let open_now = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .count();
    // Room for 8 more descriptors, then fill them with parked connections.
    let limit = (open_now + 8).to_string();
    let set = |soft: &str| {
        let st = std::process::Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={soft}:")])
            .status()
            .expect("prlimit (util-linux)");
        assert!(st.success());
    };
    set(&limit);
    // Park connections until one is not answered within 2.5 s: the master
    // then holds every descriptor it may (its copies of connections handed
    // to workers are released at its first turn 100 ms after, and a quiet
    // master turns at least once a second), and that one waits.
    let mut parked: Vec<TcpStream> = Vec::new();
    let mut waiting: Vec<TcpStream> = Vec::new();
    for _ in 0..32 {
        let mut c = connect(s.addr());
        c.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        match request(&mut c, GET) {
            Ok(_) => parked.push(c),
            Err(_) => {
                waiting.push(c);
                break;
            }
        }
    }
    assert_eq!(
        waiting.len(),
        1,
        "the limit was reached: {} parked",
        parked.len()
    );
    // More clients than descriptors: they wait in the backlog too.
    for _ in 0..3 {
        let mut c = connect(s.addr());
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .expect("write");
        waiting.push(c);
    }
    assert!(
        s.wait_log("pausing accept", T),
        "the master reached its limit: {}",
        s.log()
    );
    let ticks = |p: &str| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).expect("stat");
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .expect("fields")
            .split_whitespace()
            .collect();
        f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
    };
    let before = ticks(&pid);
    std::thread::sleep(Duration::from_secs(1));
    let spent = ticks(&pid) - before;
    assert!(
        spent <= 20,
        "the master spun at its limit: {spent} ticks in 1 s"
    );
    // Every one of them is held back until relief.
    let mut held_back = 0;
    for c in &waiting {
        c.set_nonblocking(true).expect("nonblocking");
        let mut probe = [0u8; 1];
        if matches!(
            c.peek(&mut probe),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        ) {
            held_back += 1;
        }
        c.set_nonblocking(false).expect("blocking");
    }
    assert_eq!(
        held_back,
        waiting.len(),
        "a client was answered before relief: {}",
        s.log()
    );
    // A connection a worker handed back at the limit found its place in the
    // master's reserve: none was closed for want of a descriptor.
    assert!(!s.log().contains("malformed"), "{}", s.log());
    // Relief: close the parked connections and raise the limit.
    drop(parked);
    set("4096");
    for mut c in waiting {
        c.set_read_timeout(Some(T)).expect("timeout");
        // (Their requests were sent already: read one response each.)
        let r = request(&mut c, b"").expect("answered after relief");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    let _ = held(&sock);
}
