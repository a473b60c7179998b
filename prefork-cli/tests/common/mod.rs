//! Shared helpers for the black-box tests of the `prefork` binary.
#![allow(dead_code, unused_imports, unused_macros)]

use rstest::rstest;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal;
#[allow(unused_imports)]
pub use prefork_testkit::{http_get, read_line_from, wait_until, Server, ServerBuilder};

/// How long a test waits for an event before it fails.
pub const T: Duration = Duration::from_secs(10);

/// Every strategy the binary offers: a scenario that applies to all of them
/// takes `#[apply(every_strategy)]` and a `strategy: &str` argument, and
/// runs once per strategy (`case_1_blocking` ...).
#[rstest_reuse::template]
#[rstest]
#[case::blocking("blocking")]
#[case::mutex("mutex")]
#[case::fdpass("fdpass")]
#[case::reuseport("reuseport")]
pub fn every_strategy(#[case] strategy: &str) {}

/// A builder for the binary under test.
pub fn prefork() -> ServerBuilder {
    ServerBuilder::new(env!("CARGO_BIN_EXE_prefork"))
}

/// The flags that select a strategy case: `blocking`; `mutex` (default lock,
/// taken even with one listener so that every shared scenario exercises
/// the lock); `mutex-KIND` for another lock kind.
pub fn strategy_args(case: &str) -> Vec<String> {
    let mut v = vec!["--strategy".to_string()];
    match case.strip_prefix("mutex") {
        Some(kind) => {
            v.push("mutex".into());
            if let Some(k) = kind.strip_prefix('-') {
                v.extend(["--lock".into(), k.into()]);
            }
            v.push("--lock-always".into());
        }
        None => v.push(case.into()),
    }
    v
}

/// Starts `prefork <strategy flags> --bind 127.0.0.1:0 ...extra` and waits for ready.
pub fn start(strategy: &str, extra: &[&str]) -> Server {
    prefork()
        .args(strategy_args(strategy))
        .args(["--bind", "127.0.0.1:0", "--log-level", "info"])
        .args(extra.iter().copied())
        .start()
        .expect("prefork starts")
}

/// GET / and return (slot, pid) of the worker that answered.
pub fn who(addr: &str) -> (usize, i32) {
    let r = http_get(addr, "/", T).expect("GET /");
    assert_eq!(r.status, 200);
    (r.worker_slot().expect("slot"), r.worker_pid().expect("pid"))
}

/// `clients` threads each send `each` GET / one after another (a new
/// connection per request). Returns (slot, pid) of every answer and the
/// number of requests that failed.
pub fn burst(addr: &str, clients: usize, each: usize) -> (Vec<(usize, i32)>, usize) {
    burst_path(addr, "/", clients, each)
}

/// [`burst`] with another path (e.g. `/sleep/150`).
pub fn burst_path(
    addr: &str,
    path: &str,
    clients: usize,
    each: usize,
) -> (Vec<(usize, i32)>, usize) {
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (addr, path) = (addr.to_string(), path.to_string());
            std::thread::spawn(move || {
                let mut seen = Vec::with_capacity(each);
                let mut failed = 0;
                for _ in 0..each {
                    match http_get(&addr, &path, T) {
                        Ok(r) if r.status == 200 => seen
                            .push((r.worker_slot().expect("slot"), r.worker_pid().expect("pid"))),
                        _ => failed += 1,
                    }
                }
                (seen, failed)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut failed = 0;
    for t in threads {
        let (seen, f) = t.join().expect("client thread");
        all.extend(seen);
        failed += f;
    }
    (all, failed)
}

/// `prefork status SOCK --json`, parsed.
pub fn status_json(sock: &str) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefork"))
        .args(["status", sock, "--json"])
        .output()
        .expect("prefork status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// A process's descriptors (`self` or a pid): number, target (`pipe:[N]`,
/// a path...) and the open flags from /proc/PID/fdinfo (octal there).
pub fn fd_table(pid: &str) -> Vec<(i32, String, u32)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .flatten()
        .filter_map(|e| {
            let n: i32 = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}")).ok()?;
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())?;
            Some((n, target.to_string_lossy().into_owned(), flags))
        })
        .collect()
}

/// Runs GET / in a loop on another thread until stopped; counts failures.
pub struct Load {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(u32, u32)>,
}

impl Load {
    pub fn start(addr: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let addr = addr.to_string();
        let handle = std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match http_get(&addr, "/", T) {
                    Ok(r) if r.status == 200 => ok += 1,
                    other => {
                        eprintln!("load: request failed: {other:?}");
                        failed += 1
                    }
                }
            }
            (ok, failed)
        });
        Load { stop, handle }
    }

    /// Stops it: (requests answered 200, requests failed).
    pub fn finish(self) -> (u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("load thread")
    }
}

/// Waits until the server has exactly `n` workers, none of them in `old`
/// (a reload replaced them all).
pub fn wait_replaced(s: &Server, old: &std::collections::HashSet<i32>, n: usize) -> bool {
    wait_until(T, || {
        let now: std::collections::HashSet<i32> = s.workers().into_iter().collect();
        now.len() == n && now.is_disjoint(old)
    })
}

/// Masters a test started without being their parent (through USR2, or
/// `--daemon`), found by an argument only they carry (the test's own pid-file path): each is
/// killed by its pid when the test ends, however it ends, even one a bug
/// started unasked.
pub struct Masters(pub String);

impl Drop for Masters {
    fn drop(&mut self) {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return;
        };
        for pid in dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours = cmdline
                .split(|&b| b == 0)
                .any(|arg| arg == self.0.as_bytes());
            if ours && prefork_testkit::process_alive(pid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// Writes `raw` on `c` (nothing if empty) and reads one whole response: its
/// head and its Content-Length body. The connection stays open for more.
pub fn request(c: &mut std::net::TcpStream, raw: &[u8]) -> std::io::Result<String> {
    use std::io::{Read, Write};
    c.write_all(raw)?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "closed: {}",
                String::from_utf8_lossy(&got)
            )));
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return Ok(text);
            }
        }
    }
}
