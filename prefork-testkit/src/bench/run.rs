//! Running: each server started, the same load put on it, what it cost
//! read from /proc, and the server stopped by pid.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::load::{self, LoadConfig, Progress, Protocol, Summary, Target};
use crate::procs;
use crate::server::{Server, ServerBuilder};

/// A server to measure.
#[derive(Debug, Clone)]
pub enum ServerSpec {
    /// The `prefork` binary with a strategy and extra flags (a variant).
    Prefork {
        /// Label in tables.
        label: String,
        /// The binary.
        bin: PathBuf,
        /// `--strategy`.
        strategy: String,
        /// More flags (e.g. `--lock flock`).
        extra: Vec<String>,
    },
    /// nginx with the same fixed response (anchors/nginx.sh).
    Nginx {
        /// The script.
        script: PathBuf,
    },
    /// The minimal C preforking server (anchors/blocking_accept.c), compiled.
    CBlocking {
        /// The compiled binary.
        bin: PathBuf,
    },
}

impl ServerSpec {
    /// The same server with more flags (a prefork one; others unchanged).
    pub fn with_args(self, more: impl IntoIterator<Item = String>) -> ServerSpec {
        match self {
            ServerSpec::Prefork {
                label,
                bin,
                strategy,
                mut extra,
            } => {
                extra.extend(more);
                ServerSpec::Prefork {
                    label,
                    bin,
                    strategy,
                    extra,
                }
            }
            other => other,
        }
    }

    /// Label in tables.
    pub fn label(&self) -> String {
        match self {
            ServerSpec::Prefork { label, .. } => label.clone(),
            ServerSpec::Nginx { .. } => "nginx".into(),
            ServerSpec::CBlocking { .. } => "c-blocking".into(),
        }
    }

    /// True for servers that implement the `http` app's `/sleep/MS`.
    pub fn has_sleep(&self) -> bool {
        matches!(self, ServerSpec::Prefork { .. })
    }

    /// Starts it with `workers` workers on `listeners` fresh loopback ports.
    pub fn start(&self, workers: usize, listeners: usize, dir: &Path) -> std::io::Result<Server> {
        let w = workers.to_string();
        match self {
            ServerSpec::Prefork {
                bin,
                strategy,
                extra,
                ..
            } => {
                let mut b = ServerBuilder::new(bin).args([
                    "--strategy",
                    strategy,
                    "--workers",
                    &w,
                    "--app",
                    "http",
                    "--log-level",
                    "warn",
                ]);
                for _ in 0..listeners {
                    b = b.args(["--bind", "127.0.0.1:0"]);
                }
                b.args(extra.iter().cloned()).start()
            }
            ServerSpec::Nginx { script } => {
                if listeners != 1 {
                    return Err(std::io::Error::other(
                        "the nginx anchor listens on one port",
                    ));
                }
                let port = free_port()?;
                ServerBuilder::new("bash")
                    .args([
                        script.to_string_lossy().into_owned(),
                        "run".into(),
                        dir.join("nginx").to_string_lossy().into_owned(),
                        port.to_string(),
                        w,
                    ])
                    .start()
            }
            ServerSpec::CBlocking { bin } => {
                if listeners != 1 {
                    return Err(std::io::Error::other("the C anchor listens on one port"));
                }
                ServerBuilder::new(bin).args(["0", &w]).start()
            }
        }
    }
}

/// A free loopback port (for servers that cannot bind port 0 and report it).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Compiles the C anchor into `dir`.
pub fn build_c_anchor(dir: &Path) -> std::io::Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("anchors/blocking_accept.c");
    let out = dir.join("blocking_accept");
    let st = std::process::Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()?;
    if !st.success() {
        return Err(std::io::Error::other(format!(
            "cc failed on {}",
            src.display()
        )));
    }
    Ok(out)
}

