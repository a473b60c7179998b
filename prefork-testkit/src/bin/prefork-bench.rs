//! `prefork-bench`: runs every strategy (and anchors) under the same load
//! and faults, and compares them.
//!
//!     prefork-bench                                  # every strategy, every scenario
//!     prefork-bench --anchor nginx --anchor c --repeat 3 --svg docs/bench.svg
//!     prefork-bench --faults kill-idle,hup --short   # fault scenarios
//!     prefork-bench --step --svg docs/step.svg       # a pool that sizes itself vs fixed pools

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use prefork_testkit::bench::{self, BenchLoad, Scenario, ServerSpec};
use prefork_testkit::faults::{self, Fault};
use prefork_testkit::step;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Anchor {
    /// nginx with the same fixed response (installed by anchors/nginx.sh if missing).
    Nginx,
    /// The minimal C preforking server in blocking accept(2).
    C,
}

/// Compare prefork's accept strategies under the same load and faults.
#[derive(Debug, Parser)]
#[command(name = "prefork-bench", version, about)]
struct Cli {
    /// The prefork binary (default: next to this one).
    #[arg(long)]
    prefork: Option<PathBuf>,
    /// Strategies to run, comma-separated (default: every one the binary offers).
    #[arg(long, value_delimiter = ',')]
    strategies: Vec<String>,
    /// Variants: a label and prefork flags, e.g. `mutex-flock=--strategy mutex --lock flock`.
    #[arg(long, value_name = "LABEL=FLAGS")]
    variant: Vec<String>,
    /// Load scenarios, comma-separated: hello, mixed, mixed-closed, multi-listener.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "hello,mixed,mixed-closed,multi-listener"
    )]
    scenarios: Vec<String>,
    /// Reference servers to put in the same table.
    #[arg(long, value_enum)]
    anchor: Vec<Anchor>,
    /// Worker processes of every server.
    #[arg(short, long, default_value_t = 2)]
    workers: usize,
    /// Concurrent client connections.
    #[arg(short = 'c', long, default_value_t = 8)]
    connections: usize,
    /// Load generator threads.
    #[arg(short, long, default_value_t = 1)]
    threads: usize,
    /// Seconds of load per run.
    #[arg(short, long, default_value_t = 5.0)]
    duration: f64,
    /// Connections per second in the multi-listener scenario (open loop).
    #[arg(long, default_value_t = 2000.0)]
    herd_rate: f64,
    /// Requests per second in the mixed scenario (open loop; default 1000
    /// per worker, which leaves the pool about half asleep on the 1 % of
    /// 50 ms requests).
    #[arg(long)]
    mixed_rate: Option<f64>,
    /// Requests per second of normal load in the steady and slowloris
    /// scenarios (open loop).
    #[arg(long, default_value_t = 1000.0)]
    front_rate: f64,
    /// Slow clients in the slowloris scenario, each trickling a header line
    /// a second.
    #[arg(long, default_value_t = 200)]
    slow_clients: usize,
    /// Kept-alive connections in the keepalive-idle scenario.
    #[arg(long, default_value_t = 2000)]
    idle_connections: usize,
    /// Seconds between two requests of one keepalive-idle connection.
    #[arg(long, default_value_t = 2.0)]
    think: f64,
    /// Runs of each (scenario, server), interleaved; the median is reported.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Fault scenarios instead of load scenarios: kill-idle, kill-any, hup, ttin-ttou, kill-all, kill-lock-holder.
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Probe rate of fault scenarios, connections per second.
    #[arg(long, default_value_t = 500.0)]
    fault_rate: f64,
    /// Seconds each fault scenario lasts.
    #[arg(long, default_value_t = 20.0)]
    fault_duration: f64,
    /// Short runs: 3 s per fault scenario, 2 s per load run.
    #[arg(long)]
    short: bool,
    /// The soak instead of load scenarios: SECS of open-loop load at
    /// --fault-rate with every fault mixed in, every strategy at once; then
    /// nothing lost beyond one connection per busy worker killed, and each
    /// master's descriptors and RSS where they started (exit 1 otherwise).
    #[arg(long, value_name = "SECS")]
    soak: Option<f64>,
    /// The memory comparison instead of load scenarios: N independent
    /// servers each preloading the same data (`--app static`) against one
    /// master with N workers sharing it: total PSS, summed RSS, start time.
    #[arg(long)]
    memory: bool,
    /// memory: MiB of data to preload.
    #[arg(long, default_value_t = 200)]
    memory_data: usize,
    /// memory: the values of N.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    memory_sizes: Vec<usize>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the chart (SVG) here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// The step scenario instead of load scenarios: idle, a burst of slow
    /// requests needing --step-factor × MIN workers, idle; a self-sizing
    /// pool (--workers MIN:MAX) against fixed pools of MIN and of MAX.
    #[arg(long)]
    step: bool,
    /// step: MIN workers.
    #[arg(long, default_value_t = 2)]
    step_min: usize,
    /// step: MAX workers.
    #[arg(long, default_value_t = 12)]
    step_max: usize,
    /// step: the burst keeps this many times MIN workers busy.
    #[arg(long, default_value_t = 4.0)]
    step_factor: f64,
    /// step: milliseconds each burst request sleeps on the server.
    #[arg(long, default_value_t = 100)]
    step_sleep_ms: u64,
    /// step: seconds of burst.
    #[arg(long, default_value_t = 6.0)]
    step_burst: f64,
    /// step: --scale-window of the self-sizing pool, seconds.
    #[arg(long, default_value_t = 1.0)]
    step_window: f64,
    /// step: --scale-stall of the self-sizing pool, seconds.
    #[arg(long, default_value_t = 1.0)]
    step_stall: f64,
}

