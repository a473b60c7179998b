//! The soak: minutes of open-loop load while an injector mixes every fault
//! of the matrix (idle and busy kills, kill-alls, reloads, resizing), then
//! the books: nothing lost beyond L2's allowance (one connection per busy
//! worker killed), and the master's descriptors and memory where they
//! started.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::faults::{kill_classified, kill_if_idle, Rng, Whole};
use crate::load::{self, LoadConfig, Progress, Protocol, Target};
use crate::procs;
use crate::server::{read_status, wait_until, Server};

/// Most the master's RSS may grow over a soak: allocator slack, not a leak
/// (a leak of even 100 bytes per connection would show as megabytes).
pub const RSS_SLACK_KIB: u64 = 1024;

/// What a soak measured.
#[derive(Debug, Clone, Serialize)]
pub struct SoakResult {
    /// Server label.
    pub server: String,
    /// Seconds of load and faults.
    pub seconds: f64,
    /// Probe connections sent.
    pub probes: u64,
    /// Probes that got a refusal, a reset or no answer.
    pub lost: u64,
    /// Busy workers killed: L2 allows one lost connection each.
    pub busy_kills: u64,
    /// Injections by fault.
    pub injections: BTreeMap<&'static str, u64>,
    /// The master's descriptors after the warm-up, and after the soak once
    /// the pool settled.
    pub fds_before: usize,
    /// After.
    pub fds_after: usize,
    /// The master's RSS, KiB, at the same two moments.
    pub rss_before_kib: u64,
    /// After.
    pub rss_after_kib: u64,
    /// Zombie children left (after 2 s without one, 0).
    pub zombies: usize,
    /// p99 latency of the probes, µs.
    pub p99_us: u64,
}

impl SoakResult {
    /// The soak's pass figure: `Err` says what was missed.
    pub fn verdict(&self) -> Result<(), String> {
        let mut missed = Vec::new();
        if self.lost > self.busy_kills {
            missed.push(format!(
                "{} lost > {} busy workers killed",
                self.lost, self.busy_kills
            ));
        }
        if self.fds_after != self.fds_before {
            missed.push(format!(
                "descriptors {} -> {}",
                self.fds_before, self.fds_after
            ));
        }
        if self.rss_after_kib > self.rss_before_kib + RSS_SLACK_KIB {
            missed.push(format!(
                "RSS {} -> {} KiB",
                self.rss_before_kib, self.rss_after_kib
            ));
        }
        if self.zombies != 0 {
            missed.push(format!("{} zombies", self.zombies));
        }
        if self.injections.values().sum::<u64>() == 0 {
            missed.push("no injection".into());
        }
        if missed.is_empty() {
            Ok(())
        } else {
            Err(format!("soak {}: {}", self.server, missed.join("; ")))
        }
    }
}

/// Waits until the pool is `n` ready workers with nothing booting or
/// stopping and no zombie (the master's own view, from its status socket).
fn settle(master: i32, status: &Path, n: usize, timeout: Duration) -> bool {
    wait_until(timeout, || {
        let Some(doc) = read_status(status) else {
            return false;
        };
        let t = &doc["totals"];
        t["workers"].as_u64() == Some(n as u64)
            && t["booting"].as_u64() == Some(0)
            && t["stopping"].as_u64() == Some(0)
            && procs::zombie_children(master).is_empty()
    })
}

fn signal(master: i32, sig: Signal) {
    let _ = kill(Pid::from_raw(master), sig);
}

/// The pool's target size, as the master says (asked again for up to 5 s:
/// on a loaded machine one read may time out).
fn target(status: &Path) -> Option<usize> {
    let mut t = None;
    wait_until(Duration::from_secs(5), || {
        t = read_status(status).and_then(|d| d["totals"]["target"].as_u64());
        t.is_some()
    });
    t.map(|t| t as usize)
}

/// Brings the pool's target to `n` one TTIN or TTOU at a time, each
/// confirmed by the master before the next (signals of one kind coalesce
/// while pending, so counting the signals sent is not enough).
fn resize(master: i32, status: &Path, n: usize) -> bool {
    for _ in 0..64 {
        let Some(t) = target(status) else {
            return false;
        };
        if t == n {
            return true;
        }
        let (sig, to) = if t < n {
            (Signal::SIGTTIN, t + 1)
        } else {
            (Signal::SIGTTOU, t - 1)
        };
        signal(master, sig);
        wait_until(Duration::from_secs(2), || target(status) == Some(to));
    }
    false
}