/// A load scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Connection per request, as fast as possible.
    Hello,
    /// 1% of requests are `/sleep/50`, in open loop at a fixed rate: tail
    /// latency when workers are busy, at the same offered load for every
    /// server, counted from each request's due time (coordinated omission
    /// corrected).
    Mixed,
    /// The same mix in closed loop (`--connections` clients, each sending
    /// its next request when the last is answered): throughput when
    /// workers sleep. Its percentiles undercount stalls (a stalled client
    /// sends nothing, so the requests it would have sent are never
    /// measured), and a server that answers fast requests faster is sent
    /// the slow ones more often; compare tails in `mixed`.
    MixedClosed,
    /// Two listening ports at once, open loop at a fixed rate so that
    /// workers sit idle between connections: the thundering herd shows as
    /// wakeups per connection.
    MultiListener,
    /// Normal requests in open loop at a fixed rate (`--front-rate`), with
    /// no slow clients: the baseline of `slowloris`.
    Steady,
    /// The same normal load while slow clients (`--slow-clients`) each
    /// trickle a header line a second: the normal requests' p99 and errors.
    Slowloris,
    /// Many kept-alive connections (`--idle-connections`), each sending a
    /// request every `--think` seconds: p99, errors, and the master's RSS
    /// per held connection.
    KeepaliveIdle,
    /// Closed loop on 100 kept-alive connections (or `--connections`, if
    /// more), as `wrk -c100` runs it.
    Keepalive,
}

impl Scenario {
    /// All of them.
    pub const ALL: [Scenario; 8] = [
        Scenario::Hello,
        Scenario::Mixed,
        Scenario::MixedClosed,
        Scenario::MultiListener,
        Scenario::Steady,
        Scenario::Slowloris,
        Scenario::KeepaliveIdle,
        Scenario::Keepalive,
    ];

    /// Name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Hello => "hello",
            Scenario::Mixed => "mixed",
            Scenario::MixedClosed => "mixed-closed",
            Scenario::MultiListener => "multi-listener",
            Scenario::Steady => "steady",
            Scenario::Slowloris => "slowloris",
            Scenario::KeepaliveIdle => "keepalive-idle",
            Scenario::Keepalive => "keepalive",
        }
    }

    /// Open loop: every server is offered the same load, so runs are
    /// compared (and their median picked) by p99, not by requests/s.
    pub fn open_loop(self) -> bool {
        matches!(
            self,
            Scenario::Mixed
                | Scenario::MultiListener
                | Scenario::Steady
                | Scenario::Slowloris
                | Scenario::KeepaliveIdle
        )
    }

    /// Needs the app's `/sleep/MS`.
    fn slow(self) -> bool {
        matches!(self, Scenario::Mixed | Scenario::MixedClosed)
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    fn listeners(self) -> usize {
        if self == Scenario::MultiListener {
            2
        } else {
            1
        }
    }
}

/// Load settings shared by every run of a comparison.
#[derive(Debug, Clone)]
pub struct BenchLoad {
    /// Worker processes of every server.
    pub workers: usize,
    /// Concurrent client connections.
    pub connections: usize,
    /// Generator threads.
    pub threads: usize,
    /// Seconds of load per run.
    pub duration: Duration,
    /// Connections per second in the multi-listener scenario.
    pub herd_rate: f64,
    /// Requests per second in the mixed scenario.
    pub mixed_rate: f64,
    /// Requests per second in the steady and slowloris scenarios.
    pub front_rate: f64,
    /// Slow clients in the slowloris scenario.
    pub slow_clients: usize,
    /// Kept-alive connections in the keepalive-idle scenario.
    pub idle_connections: usize,
    /// Between two requests of one keepalive-idle connection.
    pub think: Duration,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Scenario name.
    pub scenario: &'static str,
    /// Server label.
    pub server: String,
    /// Which pass over the servers the run belongs to (from 0). Runs of one
    /// round ran one after another, so they are the ones compared in pairs
    /// (see [`side_by_side`](super::side_by_side)).
    pub round: usize,
    /// The load generator's figures.
    pub load: Summary,
    /// Server CPU (utime+stime, master and workers) per successful request, µs.
    pub cpu_us_per_req: f64,
    /// The master's own part of it (without its workers), µs. Near 0 where
    /// only workers take connections; fdpass's master accepts and hands
    /// over every one.
    pub master_cpu_us_per_req: f64,
    /// Workers' voluntary context switches (sleeps, each ended by a wakeup)
    /// per accepted connection.
    pub wakeups_per_conn: f64,
    /// Total PSS of master and workers at the end of the run, KiB.
    pub pss_kib: u64,
    /// keepalive-idle: how much the master's RSS grew per connection held
    /// open, KiB (measured while they are all open).
    pub master_kib_per_conn: Option<f64>,
}

