//! Fault scenarios of the shared fault matrix, run against a live server:
//! a prober opens connections at a fixed rate and records every outcome with
//! its time, while an injector hurts the server on a schedule.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::load::{self, LoadConfig, Outcome, Progress, Protocol, Target};
use crate::procs;
use crate::server::Server;

/// An injector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// L1: SIGKILL a random *idle* worker every 100 ms.
    KillIdle,
    /// L2: SIGKILL a random worker, idle or busy, every 100 ms (each kill
    /// classified: only a busy worker's may cost a connection).
    KillAny,
    /// L4: HUP the master every second.
    Hup,
    /// L7: TTIN/TTOU every 200 ms, between 1 and 4 workers.
    TtinTtou,
    /// L3: SIGKILL every worker at once, every 300 ms.
    KillAll,
    /// L17: SIGKILL the holder of the mutex strategy's lock every 100 ms
    /// (the one worker waiting in poll(2) over the listeners, or in
    /// accept(2) on a single one; the others wait on the lock).
    KillLockHolder,
}

impl Fault {
    /// All of them.
    pub const ALL: [Fault; 6] = [
        Fault::KillIdle,
        Fault::KillAny,
        Fault::Hup,
        Fault::TtinTtou,
        Fault::KillAll,
        Fault::KillLockHolder,
    ];

    /// Name on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillIdle => "kill-idle",
            Fault::KillAny => "kill-any",
            Fault::Hup => "hup",
            Fault::TtinTtou => "ttin-ttou",
            Fault::KillAll => "kill-all",
            Fault::KillLockHolder => "kill-lock-holder",
        }
    }

    /// Its row in the fault matrix.
    pub fn matrix_row(self) -> &'static str {
        match self {
            Fault::KillIdle => "L1",
            Fault::KillAny => "L2",
            Fault::Hup => "L4",
            Fault::TtinTtou => "L7",
            Fault::KillAll => "L3",
            Fault::KillLockHolder => "L17",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == s)
    }

    fn interval(self) -> Duration {
        match self {
            Fault::KillIdle | Fault::KillAny | Fault::KillLockHolder => Duration::from_millis(100),
            Fault::TtinTtou => Duration::from_millis(200),
            Fault::KillAll => Duration::from_millis(300),
            Fault::Hup => Duration::from_secs(1),
        }
    }
}

/// What a fault run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FaultResult {
    /// The fault.
    pub fault: Fault,
    /// Its fault-matrix row.
    pub row: &'static str,
    /// Server label.
    pub server: String,
    /// Probe requests sent.
    pub probes: u64,
    /// Probes that got a refusal, a reset or no answer.
    pub lost: u64,
    /// Lost probes by kind.
    pub lost_by_kind: std::collections::BTreeMap<String, u64>,
    /// Injections made (kills, signals).
    pub injections: u64,
    /// Workers killed while they held a connection (L2, L3: each may cost
    /// that one connection; a killed idle worker may cost none).
    pub busy_kills: u64,
    /// Longest time from a kill until the pool was whole again, ms: N
    /// workers the master counts as ready (read from its status socket),
    /// or, without one, N live workers.
    pub max_recovery_ms: Option<f64>,
    /// p99 latency of the probes, µs.
    pub p99_us: u64,
    /// Longest probe latency, µs.
    pub max_us: u64,
    /// Longest time between two consecutive answers, µs: how long accepting
    /// stalled (at the probe rate answers come every few ms; a stall holds
    /// back every probe started during it). Unlike the longest latency, one
    /// slow probe alone does not make it.
    pub max_gap_us: u64,
    /// Zombie children the master left unreaped: 0 when an instant with none
    /// came within 2 s of the run's end, else those present then.
    pub zombies: usize,
}