/// Checks the words of the command line that clap cannot (names in lists,
/// variant syntax): a usage error is exit 2, like every prefork tool.
fn check_usage(cli: &Cli) -> Result<(), String> {
    for sc in &cli.scenarios {
        if Scenario::parse(sc).is_none() {
            return Err(format!(
                "unknown scenario {sc:?} (hello, mixed, mixed-closed, multi-listener)"
            ));
        }
    }
    for f in &cli.faults {
        if Fault::parse(f).is_none() {
            let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
            return Err(format!("unknown fault {f:?} ({})", names.join(", ")));
        }
    }
    for v in &cli.variant {
        let ok = v.split_once('=').is_some_and(|(label, flags)| {
            !label.is_empty() && flags.split_whitespace().any(|w| w == "--strategy")
        });
        if !ok {
            return Err(format!(
                "--variant {v:?}: expected LABEL=FLAGS with --strategy NAME in FLAGS"
            ));
        }
    }
    if cli.step
        && (cli.step_min == 0
            || cli.step_max <= cli.step_min
            || cli.step_max > 1024
            || !(cli.step_factor > 0.0
                && cli.step_burst > 0.0
                && cli.step_window > 0.0
                && cli.step_stall > 0.0)
            || cli.step_sleep_ms == 0)
    {
        return Err(
            "--step needs 1 <= --step-min < --step-max <= 1024 and positive factor, sleep, burst, window and stall"
                .into(),
        );
    }
    if cli.soak.is_some_and(|s| s.is_nan() || s <= 0.0) {
        return Err("--soak needs a positive number of seconds".into());
    }
    if cli.soak.is_some() && (cli.step || !cli.faults.is_empty()) {
        return Err("--soak, --step and --faults are separate runs; give one".into());
    }
    if cli.step && !cli.faults.is_empty() {
        return Err("--step and --faults are separate runs; give one".into());
    }
    if cli.repeat == 0 || cli.workers == 0 || cli.connections == 0 || cli.threads == 0 {
        return Err("--repeat, --workers, --connections and --threads must be at least 1".into());
    }
    if !(cli.duration > 0.0
        && cli.fault_duration > 0.0
        && cli.fault_rate > 0.0
        && cli.herd_rate > 0.0
        && cli.mixed_rate.map_or(true, |r| r > 0.0)
        && cli.front_rate > 0.0
        && cli.think > 0.0)
    {
        return Err("durations and rates must be positive".into());
    }
    Ok(())
}