/// Soaks `server` (started with `workers` workers and `--status
/// unix:STATUS`): a warm-up that also grows the pool to its largest size
/// once (a reuseport slot's socket, made on growth, is kept by design),
/// then `duration` of load at `rate` with mixed faults, then the books.
pub fn soak(
    server: &Server,
    label: &str,
    workers: usize,
    rate: f64,
    duration: Duration,
    status: &Path,
) -> std::io::Result<SoakResult> {
    let master = server.pid();
    let targets: Vec<Target> = server
        .addrs()
        .iter()
        .map(|a| Target::parse(a).map_err(std::io::Error::other))
        .collect::<Result<_, _>>()?;
    let cfg = |secs: Duration| LoadConfig {
        targets: targets.clone(),
        protocol: Protocol::Http,
        concurrency: 64,
        rate: Some(rate),
        duration: Some(secs),
        threads: 1,
        timeout: Duration::from_secs(3),
        record_outcomes: false,
        ..LoadConfig::default()
    };
    let unsettled =
        |what: &str| std::io::Error::other(format!("{label}: the pool did not settle {what}"));
    // Warm-up: load, then the largest pool once.
    load::run(&cfg(Duration::from_secs(2)), &Arc::new(Progress::default()))?;
    if !resize(master, status, workers + 2)
        || !settle(master, status, workers + 2, Duration::from_secs(10))
    {
        return Err(unsettled("after the warm-up's growth"));
    }
    if !resize(master, status, workers) || !settle(master, status, workers, Duration::from_secs(10))
    {
        return Err(unsettled("after the warm-up"));
    }
    let fds_before = procs::fd_count(master);
    let rss_before_kib = procs::rss_kib(master).unwrap_or(0);

    let done = Arc::new(AtomicBool::new(false));
    let injector = {
        let done = Arc::clone(&done);
        let whole = Whole {
            master,
            n: workers,
            status: Some(status.to_path_buf()),
        };
        std::thread::spawn(move || inject_mixed(&whole, &done))
    };
    let t0 = Instant::now();
    let report = load::run(&cfg(duration), &Arc::new(Progress::default()));
    done.store(true, Ordering::Relaxed);
    let (injections, busy_kills) = injector
        .join()
        .map_err(|_| std::io::Error::other("injector panicked"))?;
    let report = report?;
    let seconds = t0.elapsed().as_secs_f64();

    if !settle(master, status, workers, Duration::from_secs(30)) {
        return Err(unsettled("after the soak"));
    }
    let reaped = wait_until(Duration::from_secs(2), || {
        procs::zombie_children(master).is_empty()
    });
    // The master releases an fdpass copy within 100 ms of its hand-over;
    // give it a second to be quiet before counting.
    std::thread::sleep(Duration::from_secs(1));
    Ok(SoakResult {
        server: label.to_string(),
        seconds,
        probes: report.ok + report.errors.total(),
        lost: report.errors.total(),
        busy_kills,
        injections,
        fds_before,
        fds_after: procs::fd_count(master),
        rss_before_kib,
        rss_after_kib: procs::rss_kib(master).unwrap_or(0),
        zombies: if reaped {
            0
        } else {
            procs::zombie_children(master).len()
        },
        p99_us: report.latency.value_at_quantile(0.99),
    })
}

/// Every 100 ms, one fault, drawn: an idle worker killed (4 in 10), any
/// worker killed (3 in 10), the pool grown or shrunk by one between N - 1
/// and N + 2 (2 in 10); and on their own clocks a HUP every 2 s and a
/// kill-all every 10 s. The pool is put back to N at the end.
fn inject_mixed(whole: &Whole, done: &AtomicBool) -> (BTreeMap<&'static str, u64>, u64) {
    let master = whole.master;
    let n = whole.n;
    let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ u64::from(master.unsigned_abs()));
    let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut busy = 0u64;
    let mut size = n;
    let mut recovery = None;
    let start = Instant::now();
    let (mut next_hup, mut next_all) = (
        start + Duration::from_secs(2),
        start + Duration::from_secs(10),
    );
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        let now = Instant::now();
        let pool = procs::children_of(master);
        if now >= next_all {
            next_all = now + Duration::from_secs(10);
            for &w in &pool {
                let _ = kill(Pid::from_raw(w), Signal::SIGSTOP);
            }
            for &w in &pool {
                busy += u64::from(kill_classified(master, w).unwrap_or(false));
            }
            *counts.entry("kill-all").or_default() += 1;
            whole.note_recovery(&pool, &mut recovery);
            continue;
        }
        if now >= next_hup {
            next_hup = now + Duration::from_secs(2);
            signal(master, Signal::SIGHUP);
            *counts.entry("hup").or_default() += 1;
            continue;
        }
        match rng.pick(10) {
            0..=3 => {
                let at = rng.pick(pool.len());
                let victim = (0..pool.len())
                    .map(|k| pool[(at + k) % pool.len()])
                    .find(|&w| kill_if_idle(master, w));
                if victim.is_some() {
                    *counts.entry("kill-idle").or_default() += 1;
                }
            }
            4..=6 if !pool.is_empty() => {
                let w = pool[rng.pick(pool.len())];
                if let Some(b) = kill_classified(master, w) {
                    busy += u64::from(b);
                    *counts.entry("kill-any").or_default() += 1;
                }
            }
            7 | 8 => {
                if let Some(t) = whole.status.as_deref().and_then(target) {
                    size = t;
                }
                let grow = size <= n.saturating_sub(1).max(1) || (size < n + 2 && rng.pick(2) == 0);
                if grow {
                    size += 1;
                    signal(master, Signal::SIGTTIN);
                    *counts.entry("ttin").or_default() += 1;
                } else {
                    size -= 1;
                    signal(master, Signal::SIGTTOU);
                    *counts.entry("ttou").or_default() += 1;
                }
                // Confirmed before anything else: a signal still pending
                // when the run ends would change the pool after the books
                // were closed.
                if let Some(status) = &whole.status {
                    wait_until(Duration::from_secs(2), || target(status) == Some(size));
                }
            }
            _ => {}
        }
    }
    // Back to N, by the master's own count of its target.
    if let Some(status) = &whole.status {
        resize(master, status, n);
    }
    (counts, busy)
}

/// Where a soaked server's status socket goes.
pub fn status_path(dir: &Path, label: &str) -> PathBuf {
    dir.join(format!("soak-{label}.sock"))
}