impl FaultResult {
    /// The row's pass figure (RELIABILITY), checked: `Err` says what was
    /// missed. The tests and `prefork-bench --faults` both judge by it.
    pub fn verdict(&self) -> Result<(), String> {
        let mut missed = Vec::new();
        if self.zombies != 0 {
            missed.push(format!("{} zombies", self.zombies));
        }
        if self.injections == 0 {
            missed.push("no injection".to_string());
        }
        let recovery = |limit: f64, missed: &mut Vec<String>| match self.max_recovery_ms {
            Some(ms) if ms <= limit => {}
            Some(ms) => missed.push(format!("back in {ms:.0} ms > {limit:.0} ms")),
            None => missed.push("recovery not measured".to_string()),
        };
        match self.fault {
            Fault::KillIdle => {
                if self.lost != 0 {
                    missed.push(format!("{} lost", self.lost));
                }
                recovery(200.0, &mut missed);
            }
            Fault::KillAny => {
                if self.lost > self.busy_kills {
                    missed.push(format!(
                        "{} lost > {} busy workers killed",
                        self.lost, self.busy_kills
                    ));
                }
            }
            Fault::KillAll => {
                if self.lost > self.busy_kills {
                    missed.push(format!(
                        "{} lost > {} busy workers killed",
                        self.lost, self.busy_kills
                    ));
                }
                recovery(500.0, &mut missed);
            }
            Fault::Hup | Fault::TtinTtou => {
                if self.lost != 0 {
                    missed.push(format!("{} lost", self.lost));
                }
            }
            Fault::KillLockHolder => {
                if self.lost != 0 {
                    missed.push(format!("{} lost", self.lost));
                }
                if self.max_gap_us > 100_000 {
                    missed.push(format!("accept gap {} µs > 100 ms", self.max_gap_us));
                }
            }
        }
        if missed.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} {}: {}",
                self.row,
                self.server,
                missed.join("; ")
            ))
        }
    }
}

/// The syscalls a worker waits in when it holds no connection: accept;
/// poll (the mutex strategy's lock holder over several listeners); recvmsg
/// (an fdpass worker waiting on its channel).
fn idle_syscalls() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_accept4,
        libc::SYS_accept,
        libc::SYS_recvmsg,
        libc::SYS_ppoll,
    ];
    #[cfg(target_arch = "x86_64")]
    v.push(libc::SYS_poll);
    v
}

/// SIGSTOPs a worker and says whether it is idle: waiting in
/// accept/poll/recvmsg *and* holding no socket the master does not hold
/// (listeners are inherited from the master; a connection is the worker's
/// alone). The second check matters: a stop can land just as accept(2)
/// returns a connection, while /proc/PID/syscall still names accept4.
/// Under the mutex strategy with one listener, a worker stopped in accept
/// is the lock holder (it accepts only with the lock held). `None` when it
/// could not be stopped (gone). The worker is left stopped.
fn stop_and_classify(master: i32, pid: i32) -> Option<bool> {
    let p = Pid::from_raw(pid);
    kill(p, Signal::SIGSTOP).ok()?;
    let stopped = crate::server::wait_until(Duration::from_millis(200), || {
        procs::stat(pid).is_some_and(|s| s.state == 'T')
    });
    if !stopped {
        let _ = kill(p, Signal::SIGCONT);
        return None;
    }
    let waiting_in = idle_syscalls();
    let idle = procs::current_syscall(pid).is_some_and(|n| waiting_in.contains(&n)) && {
        // A connection is a stream socket only this worker holds; the
        // master's listeners are shared, an fdpass channel is SEQPACKET
        // (and only then can a handed connection wait in it unread).
        let masters = procs::socket_inodes(master);
        let channels = procs::seqpacket_inodes();
        let own = procs::socket_inodes(pid);
        own.iter()
            .all(|s| masters.contains(s) || channels.contains(s))
            && !(own.iter().any(|s| channels.contains(s)) && procs::has_queued_seqpacket(pid))
    };
    Some(idle)
}

/// SIGSTOPs a worker and leaves it stopped only if it is idle (see
/// [`stop_and_classify`]); a worker that is not is continued, and `false`
/// returned.
pub fn stop_if_idle(master: i32, pid: i32) -> bool {
    match stop_and_classify(master, pid) {
        Some(true) => true,
        Some(false) => {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
            false
        }
        None => false,
    }
}

/// SIGKILLs a worker only if [`stop_if_idle`] finds it idle.
pub(crate) fn kill_if_idle(master: i32, pid: i32) -> bool {
    if !stop_if_idle(master, pid) {
        return false;
    }
    let p = Pid::from_raw(pid);
    let _ = kill(p, Signal::SIGKILL);
    let _ = kill(p, Signal::SIGCONT);
    true
}

