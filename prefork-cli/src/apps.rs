//! The built-in apps: `hello`, `echo` and `http`.

use std::io::{self, ErrorKind, Read, Write};
use std::time::Duration;

use prefork_core::{App, BoxError, Connection, Frame, MonoTime, Next, WorkerInfo};

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

    fn handle(&mut self, conn: &mut Connection) -> io::Result<Next> {
        conn.write_all(&self.line)?;
        Ok(Next::Close)
    }
}

/// `echo`: sends back what it reads until the client closes or is idle.
#[derive(Debug)]
pub struct Echo {
    /// Close a connection silent for this long.
    pub idle_timeout: Duration,
}

impl App for Echo {
    fn handle(&mut self, conn: &mut Connection) -> io::Result<Next> {
        let mut buf = [0u8; 16 * 1024];
        let mut last = MonoTime::now();
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return Ok(Next::Close),
                Ok(n) => {
                    conn.write_all(&buf[..n])?;
                    last = MonoTime::now();
                }
                Err(e) if is_timeout(&e) => {
                    if MonoTime::now().saturating_since(last) >= self.idle_timeout {
                        return Ok(Next::Close);
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
    /// A request head must arrive within this; on a kept-alive connection,
    /// all its heads together (slow clients are cut with a 408).
    pub header_timeout: Duration,
    /// Requests served on one kept-alive connection at most.
    pub keepalive_requests: u32,
    /// The largest request body read (and discarded); a larger one gets 413.
    pub max_body: u64,
    /// The largest body the fdpass master buffers before handing a request
    /// to a worker; a larger one, or a chunked one, is handed over after
    /// the head and read by the worker.
    pub max_body_buffer: u64,
    /// Longest `/sleep/MS` honoured.
    pub max_sleep: Duration,
}

/// Request-head buffer: a head larger than this gets 431.
const HEAD_BUF: usize = 8 * 1024;
/// Headers parsed at most; more gets 431.
const MAX_HEADERS: usize = 32;
const BODY: &[u8] = b"Hello from prefork\n";

/// `http`: HTTP/1.1 with a fixed body and `X-Worker: slot/pid`;
/// `GET /sleep/MS` answers after MS milliseconds. Connections persist as
/// RFC 9112 says; request bodies are read and discarded.
#[derive(Debug)]
pub struct Http {
    limits: HttpLimits,
    worker: String,
    /// Precomputed 200 responses: the hot path writes one of these as is.
    ok_close: Vec<u8>,
    ok_keep: Vec<u8>,
    /// Time spent reading request heads on the current connection: a
    /// kept-alive connection gets `header_timeout` for all its heads
    /// together, so one that finishes each head just under the deadline
    /// cannot hold a worker for `keepalive_requests` deadlines.
    head_time: Duration,
    /// `--app static`: the directory to load at preload, and its limit.
    root: Option<(std::path::PathBuf, u64)>,
    /// The files, loaded by the master: every worker serves these pages.
    site: Option<crate::site::Site>,
    /// Memory grown on purpose by `GET /grow/MB` (a worker that leaks, for
    /// the `--max-memory` tests): private pages, touched.
    grown: Vec<Vec<u8>>,
}

/// What a request head says, parsed once.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    /// Bytes of the head, CRLFCRLF included.
    len: usize,
    /// HTTP/1.1 (else 1.0).
    http11: bool,
    head_method: bool,
    /// GET or HEAD (what `--app static` serves).
    get_or_head: bool,
    route: Route,
    /// The client asks the connection to stay open (RFC 9112 §9.3).
    persist: bool,
    body: Body,
    /// What `--app static` reads: the target and the conditional and
    /// range headers.
    site: crate::site::Request,
}

/// The request body, as the head announces it.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Body {
    None,
    Length(u64),
    Chunked,
}

/// Why a head is refused.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    Incomplete,
    Status(&'static str),
}

/// Parses a request head from the start of `buf`.
fn parse_head(buf: &[u8]) -> Result<Head, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= HEAD_BUF => {
            return Err(Refusal::Status("431 Request Header Fields Too Large"))
        }
        Ok(httparse::Status::Partial) => return Err(Refusal::Incomplete),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::Status("431 Request Header Fields Too Large"))
        }
        Err(_) => return Err(Refusal::Status("400 Bad Request")),
    };
    let http11 = req.version == Some(1);
    let (mut close, mut keep_alive) = (false, false);
    let mut length: Option<u64> = None;
    let mut transfer: Option<bool> = None; // Some(chunked is the final coding)
    let mut site = crate::site::Request {
        head_method: req.method == Some("HEAD"),
        target: req.path.unwrap_or("/").to_string(),
        ..crate::site::Request::default()
    };
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("if-none-match") {
            site.if_none_match = Some(text(h.value));
        } else if h.name.eq_ignore_ascii_case("if-modified-since") {
            site.if_modified_since = Some(text(h.value));
        } else if h.name.eq_ignore_ascii_case("range") {
            site.range = Some(text(h.value));
        } else if h.name.eq_ignore_ascii_case("if-range") {
            site.if_range = Some(text(h.value));
        } else if h.name.eq_ignore_ascii_case("connection") {
            // A list of tokens, possibly over several header lines.
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(Refusal::Status("400 Bad Request"))?;
            if length.is_some_and(|l| l != v) {
                return Err(Refusal::Status("400 Bad Request"));
            }
            length = Some(v);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h
                .value
                .split(|&b| b == b',')
                .next_back()
                .map(<[u8]>::trim_ascii);
            transfer = Some(last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")));
        }
    }
    let body = match (transfer, length) {
        // Both framings at once is how requests are smuggled: refused.
        (Some(_), Some(_)) => return Err(Refusal::Status("400 Bad Request")),
        (Some(true), None) if http11 => Body::Chunked,
        (Some(_), None) => return Err(Refusal::Status("400 Bad Request")),
        (None, Some(0)) | (None, None) => Body::None,
        (None, Some(n)) => Body::Length(n),
    };
    Ok(Head {
        len,
        http11,
        head_method: req.method == Some("HEAD"),
        get_or_head: matches!(req.method, Some("GET" | "HEAD")),
        route: route(req.path.unwrap_or("/")),
        persist: if http11 { !close } else { keep_alive && !close },
        body,
        site,
    })
}

