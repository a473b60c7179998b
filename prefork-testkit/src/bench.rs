//! The comparison harness behind `prefork-bench`: start each server, put
//! the same load on it, read what it cost from /proc, stop it by pid.

use std::collections::BTreeMap;
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
}

impl Scenario {
    /// All of them.
    pub const ALL: [Scenario; 4] = [
        Scenario::Hello,
        Scenario::Mixed,
        Scenario::MixedClosed,
        Scenario::MultiListener,
    ];

    /// Name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Hello => "hello",
            Scenario::Mixed => "mixed",
            Scenario::MixedClosed => "mixed-closed",
            Scenario::MultiListener => "multi-listener",
        }
    }

    /// Open loop: every server is offered the same load, so runs are
    /// compared (and their median picked) by p99, not by requests/s.
    pub fn open_loop(self) -> bool {
        matches!(self, Scenario::Mixed | Scenario::MultiListener)
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
    /// (see [`side_by_side`]).
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
fn voluntary_switches(pid: i32) -> u64 {
    status_field(pid, "voluntary_ctxt_switches:")
}

fn status_field(pid: i32, key: &str) -> u64 {
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
    }
    cfg.requests = None;
    cfg.duration = Some(load_cfg.duration);
    let pid = server.pid();
    let workers_before = procs::children_of(pid);
    let cpu0: u64 = tree(pid).iter().map(|&p| cpu_ticks(p)).sum();
    let master0 = own_cpu_ticks(pid);
    let sw0: u64 = workers_before.iter().map(|&p| voluntary_switches(p)).sum();
    let report = load::run(&cfg, &Arc::new(Progress::default()))?;
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
    })
}

/// The median run of several (by requests/s; by p99 in open loop, where
/// requests/s is the offered rate), with the spread of req/s and CPU
/// across them.
#[derive(Debug, Clone, Serialize)]
pub struct Aggregate {
    /// The median run.
    pub median: RunResult,
    /// Runs.
    pub runs: usize,
    /// Lowest and highest req/s.
    pub rps_range: (f64, f64),
    /// Lowest and highest CPU µs per request.
    pub cpu_range: (f64, f64),
}

/// Picks the median run of each (scenario, server).
pub fn aggregate(results: &[RunResult]) -> Vec<Aggregate> {
    let mut groups: BTreeMap<(usize, String), Vec<RunResult>> = BTreeMap::new();
    let order = |s: &str| {
        Scenario::ALL
            .iter()
            .position(|x| x.name() == s)
            .unwrap_or(9)
    };
    let first_seen = servers_in_order(results);
    for r in results {
        groups
            .entry((order(r.scenario), r.server.clone()))
            .or_default()
            .push(r.clone());
    }
    let mut out: Vec<Aggregate> = groups
        .into_values()
        .map(|mut runs| {
            let open = Scenario::parse(runs[0].scenario).is_some_and(Scenario::open_loop);
            if open {
                runs.sort_by_key(|r| r.load.latency_us.p99);
            } else {
                runs.sort_by(|a, b| a.load.rps.total_cmp(&b.load.rps));
            }
            let rps = runs
                .iter()
                .map(|r| r.load.rps)
                .fold((f64::INFINITY, 0.0_f64), |(lo, hi), x| {
                    (lo.min(x), hi.max(x))
                });
            let cpus: Vec<f64> = runs.iter().map(|r| r.cpu_us_per_req).collect();
            let cpu = (
                cpus.iter().copied().fold(f64::INFINITY, f64::min),
                cpus.iter().copied().fold(0.0, f64::max),
            );
            Aggregate {
                median: runs[runs.len() / 2].clone(),
                runs: runs.len(),
                rps_range: rps,
                cpu_range: cpu,
            }
        })
        .collect();
    out.sort_by_key(|a| {
        (
            order(a.median.scenario),
            first_seen
                .iter()
                .position(|s| *s == a.median.server.as_str()),
        )
    });
    out
}