/// SIGKILLs a worker whatever it does; returns whether it was busy (held
/// a connection), so that the kill's allowance of one lost connection is
/// counted only for those (L2).
pub(crate) fn kill_classified(master: i32, pid: i32) -> Option<bool> {
    let idle = stop_and_classify(master, pid)?;
    let p = Pid::from_raw(pid);
    let _ = kill(p, Signal::SIGKILL);
    let _ = kill(p, Signal::SIGCONT);
    Some(!idle)
}

/// A small xorshift generator: the faults need no cryptography, only
/// variety, and a seed makes a run repeatable.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn pick(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// Runs `fault` against `server` (already started with `workers` workers)
/// for `duration`, probing at `rate` connections per second.
///
/// With `status` (the server's `--status` socket), recovery means N workers
/// the master counts as ready; without, N live workers.
pub fn run_fault(
    server: &Server,
    label: &str,
    fault: Fault,
    workers: usize,
    rate: f64,
    duration: Duration,
    status: Option<&std::path::Path>,
) -> std::io::Result<FaultResult> {
    let targets: Vec<Target> = server
        .addrs()
        .iter()
        .map(|a| Target::parse(a).map_err(std::io::Error::other))
        .collect::<Result<_, _>>()?;
    let cfg = LoadConfig {
        targets,
        protocol: Protocol::Http,
        concurrency: 64,
        rate: Some(rate),
        duration: Some(duration),
        threads: 1,
        timeout: Duration::from_secs(3),
        record_outcomes: true,
        ..LoadConfig::default()
    };
    let master = server.pid();
    let done = Arc::new(AtomicBool::new(false));
    let injector = {
        let done = Arc::clone(&done);
        let status = status.map(std::path::Path::to_path_buf);
        std::thread::spawn(move || {
            let whole = Whole {
                master,
                n: workers,
                status,
            };
            inject(&whole, fault, &done)
        })
    };
    let report = load::run(&cfg, &Arc::new(Progress::default()));
    done.store(true, Ordering::Relaxed);
    let (injections, max_recovery, busy_kills) = injector
        .join()
        .map_err(|_| std::io::Error::other("injector panicked"))?;
    let report = report?;
    // A worker that exits is a zombie until the master reaps it, which
    // takes a loop turn, so a zombie seen at one instant is no defect (an old
    // generation may still be exiting as the run ends). A master that fails
    // to reap leaves its zombies there: count those still present when no
    // instant without one came within 2 s.
    let reaped = crate::server::wait_until(Duration::from_secs(2), || {
        procs::zombie_children(master).is_empty()
    });
    let zombies = if reaped {
        0
    } else {
        procs::zombie_children(master).len()
    };
    let mut answered: Vec<u64> = report
        .outcomes
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .map(|o| o.at_us + o.latency_us)
        .collect();
    answered.sort_unstable();
    let max_gap_us = answered.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let mut by_kind = std::collections::BTreeMap::new();
    for o in report.outcomes.iter().filter(|o| o.outcome != Outcome::Ok) {
        *by_kind
            .entry(format!("{:?}", o.outcome).to_lowercase())
            .or_insert(0) += 1;
    }
    Ok(FaultResult {
        fault,
        row: fault.matrix_row(),
        server: label.to_string(),
        probes: report.outcomes.len() as u64,
        lost: report.errors.total(),
        lost_by_kind: by_kind,
        injections,
        busy_kills,
        max_recovery_ms: max_recovery.map(|d| d.as_secs_f64() * 1e3),
        p99_us: report.latency.value_at_quantile(0.99),
        max_us: report.latency.max(),
        max_gap_us,
        zombies,
    })
}

/// What "the pool is whole again" means for a run.
pub(crate) struct Whole {
    pub(crate) master: i32,
    pub(crate) n: usize,
    pub(crate) status: Option<std::path::PathBuf>,
}

