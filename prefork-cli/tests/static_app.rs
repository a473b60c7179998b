//! `--app static` (the files under --root, preloaded by the master) and
//! recycling by real memory use (`--max-memory`, `--max-age`), on the real
//! binary.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;

use common::*;
use rstest::rstest;
use rstest_reuse::apply;

/// Sends `request` as is and reads the whole answer (the request asks for
/// `Connection: close`).
fn raw(addr: &str, request: &str) -> String {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(T)).expect("timeout");
    c.write_all(request.as_bytes()).expect("send");
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn get(addr: &str, target: &str, extra: &str) -> String {
    raw(
        addr,
        &format!("GET {target} HTTP/1.1\r\nHost: a\r\n{extra}Connection: close\r\n\r\n"),
    )
}

fn header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
    resp.split("\r\n\r\n").next()?.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

fn site(dir: &Path) {
    std::fs::write(dir.join("index.html"), "<h1>hello</h1>\n").expect("write");
    std::fs::write(dir.join("data.txt"), "0123456789").expect("write");
    std::fs::create_dir(dir.join("sub")).expect("mkdir");
    std::fs::write(dir.join("sub/index.html"), "<p>sub</p>\n").expect("write");
}

fn start_static(strategy: &str, root: &Path, extra: &[&str]) -> Server {
    let root = root.to_string_lossy().into_owned();
    let mut args = vec!["--app", "static", "--root", &root];
    args.extend_from_slice(extra);
    start(strategy, &args)
}

