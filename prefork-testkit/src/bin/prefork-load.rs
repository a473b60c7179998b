//! `prefork-load`: a load generator for preforking servers.
//!
//!     prefork-load -c 8 -d 10 127.0.0.1:8080
//!     prefork-load --rate 2000 -n 20000 --slow /sleep/50:1 unix:/run/app.sock
//!     prefork-load --protocol line -c 4 -n 1000 --json 127.0.0.1:9000

#![forbid(unsafe_code)]
// Doc comments here are clap's --help text, not rustdoc: `[IPV6]:PORT` is
// an address form, not a link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use prefork_testkit::load::{self, LoadConfig, Progress, Protocol, Target};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Proto {
    /// GET a path; 2xx is success; X-Worker names the worker.
    Http,
    /// Send nothing, read until the server closes (the `hello` app); `worker=N` names the worker.
    Line,
}

/// Load generator: a new connection per request (or keep-alive), closed
/// loop with -c connections or open loop at --rate with latency counted
/// from each request's due time.
#[derive(Debug, Parser)]
#[command(name = "prefork-load", version, about, allow_negative_numbers = true)]
struct Cli {
    /// HOST:PORT, [V6]:PORT or unix:/path; several spread connections in turn.
    #[arg(required = true, value_parser = Target::parse)]
    targets: Vec<Target>,
    /// Concurrent connections (the most in flight in open loop).
    #[arg(short = 'c', long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    connections: u32,
    /// Open loop: requests per second, spread evenly.
    #[arg(long, value_parser = positive)]
    rate: Option<f64>,
    /// Seconds to issue requests (default 10 unless --requests is given).
    #[arg(short, long, value_parser = positive)]
    duration: Option<f64>,
    /// Requests to issue at most.
    #[arg(short = 'n', long, value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,
    /// Generator threads.
    #[arg(short, long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: u32,
    /// Protocol.
    #[arg(long, value_enum, default_value_t = Proto::Http)]
    protocol: Proto,
    /// Path to GET.
    #[arg(long, default_value = "/")]
    path: String,
    /// A slow path and the percentage of requests that use it: /sleep/50:1
    #[arg(long, value_name = "PATH:PERCENT", value_parser = parse_slow)]
    slow: Option<(String, f64)>,
    /// Keep connections alive (http).
    #[arg(long)]
    keepalive: bool,
    /// Idle kept-alive clients: each of the -c connections sends a request,
    /// waits SECS after the response, and sends the next on the same
    /// connection (http, one TCP target). Reports requests, errors and
    /// latency from each request's due time.
    #[arg(long, value_name = "SECS", value_parser = positive, conflicts_with_all = ["rate", "requests", "slow"])]
    think: Option<f64>,
    /// Slow clients alongside the load: N connections that each send a
    /// request line, then a header line a second, and never finish (they
    /// connect again when the server cuts them). One TCP target.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    slow_clients: Option<u32>,
    /// Seconds before an unanswered request counts as a timeout.
    #[arg(long, default_value = "5", value_parser = positive)]
    timeout: f64,
    /// Number of server workers, for the fairness figures (workers that
    /// served nothing count too).
    #[arg(long)]
    workers: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} must be a positive number")),
    }
}

