//! HTTP/1.1 persistence as RFC 9112 says, and request bodies, for every
//! strategy: the http app frames requests, and the connection stays open
//! (in the worker, or parked in the fdpass master) exactly when it should.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use rstest::rstest;
use rstest_reuse::apply;

/// Sends `raw` on a new connection and reads until the server closes it
/// (or `T` passes): every response, as text.
fn until_closed(addr: &str, raw: &[u8]) -> String {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(T)).expect("timeout");
    c.write_all(raw).expect("write");
    let mut all = Vec::new();
    c.read_to_end(&mut all)
        .expect("the server closes the connection");
    String::from_utf8_lossy(&all).into_owned()
}

/// Sends `raw` and reads one response; the connection stays open.
fn one_response(c: &mut TcpStream, raw: &[u8]) -> String {
    request(c, raw).expect("a response")
}

fn keep_alive_count(text: &str) -> usize {
    text.matches("Connection: keep-alive").count()
}

#[apply(every_strategy)]
fn http_persistence_follows_rfc_9112(strategy: &str) {
    let s = start(strategy, &["--workers", "2", "--app", "http"]);
    let a = s.addr();

    // HTTP/1.1 is persistent by default: two requests on one connection,
    // the second asks to close, and the server does.
    let text = until_closed(
        a,
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert_eq!(keep_alive_count(&text), 1, "{text}");

    // HTTP/1.0 is not persistent unless asked: the server closes after one.
    let text = until_closed(a, b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 1, "{text}");
    assert!(text.contains("Connection: close"), "{text}");

    // HTTP/1.0 with keep-alive is: a second request on the same connection.
    let mut c = TcpStream::connect(a).expect("connect");
    c.set_read_timeout(Some(T)).expect("timeout");
    let first = one_response(&mut c, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(keep_alive_count(&first), 1, "{first}");
    let second = one_response(&mut c, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert!(second.starts_with("HTTP/1.1 200 OK"), "{second}");

    // Connection is a list of tokens: `close` anywhere in it closes.
    let text = until_closed(a, b"GET / HTTP/1.1\r\nConnection: Upgrade, close\r\n\r\n");
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 1, "{text}");
    assert!(text.contains("Connection: close"), "{text}");

    // A body (Content-Length, then chunked) is read, and the connection kept.
    let mut c = TcpStream::connect(a).expect("connect");
    c.set_read_timeout(Some(T)).expect("timeout");
    let post = one_response(
        &mut c,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world",
    );
    assert!(post.starts_with("HTTP/1.1 200 OK"), "{post}");
    assert_eq!(keep_alive_count(&post), 1, "{post}");
    let chunked = one_response(
        &mut c,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    assert!(chunked.starts_with("HTTP/1.1 200 OK"), "{chunked}");
    assert_eq!(keep_alive_count(&chunked), 1, "{chunked}");
    let after = one_response(&mut c, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(
        after.starts_with("HTTP/1.1 200 OK"),
        "the connection survived both bodies: {after}"
    );
}

#[apply(every_strategy)]
fn a_body_over_the_limit_gets_413_and_a_smuggled_one_400(strategy: &str) {
    let s = start(
        strategy,
        &[
            "--workers",
            "1",
            "--app",
            "http",
            "--max-body",
            "1k",
            "--max-body-buffer",
            "1k",
        ],
    );
    let big = format!(
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n{}",
        "x".repeat(5000)
    );
    let text = until_closed(s.addr(), big.as_bytes());
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    let text = until_closed(
        s.addr(),
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    // The server is fine afterwards.
    assert_eq!(http_get(s.addr(), "/", T).expect("GET").status, 200);
}

/// The header-deadline bypass, closed: a kept-alive client that finishes
/// each head just under `--header-timeout` would hold a worker for
/// `--keepalive-requests` deadlines. A connection gets the header timeout
/// for all its heads together, so it is cut with a 408 once they add up.
/// (Under fdpass the master reads the heads and no worker is held at all;
/// the front's tests cover that.)
#[rstest]
#[case::blocking("blocking")]
#[case::mutex("mutex")]
#[case::reuseport("reuseport")]
fn a_kept_alive_connection_gets_one_head_deadline_in_all(#[case] strategy: &str) {
    let s = start(
        strategy,
        &["--workers", "1", "--app", "http", "--header-timeout", "2"],
    );
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(T)).expect("timeout");
    let started = Instant::now();
    let mut answered = 0;
    let mut cut = false;
    for _ in 0..6 {
        // Each head takes about 0.8 s: under the deadline on its own.
        if c.write_all(b"GET / HTTP/1.1\r\n").is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(800));
        let _ = c.write_all(b"Host: a\r\n\r\n");
        let mut buf = [0u8; 4096];
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                if text.starts_with("HTTP/1.1 408") {
                    cut = true;
                    break;
                }
                assert!(text.starts_with("HTTP/1.1 200"), "{text}");
                answered += 1;
            }
        }
    }
    assert!(cut, "cut with a 408 after {answered} requests");
    assert!(
        (1..=3).contains(&answered),
        "{answered} slow heads answered before the cut"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
