//! Small blocking clients for tests (TCP or Unix), every call bounded in time.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl HttpReply {
    /// A header's value by (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The slot from `X-Worker: slot/pid`.
    pub fn worker_slot(&self) -> Option<usize> {
        self.header("x-worker")?.split('/').next()?.parse().ok()
    }

    /// The pid from `X-Worker: slot/pid`.
    pub fn worker_pid(&self) -> Option<i32> {
        self.header("x-worker")?.split('/').nth(1)?.parse().ok()
    }
}

/// Either kind of stream.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn open(addr: &str, timeout: Duration) -> io::Result<Conn> {
        let c = match addr.strip_prefix("unix:") {
            Some(path) => Conn::Unix(UnixStream::connect(path)?),
            None => {
                let sa = addr
                    .parse()
                    .map_err(|_| io::Error::other(format!("bad address {addr}")))?;
                Conn::Tcp(TcpStream::connect_timeout(&sa, timeout)?)
            }
        };
        match &c {
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
            }
            Conn::Unix(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
            }
        }
        Ok(c)
    }

    fn stream(&mut self) -> &mut dyn ReadWrite {
        match self {
            Conn::Tcp(s) => s,
            Conn::Unix(s) => s,
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Sends `raw` to `addr` (`HOST:PORT` or `unix:/path`) and reads until the
/// server closes, within `timeout`.
pub fn exchange(addr: &str, raw: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
    let mut c = Conn::open(addr, timeout)?;
    let s = c.stream();
    s.write_all(raw)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// `GET path` with `Connection: close`; reads the whole response.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> io::Result<HttpReply> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    parse_reply(&exchange(addr, req.as_bytes(), timeout)?)
}

/// Parses one whole HTTP response.
pub fn parse_reply(raw: &[u8]) -> io::Result<HttpReply> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "partial response",
            ))
        }
        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
    };
    Ok(HttpReply {
        status: resp.code.unwrap_or(0),
        headers: resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        body: raw[n..].to_vec(),
    })
}

/// Connects and reads until close (the `hello` app's line).
pub fn read_line_from(addr: &str, timeout: Duration) -> io::Result<String> {
    let out = exchange(addr, b"", timeout)?;
    String::from_utf8(out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