/// Every HTTP rule of the static app, through every strategy (fdpass's
/// front frames each request first).
#[apply(every_strategy)]
fn static_files_are_served_by_the_http_rules(strategy: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    site(dir.path());
    let s = start_static(strategy, dir.path(), &["--workers", "2"]);
    let a = s.addr();

    let r = get(a, "/", "");
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert_eq!(header(&r, "content-type"), Some("text/html"));
    assert!(r.ends_with("\r\n\r\n<h1>hello</h1>\n"), "{r}");
    let etag = header(&r, "etag").expect("ETag").to_string();
    let modified = header(&r, "last-modified")
        .expect("Last-Modified")
        .to_string();
    assert_eq!(header(&r, "accept-ranges"), Some("bytes"));

    let head = raw(
        a,
        "HEAD /data.txt HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(header(&head, "content-length"), Some("10"));
    assert!(head.ends_with("\r\n\r\n"), "no body for HEAD: {head}");
    assert_eq!(header(&head, "content-type"), Some("text/plain"));

    let r = get(a, "/index.html", &format!("If-None-Match: {etag}\r\n"));
    assert!(r.starts_with("HTTP/1.1 304 Not Modified\r\n"), "{r}");
    assert!(r.ends_with("\r\n\r\n"), "no body: {r}");
    let r = get(
        a,
        "/index.html",
        &format!("If-Modified-Since: {modified}\r\n"),
    );
    assert!(r.starts_with("HTTP/1.1 304"), "{r}");
    let r = get(a, "/index.html", "If-None-Match: \"other\"\r\n");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    let r = get(a, "/data.txt", "Range: bytes=2-5\r\n");
    assert!(r.starts_with("HTTP/1.1 206 Partial Content\r\n"), "{r}");
    assert_eq!(header(&r, "content-range"), Some("bytes 2-5/10"));
    assert!(r.ends_with("\r\n\r\n2345"), "{r}");
    let r = get(a, "/data.txt", "Range: bytes=-3\r\n");
    assert!(r.ends_with("\r\n\r\n789"), "{r}");
    let r = get(a, "/data.txt", "Range: bytes=10-\r\n");
    assert!(r.starts_with("HTTP/1.1 416"), "{r}");
    assert_eq!(header(&r, "content-range"), Some("bytes */10"));

    let r = get(a, "/missing", "");
    assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
    let r = get(a, "/sub", "");
    assert!(r.starts_with("HTTP/1.1 301"), "{r}");
    assert_eq!(header(&r, "location"), Some("/sub/"));
    assert!(get(a, "/sub/", "").ends_with("<p>sub</p>\n"));
    let r = raw(
        a,
        "POST /data.txt HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    );
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    assert_eq!(header(&r, "allow"), Some("GET, HEAD"));

    // Kept alive: three requests on one connection.
    let mut c = TcpStream::connect(a).expect("connect");
    c.set_read_timeout(Some(T)).expect("timeout");
    c.write_all(b"GET /data.txt HTTP/1.1\r\nHost: a\r\n\r\nGET /data.txt HTTP/1.1\r\nHost: a\r\n\r\nGET /data.txt HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut all = String::new();
    let _ = c.read_to_string(&mut all);
    assert_eq!(all.matches("HTTP/1.1 200 OK").count(), 3, "{all}");
}

/// S7: hostile targets never reach a file outside the root: traversal,
/// encoded dots and slashes, backslashes, NUL, a symlink planted inside the
/// root that points out of it. Each gets 400 or 404, never the secret.
#[test]
fn s7_hostile_paths_never_leave_the_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("mkdir");
    site(&root);
    std::fs::write(dir.path().join("secret.txt"), "TOP-SECRET").expect("write");
    std::os::unix::fs::symlink(dir.path().join("secret.txt"), root.join("link.txt")).expect("link");
    let s = start_static("blocking", &root, &["--workers", "1"]);
    for target in [
        "/../secret.txt",
        "/sub/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/sub/%2e%2e/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/sub%2f..%2f..%2fsecret.txt",
        "/..%5csecret.txt",
        "/..\\secret.txt",
        "/secret.txt%00.html",
        "/link.txt",
        "/./../secret.txt",
        "//../secret.txt",
        "/%",
        "/%zz",
    ] {
        let r = get(s.addr(), target, "");
        let status = r.get(9..12).unwrap_or("");
        assert!(
            status == "400" || status == "404",
            "{target}: {}",
            r.lines().next().unwrap_or("")
        );
        assert!(!r.contains("TOP-SECRET"), "{target} leaked the secret");
    }
    // And the server is fine.
    assert!(get(s.addr(), "/data.txt", "").ends_with("0123456789"));
}

/// `--max-memory` acts on private memory: the worker that grows its own
/// pages past the limit is recycled (its replacement first), the other
/// worker is untouched, and requests sent all along are all answered.
#[apply(every_strategy)]
fn max_memory_recycles_only_the_worker_whose_own_memory_grew(strategy: &str) {
    let s = start(
        strategy,
        &[
            "--workers",
            "2",
            "--max-memory",
            "64m",
            "--memory-check",
            "0.5",
        ],
    );
    assert!(s.wait_workers(2, T));
    let r = http_get(s.addr(), "/grow/100", T).expect("grow");
    assert_eq!(r.status, 200);
    let leaker = r.worker_pid().expect("pid");
    let other = *s
        .workers()
        .iter()
        .find(|&&p| p != leaker)
        .expect("the other worker");
    let addr = s.addr().to_string();
    let load = std::thread::spawn(move || burst(&addr, 2, 100));
    assert!(
        s.wait_log(&format!("pid={leaker} private memory"), T),
        "{}",
        s.log()
    );
    assert!(
        s.wait_log(
            &format!("pid={leaker} grew past --max-memory; its replacement is ready"),
            T
        ),
        "{}",
        s.log()
    );
    assert!(wait_until(T, || !prefork_testkit::process_alive(leaker)));
    let (_, failed) = load.join().expect("load");
    assert_eq!(failed, 0, "nothing lost while recycling: {}", s.log());
    assert!(prefork_testkit::process_alive(other), "the other one stays");
    assert_eq!(s.log_count("grew past --max-memory"), 1, "{}", s.log());
    assert!(s.wait_workers(2, T));
}

/// A worker's RSS can be large only because of the master's preloaded
/// pages it shares: 64 MiB of files, every one served by both workers, so
/// each worker's RSS is over 64 MiB, with `--max-memory 32m`. The master
/// reads each worker's memory several times, and recycles neither.
#[test]
fn shared_preloaded_pages_do_not_count_against_max_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    prefork_testkit::memory::make_data(dir.path(), 64).expect("data");
    let root = dir.path().to_string_lossy().into_owned();
    let status = dir.path().join("status.sock");
    let status_arg = format!("unix:{}", status.display());
    let s = prefork()
        .args([
            "--app",
            "static",
            "--root",
            &root,
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            "--max-memory",
            "32m",
            "--memory-check",
            "0.5",
            "--log-level",
            "debug",
            "--status",
            &status_arg,
        ])
        .start()
        .expect("starts");
    let before: HashSet<i32> = s.workers().into_iter().collect();
    for i in 0..64 {
        for _ in 0..2 {
            let r = http_get(s.addr(), &format!("/blob-{i:04}.bin"), T).expect("GET");
            assert_eq!(r.status, 200);
        }
    }
    // Each worker read at least three times after the traffic.
    let checks = s.log_count("memory check");
    assert!(
        wait_until(T, || s.log_count("memory check") >= checks + 6),
        "{}",
        s.log()
    );
    let doc = status_json(&status_arg);
    for w in doc["workers"].as_array().expect("workers") {
        let m = &w["memory"];
        let rss = m["rss_kib"].as_u64().expect("rss");
        let private = m["private_kib"].as_u64().expect("private");
        let shared = m["shared_kib"].as_u64().expect("shared");
        let pss = m["pss_kib"].as_u64().expect("pss");
        assert!(rss > 64 * 1024, "RSS counts the shared pages: {m}");
        assert!(private < 32 * 1024, "its own pages are few: {m}");
        assert!(shared > 60 * 1024 && pss < rss, "{m}");
    }
    assert!(!s.log().contains("grew past"), "{}", s.log());
    let after: HashSet<i32> = s.workers().into_iter().collect();
    assert_eq!(before, after, "no worker recycled");
}

/// `--max-age`: every worker is recycled (its replacement first, one slot
/// at a time) once it is that old, and nothing is lost meanwhile.
#[apply(every_strategy)]
fn max_age_recycles_every_worker_and_loses_nothing(strategy: &str) {
    let s = start(strategy, &["--workers", "2", "--max-age", "1"]);
    assert!(s.wait_workers(2, T));
    let originals = s.workers();
    let addr = s.addr().to_string();
    let load = std::thread::spawn(move || burst(&addr, 2, 150));
    assert!(
        wait_until(T, || {
            let now = s.workers();
            now.len() == 2 && originals.iter().all(|o| !now.contains(o))
        }),
        "{}",
        s.log()
    );
    let (_, failed) = load.join().expect("load");
    assert_eq!(failed, 0, "{}", s.log());
    assert!(
        s.log_count("reached its maximum age (--max-age)") >= 2,
        "{}",
        s.log()
    );
}