fn parse_slow(s: &str) -> Result<(String, f64), String> {
    let (path, pct) = s
        .rsplit_once(':')
        .ok_or("expected PATH:PERCENT, e.g. /sleep/50:1")?;
    let pct: f64 = pct
        .parse()
        .map_err(|_| format!("{pct:?} is not a percentage"))?;
    if !(0.0..=100.0).contains(&pct) || !path.starts_with('/') {
        return Err("expected PATH:PERCENT with a path starting with / and 0 to 100".into());
    }
    Ok((path.to_string(), pct / 100.0))
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let line = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("For more") && !l.starts_with("Usage:"))
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("error: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let duration = match (cli.duration, cli.requests) {
        (None, None) => Some(Duration::from_secs(10)),
        (d, _) => d.map(Duration::from_secs_f64),
    };
    let tcp_target = match cli.targets.as_slice() {
        [Target::Tcp(a)] => Some(*a),
        _ => None,
    };
    if (cli.think.is_some() || cli.slow_clients.is_some()) && tcp_target.is_none() {
        eprintln!("error: --think and --slow-clients take one TCP target (HOST:PORT)");
        return ExitCode::from(2);
    }
    let slow = match (cli.slow_clients, tcp_target) {
        (Some(n), Some(addr)) => Some(prefork_testkit::slow::SlowClients::start(
            addr,
            n as usize,
            Duration::from_secs(1),
        )),
        _ => None,
    };
    if let (Some(think), Some(target)) = (cli.think, tcp_target) {
        return idle(
            &cli,
            target,
            think,
            duration.unwrap_or(Duration::from_secs(10)),
            slow,
        );
    }
    let cfg = LoadConfig {
        targets: cli.targets.clone(),
        protocol: match cli.protocol {
            Proto::Http => Protocol::Http,
            Proto::Line => Protocol::Line,
        },
        path: cli.path.clone(),
        slow: cli.slow.clone(),
        concurrency: cli.connections as usize,
        rate: cli.rate,
        duration,
        requests: cli.requests,
        threads: cli.threads as usize,
        keepalive: cli.keepalive,
        timeout: Duration::from_secs_f64(cli.timeout),
        record_outcomes: false,
    };
    let progress = Arc::new(Progress::default());
    let live = std::io::stderr().is_terminal();
    let runner = {
        let (cfg, progress) = (cfg.clone(), Arc::clone(&progress));
        std::thread::spawn(move || load::run(&cfg, &progress))
    };
    if live {
        let t0 = std::time::Instant::now();
        let mut last = 0;
        while !runner.is_finished() {
            std::thread::sleep(Duration::from_millis(250));
            let ok = progress.ok.load(std::sync::atomic::Ordering::Relaxed);
            let bad = progress.failed.load(std::sync::atomic::Ordering::Relaxed);
            let secs = t0.elapsed().as_secs_f64();
            if (secs * 4.0) as u64 != last {
                last = (secs * 4.0) as u64;
                eprint!(
                    "\r  {secs:5.1}s  {:>10} ok  {:>6} errors  {:>8.0} req/s ",
                    thousands(ok),
                    bad,
                    ok as f64 / secs.max(1e-3)
                );
            }
        }
        eprint!("\r{}\r", " ".repeat(64));
    }
    let joined = runner.join();
    // The slow clients ran for as long as the load did.
    if let Some(r) = slow.map(prefork_testkit::slow::SlowClients::stop) {
        eprintln!(
            "slow clients: {} connections made, {} cut by the server, {} header lines sent",
            r.connects, r.cut, r.lines
        );
    }
    let report = match joined {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
        Err(_) => {
            eprintln!("error: the load generator panicked");
            return ExitCode::from(1);
        }
    };
    let s = report.summary(cli.workers);
    if cli.json {
        match serde_json::to_string_pretty(&s) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        }
        return ExitCode::SUCCESS;
    }
    let targets: Vec<String> = cfg.targets.iter().map(ToString::to_string).collect();
    let mode = match cfg.rate {
        Some(r) => format!("open loop at {r} req/s"),
        None => "closed loop".into(),
    };
    println!(
        "target      {} ({}, {}, {mode}, {} connections, {} threads)",
        targets.join(" "),
        match cfg.protocol {
            Protocol::Http => format!("http GET {}", cfg.path),
            Protocol::Line => "line".into(),
        },
        if cfg.keepalive {
            "keep-alive"
        } else {
            "connection per request"
        },
        cfg.concurrency,
        cfg.threads
    );
    println!(
        "requests    {} ok in {:.2}s = {:.0} req/s ({} connections)",
        thousands(s.requests),
        s.elapsed_s,
        s.rps,
        thousands(s.connections)
    );
    println!(
        "errors      {} (refused {}, reset {}, timeout {}, bad response {}, other {})",
        s.errors.total(),
        s.errors.refused,
        s.errors.reset,
        s.errors.timeout,
        s.errors.bad_response,
        s.errors.other
    );
    let l = &s.latency_us;
    println!(
        "latency µs  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        thousands(l.p50),
        thousands(l.p90),
        thousands(l.p99),
        thousands(l.p999),
        thousands(l.max)
    );
    if cfg.slow.is_some() {
        let f = &s.fast_latency_us;
        println!(
            "fast µs     p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (requests not on the slow path)",
            thousands(f.p50),
            thousands(f.p90),
            thousands(f.p99),
            thousands(f.p999),
            thousands(f.max)
        );
    }
    if !s.per_worker.is_empty() {
        let total: u64 = s.per_worker.values().sum();
        let shares: Vec<String> = s
            .per_worker
            .iter()
            .map(|(w, n)| format!("{w}:{:.1}%", 100.0 * *n as f64 / total as f64))
            .collect();
        println!(
            "workers     {}  Jain {:.3}  busiest {:.1}%  least {:.1}%",
            shares.join(" "),
            s.fairness,
            100.0 * s.max_share,
            100.0 * s.min_share
        );
    }
    ExitCode::SUCCESS
}

/// `--think`: idle kept-alive clients, with slow clients beside if asked.
fn idle(
    cli: &Cli,
    target: std::net::SocketAddr,
    think: f64,
    duration: Duration,
    slow: Option<prefork_testkit::slow::SlowClients>,
) -> ExitCode {
    let cfg = prefork_testkit::idle::IdleConfig {
        target,
        connections: cli.connections as usize,
        think: Duration::from_secs_f64(think),
        duration,
        timeout: Duration::from_secs_f64(cli.timeout),
    };
    let report = prefork_testkit::idle::run(&cfg);
    if let Some(s) = slow {
        let r = s.stop();
        eprintln!(
            "slow clients: {} connections made, {} cut by the server, {} header lines sent",
            r.connects, r.cut, r.lines
        );
    }
    let r = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if cli.json {
        return match serde_json::to_string_pretty(&r) {
            Ok(j) => {
                println!("{j}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        };
    }
    let l = &r.latency_us;
    println!(
        "{target}: {} kept-alive connections, a request each per {think} s, {:.1} s",
        cli.connections, r.elapsed_s
    );
    println!(
        "  {} ok, {} errors, {} connections made, {} closed by the server while idle; {:.0} req/s",
        thousands(r.ok),
        r.errors,
        r.connects,
        r.closed_idle,
        r.ok as f64 / r.elapsed_s.max(1e-9)
    );
    println!(
        "  latency from due time, µs: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        l.p50, l.p90, l.p99, l.p999, l.max
    );
    ExitCode::SUCCESS
}