/// The comparison as a markdown table.
pub fn markdown(aggs: &[Aggregate]) -> String {
    let mut s = String::from(
        "| scenario | server | req/s | p50 µs | p99 µs | p99.9 µs | fast p99 µs | fairness | busiest | errors | CPU µs/req | master µs/req | wakeups/conn | PSS MiB |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for a in aggs {
        let r = &a.median;
        let l = &r.load;
        let spread = if a.runs > 1 {
            format!(" ({:.0}–{:.0})", a.rps_range.0, a.rps_range.1)
        } else {
            String::new()
        };
        let fair = if r.server == "nginx" || r.server == "c-blocking" {
            ("n/a".to_string(), "n/a".to_string())
        } else {
            (
                format!("{:.3}", l.fairness),
                format!("{:.1}%", 100.0 * l.max_share),
            )
        };
        s.push_str(&format!(
            "| {} | {} | {:.0}{} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.1} |\n",
            r.scenario,
            r.server,
            l.rps,
            spread,
            l.latency_us.p50,
            l.latency_us.p99,
            l.latency_us.p999,
            l.fast_latency_us.p99,
            fair.0,
            fair.1,
            l.errors.total(),
            r.cpu_us_per_req,
            r.master_cpu_us_per_req,
            r.wakeups_per_conn,
            r.pss_kib as f64 / 1024.0
        ));
    }
    s
}

/// Servers in the order they first appear in `results`.
fn servers_in_order(results: &[RunResult]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for r in results {
        if !out.contains(&r.server.as_str()) {
            out.push(&r.server);
        }
    }
    out
}

/// Middle value (mean of the two middle ones for an even count).
fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// For each server but `base`: `figure` of its run in `scenario` divided by
/// `base`'s in the same round, for every round where both ran. The machine
/// drifts between rounds, so only runs made next to each other are divided.
pub fn paired(
    results: &[RunResult],
    scenario: &str,
    base: &str,
    figure: impl Fn(&RunResult) -> f64,
) -> Vec<(String, Vec<f64>)> {
    let base_runs: Vec<&RunResult> = results
        .iter()
        .filter(|b| b.scenario == scenario && b.server == base && figure(b) > 0.0)
        .collect();
    servers_in_order(results)
        .into_iter()
        .filter(|&s| s != base)
        .map(|s| {
            let ratios = base_runs
                .iter()
                .filter_map(|b| {
                    let r = results
                        .iter()
                        .find(|r| r.scenario == scenario && r.server == s && r.round == b.round)?;
                    Some(figure(r) / figure(b))
                })
                .collect();
            (s.to_string(), ratios)
        })
        .filter(|(_, ratios): &(String, Vec<f64>)| !ratios.is_empty())
        .collect()
}

/// For each server that ran `scenario`: in how many rounds its p99 was the
/// lowest (ties count for each), and in how many rounds it ran.
pub fn lowest_p99(results: &[RunResult], scenario: &str) -> Vec<(String, usize, usize)> {
    let runs: Vec<&RunResult> = results.iter().filter(|r| r.scenario == scenario).collect();
    let best: BTreeMap<usize, u64> = runs.iter().fold(BTreeMap::new(), |mut m, r| {
        let p = r.load.latency_us.p99;
        m.entry(r.round)
            .and_modify(|b: &mut u64| *b = (*b).min(p))
            .or_insert(p);
        m
    });
    servers_in_order(results)
        .into_iter()
        .filter_map(|s| {
            let mine: Vec<&&RunResult> = runs.iter().filter(|r| r.server == s).collect();
            if mine.is_empty() {
                return None;
            }
            let wins = mine
                .iter()
                .filter(|r| best.get(&r.round) == Some(&r.load.latency_us.p99))
                .count();
            Some((s.to_string(), wins, mine.len()))
        })
        .collect()
}

