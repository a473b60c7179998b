//! `--app static`: every file under a root, loaded into memory once by the
//! master (its preload), so that every worker serves the same copy-on-write
//! pages; each file's headers (type, ETag, Last-Modified) are computed then
//! too. This module is the pure part: loading, the request target's
//! normalisation, and the HTTP rules (conditional requests, ranges), each a
//! function of the request and the loaded site, tested without a socket.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// One file, as loaded.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its bytes.
    pub body: Vec<u8>,
    /// Content-Type, ETag, Last-Modified and Accept-Ranges lines, each
    /// ending in CRLF: written as they are before every response's own.
    pub headers: String,
    /// The strong entity tag, quotes included.
    pub etag: String,
    /// Modification time, whole seconds since the epoch (HTTP dates have
    /// no finer grain).
    pub mtime: u64,
}

/// Every file under the root.
#[derive(Debug, Default)]
pub struct Site {
    files: HashMap<String, Entry>,
    /// Directories (as `/a/b`) that have an `index.html`.
    dirs: HashSet<String>,
    bytes: u64,
}

/// What a request asks of the site, from its head.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Request {
    /// GET or HEAD (anything else is refused before this).
    pub head_method: bool,
    /// The request target, as sent.
    pub target: String,
    /// If-None-Match.
    pub if_none_match: Option<String>,
    /// If-Modified-Since.
    pub if_modified_since: Option<String>,
    /// Range.
    pub range: Option<String>,
    /// If-Range.
    pub if_range: Option<String>,
}

/// The answer, before it is written.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// 200 with the whole file.
    Full(&'a Entry),
    /// 206 with bytes `start..=end` of the file.
    Partial(&'a Entry, u64, u64),
    /// 304: the client's copy is current.
    NotModified(&'a Entry),
    /// 416: no byte of the range is in the file.
    NotSatisfiable(&'a Entry),
    /// 301 to the directory's path with a trailing slash.
    Redirect(String),
    /// 404.
    NotFound,
    /// 400: a target that cannot name a file (a NUL, an encoded slash, a
    /// `..` above the root, bad percent-encoding, not a path).
    BadRequest,
}

impl Site {
    /// Loads every regular file under `root`, at most `max_bytes` in all.
    /// A symbolic link is followed only to a regular file inside the root;
    /// one that leads out of it, to a directory, or nowhere is left out.
    pub fn load(root: &Path, max_bytes: u64) -> Result<Site, String> {
        let root = root
            .canonicalize()
            .map_err(|e| format!("--root {}: {e}", root.display()))?;
        if !root.is_dir() {
            return Err(format!("--root {}: not a directory", root.display()));
        }
        let mut site = Site::default();
        let mut todo: Vec<(PathBuf, String)> = vec![(root.clone(), String::new())];
        while let Some((dir, prefix)) = todo.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            for entry in entries {
                let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    tracing::warn!(
                        "static: {} has a name that is not UTF-8; left out",
                        entry.path().display()
                    );
                    continue;
                };
                let path = entry.path();
                let key = format!("{prefix}/{name}");
                let meta = entry
                    .metadata()
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let (file, meta) = if meta.file_type().is_symlink() {
                    match path.canonicalize() {
                        Ok(target) if target.starts_with(&root) && target.is_file() => {
                            let m = std::fs::metadata(&target)
                                .map_err(|e| format!("{}: {e}", target.display()))?;
                            (target, m)
                        }
                        _ => {
                            tracing::warn!("static: {} is a link out of the root, to a directory or to nothing; left out", path.display());
                            continue;
                        }
                    }
                } else {
                    (path, meta)
                };
                if meta.is_dir() {
                    todo.push((file, key));
                    continue;
                }
                if !meta.is_file() {
                    continue; // a FIFO, a socket, a device
                }
                site.bytes += meta.len();
                if site.bytes > max_bytes {
                    return Err(format!(
                        "--root {}: the files under it take more than --static-max ({max_bytes} bytes)",
                        root.display()
                    ));
                }
                let body = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                if name == "index.html" {
                    site.dirs.insert(prefix.clone());
                }
                site.files.insert(key, Entry::new(&file, body, mtime));
            }
        }
        Ok(site)
    }

    /// Files loaded.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Bytes loaded.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The answer to `req`.
    pub fn answer(&self, req: &Request) -> Reply<'_> {
        let Some(path) = normalize(&req.target) else {
            return Reply::BadRequest;
        };
        let entry = if let Some(dir) = path.strip_suffix('/') {
            if !self.dirs.contains(dir) {
                return Reply::NotFound;
            }
            self.files.get(&format!("{dir}/index.html"))
        } else {
            match self.files.get(&path) {
                Some(e) => Some(e),
                None if self.dirs.contains(&path) => return Reply::Redirect(format!("{path}/")),
                None => None,
            }
        };
        let Some(entry) = entry else {
            return Reply::NotFound;
        };
        if not_modified(entry, req) {
            return Reply::NotModified(entry);
        }
        let range_applies = req
            .if_range
            .as_deref()
            .map_or(true, |v| v.trim() == entry.etag);
        match req.range.as_deref().filter(|_| range_applies) {
            Some(r) => match byte_range(r, entry.body.len() as u64) {
                Some(Ok((start, end))) => Reply::Partial(entry, start, end),
                Some(Err(())) => Reply::NotSatisfiable(entry),
                None => Reply::Full(entry), // not a range we serve: the whole file
            },
            None => Reply::Full(entry),
        }
    }
}

