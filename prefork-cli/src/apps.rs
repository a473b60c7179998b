//! The built-in apps: `hello`, `echo` and `http`.

use std::io::{self, ErrorKind, Read, Write};
use std::time::Duration;

use prefork_core::{App, BoxError, Connection, MonoTime, WorkerInfo};

/// `hello`: one line naming the worker, then close.
#[derive(Debug, Default)]
pub struct Hello {
    line: Vec<u8>,
}

impl App for Hello {
    fn after_fork(&mut self, w: &WorkerInfo) -> Result<(), BoxError> {
        self.line = format!("hello from worker={} pid={}\n", w.slot, w.pid).into_bytes();
        Ok(())
    }

    fn handle(&mut self, conn: &mut Connection) -> io::Result<()> {
        conn.write_all(&self.line)
    }
}

/// `echo`: sends back what it reads until the client closes or is idle.
#[derive(Debug)]
pub struct Echo {
    /// Close a connection silent for this long.
    pub idle_timeout: Duration,
}

impl App for Echo {
    fn handle(&mut self, conn: &mut Connection) -> io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        let mut last = MonoTime::now();
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    conn.write_all(&buf[..n])?;
                    last = MonoTime::now();
                }
                Err(e) if is_timeout(&e) => {
                    if MonoTime::now().saturating_since(last) >= self.idle_timeout {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Limits of the `http` app.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Whole request head must arrive within this (slow clients are cut).
    pub header_timeout: Duration,
    /// A kept-alive connection idle this long is closed.
    pub keepalive_timeout: Duration,
    /// Requests served on one kept-alive connection at most.
    pub keepalive_requests: u32,
    /// Longest `/sleep/MS` honoured.
    pub max_sleep: Duration,
}

/// Request-head buffer: a head larger than this gets 431.
const HEAD_BUF: usize = 8 * 1024;
/// Headers parsed at most; more gets 431.
const MAX_HEADERS: usize = 32;
const BODY: &[u8] = b"Hello from prefork\n";

/// `http`: HTTP/1.1 with a fixed body and `X-Worker: slot/pid`;
/// `GET /sleep/MS` answers after MS milliseconds.
#[derive(Debug)]
pub struct Http {
    limits: HttpLimits,
    worker: String,
    /// Precomputed 200 responses: the hot path writes one of these as is.
    ok_close: Vec<u8>,
    ok_keep: Vec<u8>,
}

impl Http {
    /// An http app with these limits.
    pub fn new(limits: HttpLimits) -> Http {
        Http {
            limits,
            worker: String::new(),
            ok_close: Vec::new(),
            ok_keep: Vec::new(),
        }
    }

    /// New limits (a reload, before the new workers are forked).
    pub fn set_limits(&mut self, limits: HttpLimits) {
        self.limits = limits;
    }

    fn response(&self, status: &str, body: &[u8], keep: bool) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\nX-Worker: {}\r\n\r\n",
            body.len(),
            if keep { "keep-alive" } else { "close" },
            self.worker
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    /// Answers with an error status and closes without losing the answer.
    fn error(&self, conn: &mut Connection, status: &str) -> io::Result<()> {
        let body = format!("{status}\n");
        conn.write_all(&self.response(status, body.as_bytes(), false))?;
        linger(conn);
        Ok(())
    }
}

/// Lingering close, as nginx does: closing a socket with unread input makes
/// the kernel send RST, and the client may lose the response still in
/// flight. Shut down our side, then read and discard what the client still
/// sends, bounded in bytes and time.
fn linger(conn: &mut Connection) {
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let start = MonoTime::now();
    let mut sink = [0u8; 4096];
    let mut drained = 0usize;
    while drained < 1 << 20 && MonoTime::now().saturating_since(start) < Duration::from_secs(2) {
        match conn.read(&mut sink) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// What the request asked for.
enum Route {
    Hello,
    Sleep(u64),
    BadSleep,
}

fn route(path: &str) -> Route {
    match path.strip_prefix("/sleep/") {
        None => Route::Hello,
        Some(ms) => ms.parse().map(Route::Sleep).unwrap_or(Route::BadSleep),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

impl App for Http {
    fn after_fork(&mut self, w: &WorkerInfo) -> Result<(), BoxError> {
        self.worker = format!("{}/{}", w.slot, w.pid);
        self.ok_close = self.response("200 OK", BODY, false);
        self.ok_keep = self.response("200 OK", BODY, true);
        Ok(())
    }

    fn handle(&mut self, conn: &mut Connection) -> io::Result<()> {
        let mut buf = [0u8; HEAD_BUF];
        let mut filled = 0usize;
        let mut served = 0u32;
        let mut started = MonoTime::now();
        loop {
            // Read until the head is complete, within the deadline.
            let (head_len, keep, has_body, route) = loop {
                if filled > 0 {
                    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let mut req = httparse::Request::new(&mut headers);
                    match req.parse(&buf[..filled]) {
                        Ok(httparse::Status::Complete(n)) => {
                            let mut keep = false;
                            let mut has_body = false;
                            for h in req.headers.iter() {
                                if h.name.eq_ignore_ascii_case("connection") {
                                    keep = h.value.eq_ignore_ascii_case(b"keep-alive");
                                } else if h.name.eq_ignore_ascii_case("content-length") {
                                    has_body |= h.value != b"0";
                                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                                    has_body = true;
                                }
                            }
                            // A request body is not read: answer and close.
                            let keep =
                                keep && !has_body && served + 1 < self.limits.keepalive_requests;
                            break (n, keep, has_body, route(req.path.unwrap_or("/")));
                        }
                        Ok(httparse::Status::Partial) if filled == buf.len() => {
                            return self.error(conn, "431 Request Header Fields Too Large");
                        }
                        Ok(httparse::Status::Partial) => {}
                        Err(httparse::Error::TooManyHeaders) => {
                            return self.error(conn, "431 Request Header Fields Too Large");
                        }
                        Err(_) => return self.error(conn, "400 Bad Request"),
                    }
                }
                match conn.read(&mut buf[filled..]) {
                    Ok(0) => return Ok(()),
                    Ok(n) => filled += n,
                    Err(e) if is_timeout(&e) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                let waited = MonoTime::now().saturating_since(started);
                if filled == 0 && served > 0 {
                    if waited >= self.limits.keepalive_timeout {
                        return Ok(()); // idle kept-alive connection
                    }
                } else if waited >= self.limits.header_timeout {
                    return self.error(conn, "408 Request Timeout");
                }
            };
            match route {
                Route::Hello => {
                    conn.write_all(if keep { &self.ok_keep } else { &self.ok_close })?
                }
                Route::Sleep(ms) => {
                    let d = Duration::from_millis(ms).min(self.limits.max_sleep);
                    std::thread::sleep(d);
                    let body = format!("slept {}ms\n", d.as_millis());
                    conn.write_all(&self.response("200 OK", body.as_bytes(), keep))?;
                }
                Route::BadSleep => return self.error(conn, "400 Bad Request"),
            }
            served += 1;
            if !keep {
                if has_body {
                    linger(conn); // the unread body would turn close into RST
                }
                return Ok(());
            }
            // Keep any pipelined bytes; the next head has its own deadline.
            buf.copy_within(head_len..filled, 0);
            filled -= head_len;
            started = MonoTime::now();
        }
    }
}