/// The mixed scenario's rate: given, or 1000 requests/s per worker.
fn mixed_rate(cli: &Cli) -> f64 {
    cli.mixed_rate.unwrap_or(1000.0 * cli.workers as f64)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = check_usage(&cli) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn prefork_bin(cli: &Cli) -> Result<PathBuf, String> {
    let bin = match &cli.prefork {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("prefork"),
    };
    if !bin.exists() {
        return Err(format!(
            "prefork binary not found at {} (build it with `cargo build --release`, or pass --prefork)",
            bin.display()
        ));
    }
    Ok(bin)
}

fn servers(cli: &Cli, dir: &std::path::Path) -> Result<Vec<ServerSpec>, String> {
    let bin = prefork_bin(cli)?;
    let offered: Vec<String> = std::process::Command::new(&bin)
        .arg("--list-strategies")
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        })?;
    let wanted = if cli.strategies.is_empty() {
        offered.clone()
    } else {
        cli.strategies.clone()
    };
    let mut out = Vec::new();
    for s in wanted {
        if !offered.contains(&s) {
            return Err(format!(
                "unknown strategy {s:?}; {} offers: {}",
                bin.display(),
                offered.join(", ")
            ));
        }
        out.push(ServerSpec::Prefork {
            label: s.clone(),
            bin: bin.clone(),
            strategy: s,
            extra: Vec::new(),
        });
    }
    for v in &cli.variant {
        let (label, flags) = v
            .split_once('=')
            .ok_or_else(|| format!("--variant {v:?}: expected LABEL=FLAGS"))?;
        let mut words: Vec<String> = flags.split_whitespace().map(str::to_string).collect();
        let strategy = match words.iter().position(|w| w == "--strategy") {
            Some(i) if i + 1 < words.len() => {
                let s = words.remove(i + 1);
                words.remove(i);
                s
            }
            _ => {
                return Err(format!(
                    "--variant {v:?}: the flags must include --strategy NAME"
                ))
            }
        };
        out.push(ServerSpec::Prefork {
            label: label.to_string(),
            bin: bin.clone(),
            strategy,
            extra: words,
        });
    }
    for a in &cli.anchor {
        match a {
            Anchor::Nginx => {
                let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("anchors/nginx.sh");
                let st = std::process::Command::new("bash")
                    .arg(&script)
                    .arg("install")
                    .status();
                if !st.is_ok_and(|s| s.success()) {
                    return Err("installing nginx failed (anchors/nginx.sh install)".into());
                }
                out.push(ServerSpec::Nginx { script });
            }
            Anchor::C => out.push(ServerSpec::CBlocking {
                bin: bench::build_c_anchor(dir).map_err(|e| e.to_string())?,
            }),
        }
    }
    Ok(out)
}