/// The comparisons the issues ask for, made only between runs of the same
/// round: closed-loop req/s against `blocking`, CPU per request against the
/// C server (`c-blocking`), and who had the lowest p99 in each open-loop
/// round. Empty when there is nothing to pair.
pub fn side_by_side(results: &[RunResult]) -> String {
    let fmt = |rows: Vec<(String, Vec<f64>)>| {
        rows.iter()
            .filter_map(|(s, v)| {
                let each: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
                Some(format!("{s} **{:.2}** ({})", median(v)?, each.join(", ")))
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut lines = Vec::new();
    for sc in Scenario::ALL {
        let name = sc.name();
        if !results.iter().any(|r| r.scenario == name) {
            continue;
        }
        if !sc.open_loop() {
            let rows = paired(results, name, "blocking", |r| r.load.rps);
            if !rows.is_empty() {
                lines.push(format!("- {name}, req/s ÷ blocking's: {}", fmt(rows)));
            }
        }
        let rows = paired(results, name, "c-blocking", |r| r.cpu_us_per_req);
        if !rows.is_empty() {
            lines.push(format!(
                "- {name}, CPU µs/req ÷ c-blocking's: {}",
                fmt(rows)
            ));
        }
        if sc.open_loop() {
            let wins: Vec<String> = lowest_p99(results, name)
                .into_iter()
                .map(|(s, w, n)| format!("{s} {w} of {n}"))
                .collect();
            // Lowest of one server says nothing.
            if wins.len() > 1 {
                lines.push(format!(
                    "- {name}, rounds with the lowest p99: {}",
                    wins.join(", ")
                ));
            }
        }
    }
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "\nSide by side, each run against the one of the same round (median **bold**, then every round):\n\n{}\n",
        lines.join("\n")
    )
}

/// Series colours of the SVG charts.
pub(crate) const COLORS: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f",
];

/// A row of colour swatches with labels at height `ly`.
pub(crate) fn svg_legend(out: &mut String, items: &[(&str, &str)], left: f64, ly: f64) {
    for (i, (label, color)) in items.iter().enumerate() {
        let x = left + i as f64 * 130.0;
        out.push_str(&format!(
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{}\" y=\"{ly}\">{label}</text>\n",
            ly - 10.0,
            x + 16.0
        ));
    }
}

/// A chart a person can look at: requests/s and p99 per server, one group
/// of bars per scenario. Plain SVG (rectangles and text).
pub fn svg(aggs: &[Aggregate]) -> String {
    let scenarios: Vec<&str> = {
        let mut v: Vec<&str> = aggs.iter().map(|a| a.median.scenario).collect();
        v.dedup();
        v
    };
    let servers: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for a in aggs {
            if !v.contains(&a.median.server) {
                v.push(a.median.server.clone());
            }
        }
        v
    };
    let (w, panel_h, top, left) = (900.0, 260.0, 40.0, 70.0);
    let group_w = (w - left - 20.0) / scenarios.len().max(1) as f64;
    let bar_w = (group_w - 30.0) / servers.len().max(1) as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        2.0 * panel_h + 2.0 * top + 60.0
    );
    fn rps(r: &RunResult) -> f64 {
        r.load.rps
    }
    fn p99_ms(r: &RunResult) -> f64 {
        r.load.latency_us.p99 as f64 / 1000.0
    }
    type Panel = (&'static str, fn(&RunResult) -> f64);
    let panels: [Panel; 2] = [
        ("requests/s (higher is better)", rps),
        ("p99 latency, ms (lower is better)", p99_ms),
    ];
    for (pi, (title, value)) in panels.iter().enumerate() {
        let y0 = top + pi as f64 * (panel_h + top);
        out.push_str(&format!(
            "<text x=\"{left}\" y=\"{}\" font-weight=\"bold\">{title}; each scenario scaled to its own maximum</text>\n",
            y0 - 10.0
        ));
        out.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#333\"/>\n",
            y0 + panel_h,
            w - 20.0,
            y0 + panel_h
        ));
        for (si, sc) in scenarios.iter().enumerate() {
            let gx = left + si as f64 * group_w + 15.0;
            let max = aggs
                .iter()
                .filter(|a| a.median.scenario == *sc)
                .map(|a| value(&a.median))
                .fold(0.0, f64::max)
                .max(1e-9);
            out.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{sc}</text>\n",
                gx + (group_w - 30.0) / 2.0,
                y0 + panel_h + 16.0
            ));
            for (ki, sv) in servers.iter().enumerate() {
                let Some(a) = aggs
                    .iter()
                    .find(|a| a.median.scenario == *sc && a.median.server == *sv)
                else {
                    continue;
                };
                let v = value(&a.median);
                let h = v / max * (panel_h - 20.0);
                let x = gx + ki as f64 * bar_w;
                out.push_str(&format!(
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"/>\n",
                    y0 + panel_h - h,
                    bar_w - 4.0,
                    COLORS[ki % COLORS.len()]
                ));
                out.push_str(&format!(
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>\n",
                    x + (bar_w - 4.0) / 2.0,
                    y0 + panel_h - h - 3.0,
                    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
                ));
            }
        }
    }
    let items: Vec<(&str, &str)> = servers
        .iter()
        .enumerate()
        .map(|(ki, sv)| (sv.as_str(), COLORS[ki % COLORS.len()]))
        .collect();
    svg_legend(&mut out, &items, left, 2.0 * panel_h + 2.0 * top + 40.0);
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{ErrorCounts, Percentiles};

    fn result(scenario: &'static str, server: &str, rps: f64) -> RunResult {
        RunResult {
            scenario,
            server: server.into(),
            load: Summary {
                elapsed_s: 1.0,
                requests: rps as u64,
                rps,
                errors: ErrorCounts::default(),
                connections: rps as u64,
                latency_us: Percentiles {
                    p50: 100,
                    p90: 200,
                    p99: 300,
                    p999: 400,
                    max: 500,
                },
                fast_latency_us: Percentiles {
                    p50: 100,
                    p90: 200,
                    p99: 300,
                    p999: 400,
                    max: 500,
                },
                per_worker: [(0, 5), (1, 5)].into(),
                fairness: 1.0,
                max_share: 0.5,
                min_share: 0.5,
            },
            round: 0,
            cpu_us_per_req: 20.0,
            master_cpu_us_per_req: 1.0,
            wakeups_per_conn: 1.0,
            pss_kib: 2048,
        }
    }

    #[test]
    fn aggregate_takes_the_median_run_and_keeps_order() {
        let rs = vec![
            result("hello", "blocking", 100.0),
            result("hello", "nginx", 300.0),
            result("hello", "blocking", 120.0),
            result("hello", "blocking", 110.0),
            result("mixed", "blocking", 50.0),
        ];
        let a = aggregate(&rs);
        assert_eq!(a.len(), 3);
        assert_eq!(
            (a[0].median.server.as_str(), a[0].median.load.rps),
            ("blocking", 110.0)
        );
        assert_eq!(a[0].rps_range, (100.0, 120.0));
        assert_eq!(a[1].median.server, "nginx");
        assert_eq!(a[2].median.scenario, "mixed");
        let md = markdown(&a);
        assert!(
            md.contains("| hello | blocking | 110 (100–120) | 100 | 300 | 400 | 300 |"),
            "{md}"
        );
        let chart = svg(&a);
        // Background, one bar per result in each of 2 panels, one legend box per server.
        assert!(chart.starts_with("<svg"));
        assert_eq!(chart.matches("<rect").count(), 1 + 3 * 2 + 2);
    }

    /// Ratios divide runs of the same round only; a round where either
    /// server is missing gives no ratio, and the baseline is not listed.
    #[test]
    fn side_by_side_pairs_runs_of_the_same_round() {
        let run = |scenario, server: &str, round, rps, cpu| {
            let mut r = result(scenario, server, rps);
            r.round = round;
            r.cpu_us_per_req = cpu;
            r
        };
        let rs = vec![
            run("hello", "blocking", 0, 100.0, 25.0),
            run("hello", "fdpass", 0, 90.0, 50.0),
            run("hello", "c-blocking", 0, 100.0, 20.0),
            run("hello", "blocking", 1, 200.0, 30.0),
            run("hello", "fdpass", 1, 160.0, 66.0),
            run("hello", "c-blocking", 1, 200.0, 30.0),
            // Round 2: fdpass only; nothing to pair it with.
            run("hello", "fdpass", 2, 1.0, 1.0),
        ];
        let by_rps = paired(&rs, "hello", "blocking", |r| r.load.rps);
        assert_eq!(
            by_rps,
            vec![
                ("fdpass".to_string(), vec![0.9, 0.8]),
                ("c-blocking".to_string(), vec![1.0, 1.0])
            ]
        );
        let by_cpu = paired(&rs, "hello", "c-blocking", |r| r.cpu_us_per_req);
        assert_eq!(by_cpu[0], ("blocking".to_string(), vec![1.25, 1.0]));
        assert_eq!(by_cpu[1].0, "fdpass");
        assert!((by_cpu[1].1[0] - 2.5).abs() < 1e-9 && (by_cpu[1].1[1] - 2.2).abs() < 1e-9);
        assert_eq!(median(&[2.5, 2.2]), Some(2.35));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[]), None);
        let text = side_by_side(&rs);
        assert!(
            text.contains("- hello, req/s ÷ blocking's: fdpass **0.85** (0.90, 0.80); c-blocking **1.00** (1.00, 1.00)"),
            "{text}"
        );
        assert!(
            text.contains("- hello, CPU µs/req ÷ c-blocking's: blocking **1.12** (1.25, 1.00); fdpass **2.35** (2.50, 2.20)"),
            "{text}"
        );
        // Nothing to pair: no section at all.
        assert_eq!(side_by_side(&rs[1..2]), "");
    }

    /// Each open-loop round names the server with the lowest p99; a tie
    /// counts for both.
    #[test]
    fn lowest_p99_counts_rounds_won() {
        let run = |server: &str, round, p99| {
            let mut r = result("mixed", server, 2000.0);
            r.round = round;
            r.load.latency_us.p99 = p99;
            r
        };
        let rs = vec![
            run("blocking", 0, 1500),
            run("fdpass", 0, 4000),
            run("blocking", 1, 2000),
            run("fdpass", 1, 1800),
            run("blocking", 2, 900),
            run("fdpass", 2, 900),
        ];
        assert_eq!(
            lowest_p99(&rs, "mixed"),
            vec![("blocking".to_string(), 2, 3), ("fdpass".to_string(), 2, 3)]
        );
        assert!(side_by_side(&rs)
            .contains("- mixed, rounds with the lowest p99: blocking 2 of 3, fdpass 2 of 3"));
        assert!(lowest_p99(&rs, "hello").is_empty());
        // One server alone is lowest every time, which says nothing.
        let alone: Vec<RunResult> = rs.into_iter().filter(|r| r.server == "fdpass").collect();
        assert_eq!(
            lowest_p99(&alone, "mixed"),
            vec![("fdpass".to_string(), 3, 3)]
        );
        assert_eq!(side_by_side(&alone), "");
    }

    /// In open loop every run carries the offered rate: the median run is
    /// the one with the median p99, and the ranges still span every run.
    #[test]
    fn open_loop_scenarios_take_the_median_by_p99() {
        let with_p99 = |rps: f64, p99: u64| {
            let mut r = result("mixed", "fdpass", rps);
            r.load.latency_us.p99 = p99;
            r
        };
        let rs = vec![
            with_p99(2000.0, 900),
            with_p99(1999.0, 700),
            with_p99(2001.0, 800),
        ];
        let a = aggregate(&rs);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].median.load.latency_us.p99, 800);
        assert_eq!(a[0].rps_range, (1999.0, 2001.0));
        assert!(Scenario::Mixed.open_loop() && Scenario::MultiListener.open_loop());
        assert!(!Scenario::Hello.open_loop() && !Scenario::MixedClosed.open_loop());
        assert_eq!(Scenario::parse("mixed-closed"), Some(Scenario::MixedClosed));
    }

    #[test]
    fn reads_pss_and_switches_of_this_process() {
        let me = std::process::id() as i32;
        assert!(pss_kib(me) > 0);
        assert!(voluntary_switches(me) > 0 || status_field(me, "Threads:") > 0);
    }
}