/// CPU ticks (utime+stime+cutime+cstime) of a process.
fn cpu_ticks(pid: i32) -> u64 {
    procs::stat(pid).map_or(0, |s| s.utime + s.stime + s.cutime + s.cstime)
}

/// CPU ticks (utime+stime) of a process itself, without reaped children.
fn own_cpu_ticks(pid: i32) -> u64 {
    procs::stat(pid).map_or(0, |s| s.utime + s.stime)
}

/// Voluntary context switches of a process.
pub(super) fn voluntary_switches(pid: i32) -> u64 {
    status_field(pid, "voluntary_ctxt_switches:")
}

pub(super) fn status_field(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// PSS of a process from /proc/PID/smaps_rollup, KiB.
pub fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The master and its workers.
fn tree(master: i32) -> Vec<i32> {
    let mut v = vec![master];
    v.extend(procs::children_of(master));
    v
}

fn clock_ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// Runs one scenario against one server and measures it, as part of
/// `round`.
pub fn run_one(
    spec: &ServerSpec,
    scenario: Scenario,
    round: usize,
    load_cfg: &BenchLoad,
    dir: &Path,
) -> std::io::Result<RunResult> {
    if scenario.slow() && !spec.has_sleep() {
        return Err(std::io::Error::other("it does not implement /sleep/MS"));
    }
    let mut server = spec.start(load_cfg.workers, scenario.listeners(), dir)?;
    let targets: Vec<Target> = server
        .addrs()
        .iter()
        .map(|a| Target::parse(a).map_err(std::io::Error::other))
        .collect::<Result<_, _>>()?;
    let mut cfg = LoadConfig {
        targets,
        protocol: Protocol::Http,
        concurrency: load_cfg.connections,
        threads: load_cfg.threads,
        duration: None,
        requests: Some(500),
        ..LoadConfig::default()
    };
    // Warm up (page faults, first allocations), then measure.
    load::run(&cfg, &Arc::new(Progress::default()))?;
    match scenario {
        Scenario::Hello => {}
        Scenario::Mixed => {
            cfg.slow = Some(("/sleep/50".into(), 0.01));
            cfg.rate = Some(load_cfg.mixed_rate);
            // Room for every request due while the workers sleep: a cap
            // would hold requests back (still counted from their due time).
            cfg.concurrency = cfg.concurrency.max(512);
        }
        Scenario::MixedClosed => cfg.slow = Some(("/sleep/50".into(), 0.01)),
        Scenario::MultiListener => {
            cfg.rate = Some(load_cfg.herd_rate);
            cfg.concurrency = cfg.concurrency.max(64);
        }
        Scenario::Steady | Scenario::Slowloris => {
            cfg.rate = Some(load_cfg.front_rate);
            cfg.concurrency = cfg.concurrency.max(512);
        }
        Scenario::Keepalive => {
            // As `wrk -c100` runs it.
            cfg.keepalive = true;
            cfg.concurrency = cfg.concurrency.max(100);
        }
        Scenario::KeepaliveIdle => return run_idle(spec, server, round, load_cfg),
    }
    let slow = match (scenario, &cfg.targets[0]) {
        (Scenario::Slowloris, Target::Tcp(addr)) => Some(crate::slow::SlowClients::start(
            *addr,
            load_cfg.slow_clients,
            Duration::from_secs(1),
        )),
        _ => None,
    };
    cfg.requests = None;
    cfg.duration = Some(load_cfg.duration);
    let pid = server.pid();
    let workers_before = procs::children_of(pid);
    let cpu0: u64 = tree(pid).iter().map(|&p| cpu_ticks(p)).sum();
    let master0 = own_cpu_ticks(pid);
    let sw0: u64 = workers_before.iter().map(|&p| voluntary_switches(p)).sum();
    let report = load::run(&cfg, &Arc::new(Progress::default()))?;
    drop(slow);
    let cpu1: u64 = tree(pid).iter().map(|&p| cpu_ticks(p)).sum();
    let master1 = own_cpu_ticks(pid);
    let workers_after = procs::children_of(pid);
    let sw1: u64 = workers_after.iter().map(|&p| voluntary_switches(p)).sum();
    let pss: u64 = tree(pid).iter().map(|&p| pss_kib(p)).sum();
    server.stop(Duration::from_secs(10));
    let ok = report.ok.max(1) as f64;
    let us_per_req = |ticks: u64| ticks as f64 / clock_ticks_per_sec() * 1e6 / ok;
    let summary = report.summary(Some(load_cfg.workers));
    Ok(RunResult {
        scenario: scenario.name(),
        server: spec.label(),
        round,
        cpu_us_per_req: us_per_req(cpu1.saturating_sub(cpu0)),
        master_cpu_us_per_req: us_per_req(master1.saturating_sub(master0)),
        wakeups_per_conn: sw1.saturating_sub(sw0) as f64 / report.connections.max(1) as f64,
        pss_kib: pss,
        load: summary,
        master_kib_per_conn: None,
    })
}

/// keepalive-idle: `idle_connections` kept-alive clients, each sending a
/// request every `think`; the master's RSS is read before and while they
/// are all open.
fn run_idle(
    spec: &ServerSpec,
    mut server: Server,
    round: usize,
    load_cfg: &BenchLoad,
) -> std::io::Result<RunResult> {
    let Some(Target::Tcp(target)) = server.addrs().first().and_then(|a| Target::parse(a).ok())
    else {
        return Err(std::io::Error::other("keepalive-idle needs a TCP address"));
    };
    let pid = server.pid();
    let rss0 = rss_kib(pid);
    let cpu0: u64 = tree(pid).iter().map(|&p| cpu_ticks(p)).sum();
    let master0 = own_cpu_ticks(pid);
    let cfg = crate::idle::IdleConfig {
        target,
        connections: load_cfg.idle_connections,
        think: load_cfg.think,
        duration: load_cfg.duration.max(load_cfg.think * 3),
        timeout: Duration::from_secs(5),
    };
    let sample_at = cfg.duration.mul_f64(0.8);
    let run = std::thread::spawn(move || crate::idle::run(&cfg));
    std::thread::sleep(sample_at);
    let rss1 = rss_kib(pid);
    let report = run
        .join()
        .map_err(|_| std::io::Error::other("the idle clients panicked"))??;
    let cpu1: u64 = tree(pid).iter().map(|&p| cpu_ticks(p)).sum();
    let master1 = own_cpu_ticks(pid);
    let pss: u64 = tree(pid).iter().map(|&p| pss_kib(p)).sum();
    server.stop(Duration::from_secs(10));
    let ok = report.ok.max(1) as f64;
    let us_per_req = |ticks: u64| ticks as f64 / clock_ticks_per_sec() * 1e6 / ok;
    let load = Summary {
        elapsed_s: report.elapsed_s,
        requests: report.ok,
        rps: report.ok as f64 / report.elapsed_s.max(1e-9),
        errors: crate::load::ErrorCounts {
            other: report.errors,
            ..Default::default()
        },
        connections: report.connects,
        latency_us: report.latency_us.clone(),
        fast_latency_us: report.latency_us,
        per_worker: Default::default(),
        fairness: 0.0,
        max_share: 0.0,
        min_share: 0.0,
    };
    Ok(RunResult {
        scenario: Scenario::KeepaliveIdle.name(),
        server: spec.label(),
        round,
        cpu_us_per_req: us_per_req(cpu1.saturating_sub(cpu0)),
        master_cpu_us_per_req: us_per_req(master1.saturating_sub(master0)),
        wakeups_per_conn: 0.0,
        pss_kib: pss,
        load,
        master_kib_per_conn: Some(
            rss1.saturating_sub(rss0) as f64 / load_cfg.idle_connections.max(1) as f64,
        ),
    })
}

/// A process's resident set (VmRSS), KiB.
fn rss_kib(pid: i32) -> u64 {
    status_field(pid, "VmRSS:")
}