impl Whole {
    /// True when none of `killed` is left and N workers are ready (by the
    /// master's status socket) or, without one, alive.
    pub(crate) fn is_whole(&self, killed: &[i32]) -> bool {
        let Some(path) = &self.status else {
            let pool = procs::children_of(self.master);
            return pool.len() >= self.n && killed.iter().all(|k| !pool.contains(k));
        };
        let Some(doc) = crate::server::read_status(path) else {
            return false;
        };
        let Some(ws) = doc["workers"].as_array() else {
            return false;
        };
        let pid = |w: &serde_json::Value| w["pid"].as_i64().unwrap_or(0) as i32;
        let ready = ws
            .iter()
            .filter(|w| !matches!(w["state"].as_str(), Some("booting" | "stopping")))
            .count();
        ready >= self.n && ws.iter().all(|w| !killed.contains(&pid(w)))
    }

    /// Waits (≤ 1 s) until the `killed` workers are gone and the pool is
    /// whole, and records how long that took from the kill.
    pub(crate) fn note_recovery(&self, killed: &[i32], max: &mut Option<Duration>) {
        let t0 = Instant::now();
        let back = crate::server::wait_until(Duration::from_secs(1), || self.is_whole(killed));
        let took = if back {
            t0.elapsed()
        } else {
            Duration::from_secs(1)
        };
        *max = Some(max.map_or(took, |m| m.max(took)));
    }
}

/// The injector loop; returns the injections made, the longest recovery
/// and the busy workers killed.
fn inject(whole: &Whole, fault: Fault, done: &AtomicBool) -> (u64, Option<Duration>, u64) {
    let master = whole.master;
    let workers = whole.n;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(master.unsigned_abs()));
    let mut count = 0u64;
    let mut busy_kills = 0u64;
    let mut max_recovery: Option<Duration> = None;
    let mut size = workers;
    let mut growing = true;
    let mut next = Instant::now() + fault.interval();
    while !done.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(10)));
            continue;
        }
        next = (next + fault.interval()).max(Instant::now());
        let pool = procs::children_of(master);
        match fault {
            Fault::KillIdle => {
                // Try workers in random order until one is idle.
                let start = rng.pick(pool.len());
                let victim = (0..pool.len())
                    .map(|k| pool[(start + k) % pool.len()])
                    .find(|&w| kill_if_idle(master, w));
                if let Some(w) = victim {
                    count += 1;
                    whole.note_recovery(&[w], &mut max_recovery);
                }
            }
            Fault::KillLockHolder => {
                if let Some(&w) = pool.iter().find(|&&w| kill_if_idle(master, w)) {
                    count += 1;
                    whole.note_recovery(&[w], &mut max_recovery);
                }
            }
            Fault::KillAny => {
                if !pool.is_empty() {
                    let w = pool[rng.pick(pool.len())];
                    if let Some(busy) = kill_classified(master, w) {
                        count += 1;
                        busy_kills += u64::from(busy);
                        whole.note_recovery(&[w], &mut max_recovery);
                    }
                }
            }
            Fault::KillAll => {
                // Every worker stopped first, so that none is replaced
                // before the last is killed; then classified and killed.
                for &w in &pool {
                    let _ = kill(Pid::from_raw(w), Signal::SIGSTOP);
                }
                for &w in &pool {
                    if let Some(busy) = kill_classified(master, w) {
                        busy_kills += u64::from(busy);
                    }
                }
                count += 1;
                whole.note_recovery(&pool, &mut max_recovery);
            }
            Fault::Hup => {
                let _ = kill(Pid::from_raw(master), Signal::SIGHUP);
                count += 1;
            }
            Fault::TtinTtou => {
                if growing && size >= 4 {
                    growing = false;
                } else if !growing && size <= 1 {
                    growing = true;
                }
                let sig = if growing {
                    Signal::SIGTTIN
                } else {
                    Signal::SIGTTOU
                };
                size = if growing { size + 1 } else { size - 1 };
                let _ = kill(Pid::from_raw(master), sig);
                count += 1;
            }
        }
    }
    // Put the pool back to its size for whoever measures next.
    while fault == Fault::TtinTtou && size != workers {
        let sig = if size < workers {
            Signal::SIGTTIN
        } else {
            Signal::SIGTTOU
        };
        let target = if size < workers { size + 1 } else { size - 1 };
        let _ = kill(Pid::from_raw(master), sig);
        crate::server::wait_until(Duration::from_secs(2), || {
            procs::children_of(master).len() == target
        });
        size = target;
    }
    (count, max_recovery, busy_kills)
}