impl Entry {
    fn new(file: &Path, body: Vec<u8>, mtime: u64) -> Entry {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        body.hash(&mut h);
        let etag = format!("\"{:x}-{:016x}\"", body.len(), h.finish());
        let kind = mime_guess::from_path(file)
            .first_raw()
            .unwrap_or("application/octet-stream");
        let date = httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_secs(mtime));
        let mut headers = String::new();
        let _ = write!(
            headers,
            "Content-Type: {kind}\r\nETag: {etag}\r\nLast-Modified: {date}\r\nAccept-Ranges: bytes\r\n"
        );
        Entry {
            body,
            headers,
            etag,
            mtime,
        }
    }
}

/// The path a request target names, normalised: percent-decoded, `.` and
/// empty segments dropped, `..` applied, the query dropped; a trailing
/// slash kept (a directory). `None` when it cannot name a file under the
/// root: not an origin-form target, bad percent-encoding, a decoded NUL,
/// slash or backslash inside a segment, or a `..` above the root.
pub fn normalize(target: &str) -> Option<String> {
    let path = target.split(['?', '#']).next()?;
    if !path.starts_with('/') {
        return None;
    }
    let mut out: Vec<String> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let dir = path.ends_with('/') || matches!(segments.last(), Some(&"." | &".."));
    for raw in segments {
        let seg = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .ok()?
            .into_owned();
        if raw.contains('%') && !valid_escapes(raw) {
            return None;
        }
        if seg.contains(['\0', '/', '\\']) {
            return None;
        }
        match seg.as_str() {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            _ => out.push(seg),
        }
    }
    let mut p = format!("/{}", out.join("/"));
    if dir && !out.is_empty() {
        p.push('/');
    }
    Some(p)
}