impl Http {
    /// An http app with these limits.
    pub fn new(limits: HttpLimits) -> Http {
        Http {
            limits,
            worker: String::new(),
            ok_close: Vec::new(),
            ok_keep: Vec::new(),
            head_time: Duration::ZERO,
            root: None,
            site: None,
            grown: Vec::new(),
        }
    }

    /// `--app static`: serve the files under `root` (at most `max_bytes`),
    /// loaded at preload.
    pub fn serving(mut self, root: std::path::PathBuf, max_bytes: u64) -> Http {
        self.root = Some((root, max_bytes));
        self
    }

    /// New limits (a reload, before the new workers are forked).
    pub fn set_limits(&mut self, limits: HttpLimits) {
        self.limits = limits;
    }

    fn response(&self, status: &str, body: &[u8], keep: bool) -> Vec<u8> {
        let mut r = self.response_head(status, body.len(), keep);
        r.extend_from_slice(body);
        r
    }

    fn response_head(&self, status: &str, body_len: usize, keep: bool) -> Vec<u8> {
        let worker = if self.worker.is_empty() {
            "master"
        } else {
            &self.worker
        };
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {body_len}\r\nConnection: {}\r\nX-Worker: {worker}\r\n\r\n",
            if keep { "keep-alive" } else { "close" },
        )
        .into_bytes()
    }

    fn error_response(&self, status: &str) -> Vec<u8> {
        self.response(status, format!("{status}\n").as_bytes(), false)
    }

    /// Answers with an error status and closes without losing the answer.
    fn error(&self, conn: &mut Connection, status: &str) -> io::Result<Next> {
        conn.write_all(&self.error_response(status))?;
        linger(conn);
        Ok(Next::Close)
    }

    /// Reads one request head into `buf`, within the head-time budget of
    /// this connection. `Ok(None)`: the client closed before sending one.
    fn read_head(
        &mut self,
        conn: &mut Connection,
        buf: &mut [u8; HEAD_BUF],
        filled: &mut usize,
    ) -> io::Result<Result<Option<Head>, &'static str>> {
        let started = MonoTime::now();
        let budget = self.limits.header_timeout.saturating_sub(self.head_time);
        loop {
            if *filled > 0 {
                match parse_head(&buf[..*filled]) {
                    Ok(head) => {
                        self.head_time += MonoTime::now().saturating_since(started);
                        return Ok(Ok(Some(head)));
                    }
                    Err(Refusal::Status(s)) => return Ok(Err(s)),
                    Err(Refusal::Incomplete) => {}
                }
            }
            match conn.read(&mut buf[*filled..]) {
                Ok(0) => return Ok(Ok(None)),
                Ok(n) => *filled += n,
                Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if MonoTime::now().saturating_since(started) >= budget {
                return Ok(Err("408 Request Timeout"));
            }
        }
    }

    /// Reads and discards the request body; `spare` holds what was read
    /// past the head. Returns what was read past the body (a pipelined
    /// next request), or the status to refuse with.
    fn discard_body(
        &self,
        conn: &mut Connection,
        body: Body,
        spare: &[u8],
    ) -> io::Result<Result<Vec<u8>, &'static str>> {
        let deadline = MonoTime::now() + self.limits.header_timeout;
        let mut pending = spare.to_vec();
        let mut fill = |pending: &mut Vec<u8>| -> io::Result<Result<(), &'static str>> {
            let mut chunk = [0u8; 16 * 1024];
            loop {
                match conn.read(&mut chunk) {
                    Ok(0) => return Ok(Err("400 Bad Request")),
                    Ok(n) => {
                        pending.extend_from_slice(&chunk[..n]);
                        return Ok(Ok(()));
                    }
                    Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {
                        if MonoTime::now() >= deadline {
                            return Ok(Err("408 Request Timeout"));
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        match body {
            Body::None => Ok(Ok(pending)),
            Body::Length(n) if n > self.limits.max_body => Ok(Err("413 Content Too Large")),
            Body::Length(n) => {
                let mut left = n;
                loop {
                    let take = left.min(pending.len() as u64) as usize;
                    pending.drain(..take);
                    left -= take as u64;
                    if left == 0 {
                        return Ok(Ok(pending));
                    }
                    if let Err(s) = fill(&mut pending)? {
                        return Ok(Err(s));
                    }
                }
            }
            Body::Chunked => {
                let mut total = 0u64;
                loop {
                    // A chunk: its size line, its data, its CRLF.
                    match httparse::parse_chunk_size(&pending) {
                        Ok(httparse::Status::Complete((at, size))) => {
                            total += size;
                            if total > self.limits.max_body {
                                return Ok(Err("413 Content Too Large"));
                            }
                            if size == 0 {
                                // The last chunk: trailers end at an empty line.
                                match find_crlf_crlf(&pending[at - 2..]) {
                                    Some(end) => {
                                        pending.drain(..at - 2 + end);
                                        return Ok(Ok(pending));
                                    }
                                    None if pending.len() > HEAD_BUF => {
                                        return Ok(Err("400 Bad Request"))
                                    }
                                    None => {}
                                }
                            } else {
                                let need = at as u64 + size + 2;
                                if pending.len() as u64 >= need {
                                    if &pending[need as usize - 2..need as usize] != b"\r\n" {
                                        return Ok(Err("400 Bad Request"));
                                    }
                                    pending.drain(..need as usize);
                                    continue;
                                }
                            }
                        }
                        Ok(httparse::Status::Partial) if pending.len() > 1024 => {
                            return Ok(Err("400 Bad Request"))
                        }
                        Ok(httparse::Status::Partial) => {}
                        Err(_) => return Ok(Err("400 Bad Request")),
                    }
                    if let Err(s) = fill(&mut pending)? {
                        return Ok(Err(s));
                    }
                }
            }
        }
    }
}

/// Where `\r\n\r\n` ends in `b`, if it is there.
fn find_crlf_crlf(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
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
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Hello,
    Sleep(u64),
    /// `/grow/MB`: the worker keeps MB more private memory (for tests of
    /// `--max-memory`).
    Grow(u64),
    BadSleep,
}

fn route(path: &str) -> Route {
    if let Some(mb) = path.strip_prefix("/grow/") {
        return mb.parse().map(Route::Grow).unwrap_or(Route::BadSleep);
    }
    match path.strip_prefix("/sleep/") {
        None => Route::Hello,
        Some(ms) => ms.parse().map(Route::Sleep).unwrap_or(Route::BadSleep),
    }
}

/// Most `/grow/MB` keeps in one worker, in all.
const MAX_GROWN_MB: usize = 1024;

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

impl App for Http {
    fn preload(&mut self) -> Result<(), BoxError> {
        if let Some((root, max)) = &self.root {
            let t0 = std::time::Instant::now();
            let site = crate::site::Site::load(root, *max)?;
            tracing::info!(
                "static: {} files, {} bytes under {} loaded in {:.0} ms",
                site.len(),
                site.bytes(),
                root.display(),
                t0.elapsed().as_secs_f64() * 1e3
            );
            self.site = Some(site);
        }
        Ok(())
    }

    fn after_fork(&mut self, w: &WorkerInfo) -> Result<(), BoxError> {
        self.worker = format!("{}/{}", w.slot, w.pid);
        self.ok_close = self.response("200 OK", BODY, false);
        self.ok_keep = self.response("200 OK", BODY, true);
        Ok(())
    }

    /// In the fdpass master: a request is complete with its head and, when
    /// it is no larger than `max_body_buffer`, its body; a larger or
    /// chunked body is handed over after the head, for the worker to read.
    fn frame(&self, buf: &[u8]) -> Frame {
        match parse_head(buf) {
            Ok(head) => match head.body {
                Body::Length(n)
                    if n <= self.limits.max_body_buffer && n <= self.limits.max_body =>
                {
                    let whole = head.len as u64 + n;
                    if buf.len() as u64 >= whole {
                        Frame::Complete(whole as usize)
                    } else {
                        Frame::Incomplete
                    }
                }
                _ => Frame::Complete(head.len),
            },
            Err(Refusal::Incomplete) => Frame::Incomplete,
            Err(Refusal::Status(s)) => Frame::Reject(self.error_response(s)),
        }
    }

    fn timeout_response(&self) -> Option<Vec<u8>> {
        Some(self.error_response("408 Request Timeout"))
    }

    fn handle(&mut self, conn: &mut Connection) -> io::Result<Next> {
        if conn.requests_before() == 0 {
            self.head_time = Duration::ZERO; // a new connection
        }
        let mut buf = [0u8; HEAD_BUF];
        let mut filled = 0usize;
        let head = match self.read_head(conn, &mut buf, &mut filled)? {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(Next::Close),
            Err(status) => return self.error(conn, status),
        };
        let rest = match self.discard_body(conn, head.body, &buf[head.len..filled])? {
            Ok(rest) => rest,
            Err(status) => return self.error(conn, status),
        };
        let keep = head.persist && conn.requests_before() + 1 < self.limits.keepalive_requests;
        if self.site.is_none() && head.route == Route::BadSleep {
            return self.error(conn, "400 Bad Request");
        }
        if self.site.is_some() {
            self.serve_file(conn, &head, keep)?;
        } else {
            self.serve_route(conn, &head, keep)?;
        }
        if !keep {
            if !rest.is_empty() || !head.http11 {
                linger(conn); // unread input would turn the close into RST
            }
            return Ok(Next::Close);
        }
        conn.unread(&rest);
        Ok(Next::KeepAlive)
    }
}

impl Http {
    /// The built-in routes: hello, `/sleep/MS`, `/grow/MB`.
    fn serve_route(&mut self, conn: &mut Connection, head: &Head, keep: bool) -> io::Result<()> {
        match head.route {
            Route::Hello if head.head_method => {
                conn.write_all(&self.response_head("200 OK", BODY.len(), keep))?
            }
            Route::Hello => conn.write_all(if keep { &self.ok_keep } else { &self.ok_close })?,
            Route::Sleep(ms) => {
                let d = Duration::from_millis(ms).min(self.limits.max_sleep);
                std::thread::sleep(d);
                let body = format!("slept {}ms\n", d.as_millis());
                conn.write_all(&self.response("200 OK", body.as_bytes(), keep))?;
            }
            Route::Grow(mb) => {
                let mb = (mb as usize).min(MAX_GROWN_MB.saturating_sub(self.grown.len()));
                for _ in 0..mb {
                    // Written, so that the pages are this worker's own.
                    self.grown.push(vec![0x5a; 1 << 20]);
                }
                let body = format!("grown to {} MB\n", self.grown.len());
                conn.write_all(&self.response("200 OK", body.as_bytes(), keep))?;
            }
            Route::BadSleep => {
                conn.write_all(&self.response("400 Bad Request", b"400 Bad Request\n", keep))?
            }
        }
        Ok(())
    }

    /// `--app static`: the file the target names, by the rules of
    /// [`crate::site::Site::answer`]; the body goes out with the head in
    /// one writev(2), straight from the master's pages.
    fn serve_file(&self, conn: &mut Connection, head: &Head, keep: bool) -> io::Result<()> {
        use crate::site::Reply;
        let Some(site) = &self.site else {
            return Ok(());
        };
        let connection = if keep { "keep-alive" } else { "close" };
        let worker = &self.worker;
        if !head.get_or_head {
            let body = b"405 Method Not Allowed\n";
            let h = format!("HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\nX-Worker: {worker}\r\n\r\n", body.len());
            return write_parts(conn, h.as_bytes(), body);
        }
        let (status, entry, range, extra): (
            &str,
            Option<&crate::site::Entry>,
            Option<(u64, u64)>,
            String,
        ) = match site.answer(&head.site) {
            Reply::Full(e) => ("200 OK", Some(e), None, String::new()),
            Reply::Partial(e, a, b) => (
                "206 Partial Content",
                Some(e),
                Some((a, b)),
                format!("Content-Range: bytes {a}-{b}/{}\r\n", e.body.len()),
            ),
            Reply::NotModified(e) => {
                let h = format!("HTTP/1.1 304 Not Modified\r\nETag: {}\r\nConnection: {connection}\r\nX-Worker: {worker}\r\n\r\n", e.etag);
                return write_parts(conn, h.as_bytes(), b"");
            }
            Reply::NotSatisfiable(e) => {
                let body = b"416 Range Not Satisfiable\n";
                let h = format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\nX-Worker: {worker}\r\n\r\n", e.body.len(), body.len());
                return write_parts(
                    conn,
                    h.as_bytes(),
                    if head.head_method { b"" } else { body },
                );
            }
            Reply::Redirect(to) => {
                let h = format!("HTTP/1.1 301 Moved Permanently\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: {connection}\r\nX-Worker: {worker}\r\n\r\n");
                return write_parts(conn, h.as_bytes(), b"");
            }
            Reply::NotFound => ("404 Not Found", None, None, String::new()),
            Reply::BadRequest => ("400 Bad Request", None, None, String::new()),
        };
        match entry {
            Some(e) => {
                let body = match range {
                    Some((a, b)) => &e.body[a as usize..=b as usize],
                    None => &e.body[..],
                };
                let h = format!(
                    "HTTP/1.1 {status}\r\n{}{extra}Content-Length: {}\r\nConnection: {connection}\r\nX-Worker: {worker}\r\n\r\n",
                    e.headers,
                    body.len()
                );
                write_parts(
                    conn,
                    h.as_bytes(),
                    if head.head_method { b"" } else { body },
                )
            }
            None => {
                let body = format!("{status}\n");
                let h = format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\nX-Worker: {worker}\r\n\r\n", body.len());
                write_parts(
                    conn,
                    h.as_bytes(),
                    if head.head_method {
                        b""
                    } else {
                        body.as_bytes()
                    },
                )
            }
        }
    }
}

/// Writes `head` then `body` with writev(2), until all is written.
fn write_parts(conn: &mut Connection, head: &[u8], body: &[u8]) -> io::Result<()> {
    let mut parts = [io::IoSlice::new(head), io::IoSlice::new(body)];
    let mut bufs: &mut [io::IoSlice<'_>] = &mut parts;
    while !bufs.is_empty() {
        match conn.write_vectored(bufs) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Head, Refusal> {
        parse_head(text.as_bytes())
    }

    #[test]
    fn persistence_follows_rfc_9112() {
        let persist = |t: &str| head(t).expect("a head").persist;
        assert!(
            persist("GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            "1.1: persistent by default"
        );
        assert!(!persist("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(
            !persist("GET / HTTP/1.1\r\nConnection: Upgrade, CLOSE\r\n\r\n"),
            "a token list"
        );
        assert!(
            !persist("GET / HTTP/1.1\r\nConnection: foo\r\nConnection: close\r\n\r\n"),
            "several lines"
        );
        assert!(
            !persist("GET / HTTP/1.0\r\n\r\n"),
            "1.0: not persistent by default"
        );
        assert!(persist("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(persist(
            "GET / HTTP/1.0\r\nConnection: foo , keep-alive\r\n\r\n"
        ));
    }

    #[test]
    fn bodies_are_framed_and_smuggling_refused() {
        let body = |t: &str| head(t).map(|h| h.body);
        assert_eq!(
            body("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"),
            Ok(Body::Length(5))
        );
        assert_eq!(
            body("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Ok(Body::None)
        );
        assert_eq!(
            body("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Ok(Body::Chunked)
        );
        let bad = Err(Refusal::Status("400 Bad Request"));
        assert_eq!(
            body("POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            bad
        );
        assert_eq!(
            body("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            bad
        );
        assert_eq!(body("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), bad);
        assert_eq!(
            body("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            bad
        );
        assert_eq!(
            body("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            bad
        );
    }

    fn app() -> Http {
        Http::new(HttpLimits {
            header_timeout: Duration::from_secs(10),
            keepalive_requests: 100,
            max_body: 1 << 20,
            max_body_buffer: 16,
            max_sleep: Duration::from_secs(1),
        })
    }

    #[test]
    fn the_framing_waits_for_the_head_and_a_small_body() {
        let a = app();
        assert_eq!(a.frame(b""), Frame::Incomplete);
        assert_eq!(a.frame(b"GET / HTTP/1.1\r\n"), Frame::Incomplete);
        assert_eq!(a.frame(b"GET / HTTP/1.1\r\n\r\nGET"), Frame::Complete(18));
        let post = b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nab";
        assert_eq!(a.frame(post), Frame::Incomplete, "a small body is buffered");
        let whole = b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd";
        assert_eq!(a.frame(whole), Frame::Complete(whole.len()));
        let big = b"POST / HTTP/1.1\r\nContent-Length: 400\r\n\r\n";
        assert_eq!(
            a.frame(big),
            Frame::Complete(big.len()),
            "a large body is handed over after the head"
        );
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(a.frame(chunked), Frame::Complete(chunked.len()));
        assert!(
            matches!(a.frame(b"\x01\x02 nonsense\r\n\r\n"), Frame::Reject(r) if r.starts_with(b"HTTP/1.1 400"))
        );
        let huge = vec![b'a'; HEAD_BUF + 1];
        assert!(matches!(a.frame(&huge), Frame::Reject(r) if r.starts_with(b"HTTP/1.1 4")));
    }
}