fn run(cli: Cli) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("prefork-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = if cli.memory {
        memory_runs(&cli, &dir)
    } else if let Some(secs) = cli.soak {
        soak_runs(&cli, &dir, secs)
    } else if cli.step {
        step_runs(&cli, &dir)
    } else if cli.faults.is_empty() {
        compare(&cli, &dir)
    } else {
        fault_runs(&cli, &dir)
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn compare(cli: &Cli, dir: &std::path::Path) -> Result<(), String> {
    let servers = servers(cli, dir)?;
    let scenarios: Vec<Scenario> = cli
        .scenarios
        .iter()
        .map(|s| {
            Scenario::parse(s).ok_or_else(|| {
                format!("unknown scenario {s:?} (hello, mixed, mixed-closed, multi-listener, steady, slowloris, keepalive-idle, keepalive)")
            })
        })
        .collect::<Result<_, _>>()?;
    let load = BenchLoad {
        workers: cli.workers,
        connections: cli.connections,
        threads: cli.threads,
        duration: Duration::from_secs_f64(if cli.short { 2.0 } else { cli.duration }),
        herd_rate: cli.herd_rate,
        mixed_rate: mixed_rate(cli),
        front_rate: cli.front_rate,
        slow_clients: cli.slow_clients,
        idle_connections: cli.idle_connections,
        think: Duration::from_secs_f64(cli.think),
    };
    let total = cli.repeat * scenarios.len() * servers.len();
    let mut results = Vec::new();
    let mut k = 0;
    for round in 0..cli.repeat {
        for &sc in &scenarios {
            for spec in &servers {
                k += 1;
                match bench::run_one(spec, sc, round, &load, dir) {
                    Ok(r) => {
                        eprintln!(
                            "[{k}/{total}] {:<15} {:<12} {:>8.0} req/s  p99 {:>6} µs  {:>5.1} µs CPU/req (master {:.1})  {:.2} wakeups/conn",
                            sc.name(), spec.label(), r.load.rps, r.load.latency_us.p99, r.cpu_us_per_req, r.master_cpu_us_per_req, r.wakeups_per_conn
                        );
                        results.push(r);
                    }
                    Err(e) => eprintln!(
                        "[{k}/{total}] {:<15} {:<12} skipped: {e}",
                        sc.name(),
                        spec.label()
                    ),
                }
            }
        }
    }
    let aggs = bench::aggregate(&results);
    println!(
        "{} workers, {} connections (closed loop), {} generator thread(s), {:.0} s per run, median of {} run(s) (by req/s; by p99 in the open-loop scenarios: mixed at {:.0}/s, multi-listener at {:.0}/s, steady and slowloris at {:.0}/s with {} slow clients, keepalive-idle: {} connections, a request each per {:.1} s); connection per request but in keepalive and keepalive-idle\n",
        load.workers, load.connections, load.threads, load.duration.as_secs_f64(), cli.repeat,
        load.mixed_rate, load.herd_rate, load.front_rate, load.slow_clients,
        load.idle_connections, load.think.as_secs_f64()
    );
    print!("{}", bench::markdown(&aggs));
    print!("{}", bench::side_by_side(&results));
    if let Some(p) = &cli.json {
        let j = serde_json::json!({ "load": {
            "workers": load.workers, "connections": load.connections, "threads": load.threads,
            "duration_s": load.duration.as_secs_f64(), "repeat": cli.repeat,
            "mixed_rate": load.mixed_rate, "herd_rate": load.herd_rate }, "results": aggs, "runs": results });
        write_json(p, &j)?;
    }
    if let Some(p) = &cli.svg {
        write_file(p, bench::svg(&aggs))?;
    }
    Ok(())
}

fn step_runs(cli: &Cli, dir: &std::path::Path) -> Result<(), String> {
    let cfg = step::StepConfig {
        bin: prefork_bin(cli)?,
        min: cli.step_min,
        max: cli.step_max,
        sleep: Duration::from_millis(cli.step_sleep_ms),
        factor: cli.step_factor,
        idle_before: Duration::from_secs(2),
        burst: Duration::from_secs_f64(if cli.short { 3.0 } else { cli.step_burst }),
        window: Duration::from_secs_f64(cli.step_window),
        stall: Duration::from_secs_f64(cli.step_stall),
        tail_rate: 20.0,
        tail_max: Duration::from_secs(60),
    };
    let strategies: Vec<String> = servers(cli, dir)?
        .into_iter()
        .filter_map(|s| match s {
            ServerSpec::Prefork {
                strategy, extra, ..
            } if extra.is_empty() => Some(strategy),
            _ => None,
        })
        .collect();
    let total = strategies.len() * step::Pool::ALL.len();
    let mut results = Vec::new();
    for strategy in &strategies {
        for pool in step::Pool::ALL {
            let r = step::run_step(&cfg, strategy, pool, dir)
                .map_err(|e| format!("step {strategy} {pool:?}: {e}"))?;
            eprintln!(
                "[{}/{total}] step {:<10} --workers {:<6} p99 {:>8.1} ms  enough after {:?} s  back to MIN after {:?} s  lost {}",
                results.len() + 1,
                strategy,
                r.workers,
                r.burst_load.latency_us.p99 as f64 / 1000.0,
                r.enough_s.map(|s| (s * 100.0).round() / 100.0),
                r.shrunk_s.map(|s| (s * 100.0).round() / 100.0),
                r.lost
            );
            results.push(r);
        }
    }
    print!("{}", step::markdown(&cfg, &results));
    if let Some(p) = &cli.json {
        write_json(p, &results)?;
    }
    if let Some(p) = &cli.svg {
        write_file(p, step::svg(&results))?;
    }
    Ok(())
}

/// Writes `text` to `path`; the error names the path.
fn write_file(path: &std::path::Path, text: String) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes `value` to `path` as pretty JSON.
fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> Result<(), String> {
    write_file(
        path,
        serde_json::to_string_pretty(value).map_err(|e| e.to_string())?,
    )
}

/// The many-processes comparison (docs/memory.md).
fn memory_runs(cli: &Cli, dir: &std::path::Path) -> Result<(), String> {
    use prefork_testkit::memory;
    if cli.memory_sizes.is_empty() || cli.memory_sizes.contains(&0) || cli.memory_data == 0 {
        return Err("--memory-sizes and --memory-data must be at least 1".into());
    }
    let bin = prefork_bin(cli)?;
    let data = memory::data_dir(dir);
    memory::make_data(&data, cli.memory_data).map_err(|e| format!("{}: {e}", data.display()))?;
    let rows = memory::run(&bin, &data, &cli.memory_sizes).map_err(|e| e.to_string())?;
    print!("{}", memory::markdown(&rows, cli.memory_data));
    if let Some(p) = &cli.json {
        write_json(p, &rows)?;
    }
    if let Some(p) = &cli.svg {
        write_file(p, memory::svg(&rows))?;
    }
    Ok(())
}

/// Every prefork strategy soaked at once, each with its own prober and
/// injector.
fn soak_runs(cli: &Cli, dir: &std::path::Path, secs: f64) -> Result<(), String> {
    use prefork_testkit::soak;
    let servers: Vec<ServerSpec> = servers(cli, dir)?
        .into_iter()
        .filter(|s| matches!(s, ServerSpec::Prefork { .. }))
        .collect();
    let duration = Duration::from_secs_f64(secs);
    let runs: Vec<_> = servers
        .into_iter()
        .map(|spec| {
            let label = spec.label();
            let status = soak::status_path(dir, &label);
            let spec = spec.with_args(["--status".into(), format!("unix:{}", status.display())]);
            let (workers, rate, dir) = (cli.workers, cli.fault_rate, dir.to_path_buf());
            std::thread::spawn(move || -> Result<soak::SoakResult, String> {
                let server = spec.start(workers, 1, &dir).map_err(|e| e.to_string())?;
                let r = soak::soak(&server, &label, workers, rate, duration, &status)
                    .map_err(|e| e.to_string())?;
                eprintln!(
                    "soak {label}: {} probes, {} lost, {} busy killed",
                    r.probes, r.lost, r.busy_kills
                );
                Ok(r)
            })
        })
        .collect();
    let mut rows = Vec::new();
    for r in runs {
        rows.push(
            r.join()
                .map_err(|_| "a soak thread panicked".to_string())??,
        );
    }
    println!(
        "{} workers each, every strategy at once, probes at {:.0}/s each for {:.0} s, connection per request\n",
        cli.workers,
        cli.fault_rate,
        secs
    );
    println!("| server | probes | lost | busy killed | injections | fds before → after | RSS KiB before → after | zombies | p99 µs | pass |");
    println!("|---|--:|--:|--:|---|---|---|--:|--:|---|");
    let mut missed = Vec::new();
    for r in &rows {
        let inj: Vec<String> = r
            .injections
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let verdict = r.verdict();
        println!(
            "| {} | {} | {} | {} | {} | {} → {} | {} → {} | {} | {} | {} |",
            r.server,
            r.probes,
            r.lost,
            r.busy_kills,
            inj.join(", "),
            r.fds_before,
            r.fds_after,
            r.rss_before_kib,
            r.rss_after_kib,
            r.zombies,
            r.p99_us,
            if verdict.is_ok() { "yes" } else { "**no**" }
        );
        if let Err(e) = verdict {
            missed.push(e);
        }
    }
    judged(cli, &rows, &missed, "the soak")
}

/// The servers a fault runs against: every prefork strategy; the lock
/// holder's kill only under mutex, once per lock kind, with two listeners
/// (so that the lock is taken).
fn fault_servers(fault: Fault, servers: &[ServerSpec]) -> Vec<(ServerSpec, usize)> {
    let mut out = Vec::new();
    for spec in servers {
        let ServerSpec::Prefork {
            label,
            bin,
            strategy,
            extra,
        } = spec
        else {
            continue;
        };
        if fault != Fault::KillLockHolder {
            out.push((spec.clone(), 1));
            continue;
        }
        if strategy != "mutex" || extra.iter().any(|a| a == "--lock") {
            continue;
        }
        for kind in ["flock", "fcntl", "sysvsem", "pthread"] {
            let mut extra = extra.clone();
            extra.extend(["--lock".to_string(), kind.to_string()]);
            out.push((
                ServerSpec::Prefork {
                    label: format!("{label}-{kind}"),
                    bin: bin.clone(),
                    strategy: strategy.clone(),
                    extra,
                },
                2,
            ));
        }
    }
    out
}

fn fault_runs(cli: &Cli, dir: &std::path::Path) -> Result<(), String> {
    let servers: Vec<ServerSpec> = servers(cli, dir)?
        .into_iter()
        .filter(|s| matches!(s, ServerSpec::Prefork { .. }))
        .collect();
    let faults: Vec<Fault> = cli
        .faults
        .iter()
        .map(|f| {
            Fault::parse(f).ok_or_else(|| {
                format!("unknown fault {f:?} (kill-idle, kill-any, hup, ttin-ttou, kill-all, kill-lock-holder)")
            })
        })
        .collect::<Result<_, _>>()?;
    let duration = Duration::from_secs_f64(if cli.short { 3.0 } else { cli.fault_duration });
    let mut rows = Vec::new();
    for &f in &faults {
        for (n, (spec, listeners)) in fault_servers(f, &servers).into_iter().enumerate() {
            // Recovery is judged by the master's own view of ready workers.
            let status = dir.join(format!("status-{}-{n}.sock", f.name()));
            let spec = spec.with_args(["--status".into(), format!("unix:{}", status.display())]);
            let server = spec
                .start(cli.workers, listeners, dir)
                .map_err(|e| e.to_string())?;
            let r = faults::run_fault(
                &server,
                &spec.label(),
                f,
                cli.workers,
                cli.fault_rate,
                duration,
                Some(&status),
            )
            .map_err(|e| e.to_string())?;
            eprintln!(
                "{} {} {}: {} probes, {} lost, {}",
                r.row,
                r.fault.name(),
                r.server,
                r.probes,
                r.lost,
                match r.verdict() {
                    Ok(()) => "pass".to_string(),
                    Err(e) => format!("MISSED: {e}"),
                }
            );
            rows.push(r);
            drop(server);
        }
    }
    println!(
        "{} workers, probes at {:.0}/s for {:.0} s, connection per request\n",
        cli.workers,
        cli.fault_rate,
        duration.as_secs_f64()
    );
    println!("| row | fault | server | probes | lost | lost by kind | injections | busy killed | max recovery ms | p99 µs | max µs | max gap µs | zombies | pass |");
    println!("|---|---|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|---|");
    let mut missed = Vec::new();
    for r in &rows {
        let kinds: Vec<String> = r
            .lost_by_kind
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let verdict = r.verdict();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.row,
            r.fault.name(),
            r.server,
            r.probes,
            r.lost,
            if kinds.is_empty() {
                "-".into()
            } else {
                kinds.join(", ")
            },
            r.injections,
            r.busy_kills,
            r.max_recovery_ms.map_or("-".into(), |m| format!("{m:.0}")),
            r.p99_us,
            r.max_us,
            r.max_gap_us,
            r.zombies,
            if verdict.is_ok() { "yes" } else { "**no**" }
        );
        if let Err(e) = verdict {
            missed.push(e);
        }
    }
    judged(cli, &rows, &missed, "the fault matrix")
}

/// The end of a judged run (faults, soak): the JSON if asked for, then
/// an error naming every figure missed (exit 1).
fn judged(
    cli: &Cli,
    rows: &impl serde::Serialize,
    missed: &[String],
    what: &str,
) -> Result<(), String> {
    if let Some(p) = &cli.json {
        write_json(p, rows)?;
    }
    if missed.is_empty() {
        Ok(())
    } else {
        Err(format!("missed {what}: {}", missed.join(" | ")))
    }
}