/// Every `%` starts a two-digit hex escape (the decoder passes a bad one
/// through as is; a target with one is refused instead).
fn valid_escapes(raw: &str) -> bool {
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
            {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

/// RFC 9110 §13.1.2 and §13.1.3: If-None-Match, when sent, decides (weak
/// comparison, `*` matches); otherwise If-Modified-Since, for a file not
/// changed since that date.
fn not_modified(entry: &Entry, req: &Request) -> bool {
    if let Some(inm) = &req.if_none_match {
        let ours = entry.etag.trim_start_matches("W/");
        return inm
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || t.trim_start_matches("W/") == ours);
    }
    if let Some(ims) = &req.if_modified_since {
        if let Ok(since) = httpdate::parse_http_date(ims.trim()) {
            let since = since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            return entry.mtime <= since;
        }
    }
    false
}

/// A single byte range (RFC 9110 §14.1.2) of a representation `len` bytes
/// long: `Some(Ok((first, last)))`, `Some(Err(()))` when unsatisfiable
/// (416), `None` when it is not a single byte range (then the whole file is
/// served, as the RFC allows).
fn byte_range(spec: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = spec.trim();
    let ranges = spec
        .get(..6)
        .filter(|u| u.eq_ignore_ascii_case("bytes="))
        .map(|_| &spec[6..])?;
    if ranges.contains(',') {
        return None;
    }
    let (a, b) = ranges.trim().split_once('-')?;
    let num = |s: &str| -> Option<Option<u64>> {
        let s = s.trim();
        if s.is_empty() {
            return Some(None);
        }
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
            .map(Some)
    };
    match (num(a)?, num(b)?) {
        (Some(first), last) => {
            if last.is_some_and(|l| l < first) {
                return None; // invalid: ignored
            }
            if first >= len {
                return Some(Err(()));
            }
            let last = last.map_or(len - 1, |l| l.min(len - 1));
            Some(Ok((first, last)))
        }
        (None, Some(suffix)) => {
            if suffix == 0 || len == 0 {
                return Some(Err(()));
            }
            Some(Ok((len - suffix.min(len), len - 1)))
        }
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(files: &[(&str, &[u8])]) -> (tempfile::TempDir, Site) {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, body) in files {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, body).expect("write");
        }
        let s = Site::load(dir.path(), 1 << 20).expect("load");
        (dir, s)
    }

    fn get(target: &str) -> Request {
        Request {
            target: target.into(),
            ..Request::default()
        }
    }

    #[test]
    fn targets_are_normalised_and_never_leave_the_root() {
        assert_eq!(normalize("/a/b.txt").as_deref(), Some("/a/b.txt"));
        assert_eq!(normalize("/a/./b.txt?x=1").as_deref(), Some("/a/b.txt"));
        assert_eq!(normalize("//a///b.txt").as_deref(), Some("/a/b.txt"));
        assert_eq!(normalize("/a/../b.txt").as_deref(), Some("/b.txt"));
        assert_eq!(normalize("/a/%62.txt").as_deref(), Some("/a/b.txt"));
        assert_eq!(normalize("/dir/").as_deref(), Some("/dir/"));
        assert_eq!(normalize("/").as_deref(), Some("/"));
        for hostile in [
            "/../etc/passwd",
            "/a/../../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/a/%2e%2e/%2e%2e/etc/passwd",
            "/a%2fb",
            "/a%2F..%2F..%2Fetc%2Fpasswd",
            "/a%5c..%5cb",
            "/a%00.txt",
            "/a%zz",
            "/a%2",
            "/%",
            "etc/passwd",
            "http://example.com/a",
            "*",
            "/%ff",
        ] {
            assert_eq!(normalize(hostile), None, "{hostile}");
        }
    }

    #[test]
    fn files_links_and_directories() {
        let (dir, _) = site(&[]);
        std::fs::write(dir.path().join("a.txt"), b"A").expect("write");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/index.html"), b"<p>").expect("write");
        let outside = tempfile::tempdir().expect("outside");
        std::fs::write(outside.path().join("secret"), b"S").expect("write");
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("leak"))
            .expect("link out");
        std::os::unix::fs::symlink(dir.path().join("a.txt"), dir.path().join("alias"))
            .expect("link in");
        std::os::unix::fs::symlink("/nowhere", dir.path().join("dangling")).expect("dangling");
        let s = Site::load(dir.path(), 1 << 20).expect("load");
        assert_eq!(s.len(), 3, "a.txt, sub/index.html, alias");
        assert!(matches!(s.answer(&get("/a.txt")), Reply::Full(e) if e.body == b"A"));
        assert!(matches!(s.answer(&get("/alias")), Reply::Full(e) if e.body == b"A"));
        assert_eq!(s.answer(&get("/leak")), Reply::NotFound);
        assert_eq!(s.answer(&get("/dangling")), Reply::NotFound);
        assert!(matches!(s.answer(&get("/sub/")), Reply::Full(e) if e.body == b"<p>"));
        assert_eq!(s.answer(&get("/sub")), Reply::Redirect("/sub/".into()));
        assert_eq!(s.answer(&get("/nope/")), Reply::NotFound);
        assert_eq!(s.answer(&get("/../a.txt")), Reply::BadRequest);
        assert!(
            matches!(s.answer(&get("/sub/../a.txt")), Reply::Full(e) if e.body == b"A"),
            "a .. inside the root is fine"
        );
        let e = Site::load(dir.path(), 3).expect_err("over the limit");
        assert!(e.contains("--static-max"), "{e}");
    }

    #[test]
    fn headers_are_computed_once_with_the_type_and_validators() {
        let (_d, s) = site(&[("style.css", b"body{}"), ("x.unknownext", b"?")]);
        let Reply::Full(css) = s.answer(&get("/style.css")) else {
            panic!("found");
        };
        assert!(
            css.headers.starts_with("Content-Type: text/css\r\n"),
            "{}",
            css.headers
        );
        assert!(css.headers.contains(&format!("ETag: {}\r\n", css.etag)));
        assert!(css.headers.contains("Last-Modified: "));
        assert!(css.headers.contains("Accept-Ranges: bytes\r\n"));
        let Reply::Full(other) = s.answer(&get("/x.unknownext")) else {
            panic!("found");
        };
        assert!(other
            .headers
            .starts_with("Content-Type: application/octet-stream\r\n"));
    }

    #[test]
    fn conditional_requests_follow_rfc_9110() {
        let (_d, s) = site(&[("a.txt", b"hello")]);
        let Reply::Full(e) = s.answer(&get("/a.txt")) else {
            panic!("found");
        };
        let etag = e.etag.clone();
        let date = httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_secs(e.mtime));
        let req = |inm: Option<&str>, ims: Option<&str>| Request {
            target: "/a.txt".into(),
            if_none_match: inm.map(str::to_string),
            if_modified_since: ims.map(str::to_string),
            ..Request::default()
        };
        assert!(matches!(
            s.answer(&req(Some(&etag), None)),
            Reply::NotModified(_)
        ));
        assert!(
            matches!(
                s.answer(&req(Some(&format!("W/{etag}")), None)),
                Reply::NotModified(_)
            ),
            "weak comparison"
        );
        assert!(
            matches!(
                s.answer(&req(Some(&format!("\"x\", {etag}")), None)),
                Reply::NotModified(_)
            ),
            "a list"
        );
        assert!(matches!(
            s.answer(&req(Some("*"), None)),
            Reply::NotModified(_)
        ));
        assert!(matches!(
            s.answer(&req(Some("\"other\""), None)),
            Reply::Full(_)
        ));
        assert!(matches!(
            s.answer(&req(None, Some(&date))),
            Reply::NotModified(_)
        ));
        assert!(matches!(
            s.answer(&req(None, Some("Thu, 01 Jan 1970 00:00:00 GMT"))),
            Reply::Full(_)
        ));
        assert!(
            matches!(s.answer(&req(None, Some("yesterday"))), Reply::Full(_)),
            "a bad date is ignored"
        );
        assert!(
            matches!(
                s.answer(&req(Some("\"other\""), Some(&date))),
                Reply::Full(_)
            ),
            "If-None-Match decides when both are sent"
        );
    }

    #[test]
    fn single_byte_ranges() {
        let (_d, s) = site(&[("a.txt", b"0123456789")]);
        let range = |r: &str| {
            s.answer(&Request {
                target: "/a.txt".into(),
                range: Some(r.into()),
                ..Request::default()
            })
        };
        let part = |r: &str| match range(r) {
            Reply::Partial(_, a, b) => Some((a, b)),
            _ => None,
        };
        assert_eq!(part("bytes=0-3"), Some((0, 3)));
        assert_eq!(part("bytes=5-"), Some((5, 9)));
        assert_eq!(part("bytes=-3"), Some((7, 9)));
        assert_eq!(part("bytes=-30"), Some((0, 9)));
        assert_eq!(part("bytes=8-100"), Some((8, 9)));
        assert_eq!(part("BYTES=1-1"), Some((1, 1)));
        assert!(matches!(range("bytes=10-"), Reply::NotSatisfiable(_)));
        assert!(matches!(range("bytes=-0"), Reply::NotSatisfiable(_)));
        for ignored in [
            "bytes=0-1,3-4",
            "bytes=5-2",
            "items=0-1",
            "bytes=a-b",
            "bytes=-",
        ] {
            assert!(matches!(range(ignored), Reply::Full(_)), "{ignored}");
        }
        let Reply::Full(e) = s.answer(&get("/a.txt")) else {
            panic!("found");
        };
        let with_if_range = |v: &str| {
            s.answer(&Request {
                target: "/a.txt".into(),
                range: Some("bytes=0-0".into()),
                if_range: Some(v.into()),
                ..Request::default()
            })
        };
        assert!(matches!(with_if_range(&e.etag.clone()), Reply::Partial(..)));
        assert!(
            matches!(with_if_range("\"stale\""), Reply::Full(_)),
            "If-Range: stale"
        );
    }
}
