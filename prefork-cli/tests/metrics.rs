//! `--metrics`: the Prometheus exposition served by the master.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use rstest::rstest;
use rstest_reuse::apply;

/// GET /metrics, the body.
fn scrape(addr: &str) -> String {
    let mut c = TcpStream::connect(addr).expect("connect to the metrics port");
    c.set_read_timeout(Some(T)).expect("timeout");
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
        .expect("send");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read");
    assert!(out.starts_with("HTTP/1.0 200 OK\r\n"), "{out}");
    out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

/// The value of the sample `name` (with its labels, as written).
fn value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn start_with_metrics(strategy: &str, extra: &[&str]) -> (Server, String) {
    let mut args = vec!["--metrics", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let s = start(strategy, &args);
    assert!(s.wait_log("metrics on http://", T), "{}", s.log());
    let addr = s
        .log()
        .lines()
        .find_map(|l| l.split("metrics on http://").nth(1))
        .and_then(|r| r.strip_suffix("/metrics"))
        .expect("the metrics address")
        .to_string();
    (s, addr)
}

/// Every family, with values that follow what the server did: requests
/// served, their durations in the histogram, a crash counted by reason.
#[apply(every_strategy)]
fn the_exposition_follows_the_pool(strategy: &str) {
    let (s, m) = start_with_metrics(strategy, &["--workers", "2"]);
    let text = scrape(&m);
    assert_eq!(value(&text, "prefork_workers_target"), Some(2.0), "{text}");
    assert_eq!(
        value(&text, "prefork_workers{state=\"idle\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(value(&text, "prefork_generation"), Some(1.0));
    for _ in 0..10 {
        assert_eq!(http_get(s.addr(), "/", T).expect("GET").status, 200);
    }
    assert_eq!(http_get(s.addr(), "/sleep/60", T).expect("GET").status, 200);
    let mut text = String::new();
    assert!(
        wait_until(T, || {
            text = scrape(&m);
            value(&text, "prefork_request_duration_seconds_count") == Some(11.0)
        }),
        "{text}"
    );
    assert_eq!(value(&text, "prefork_requests_total"), Some(11.0), "{text}");
    // The 60 ms request is counted above the 50 ms bound (the ten others
    // take microseconds, unless the machine stalls).
    let under_50ms = value(
        &text,
        "prefork_request_duration_seconds_bucket{le=\"0.05\"}",
    )
    .expect("bucket");
    assert!((8.0..=10.0).contains(&under_50ms), "{text}");
    assert_eq!(
        value(
            &text,
            "prefork_request_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        Some(11.0),
        "{text}"
    );
    let sum = value(&text, "prefork_request_duration_seconds_sum").expect("sum");
    assert!(sum >= 0.06, "{text}");
    // A crash, and a scale-down.
    let victim = s.workers()[0];
    kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill");
    assert!(wait_until(T, || value(
        &scrape(&m),
        "prefork_worker_exits_total{reason=\"crash\"}"
    ) == Some(1.0)));
    assert!(s.wait_workers(2, T));
    s.signal(Signal::SIGTTOU);
    assert!(wait_until(T, || value(
        &scrape(&m),
        "prefork_worker_exits_total{reason=\"scale_down\"}"
    ) == Some(1.0)));
    s.signal(Signal::SIGHUP);
    assert!(wait_until(T, || value(&scrape(&m), "prefork_generation") == Some(2.0)));
    let text = scrape(&m);
    assert!(text.contains("prefork_listen_queue{listener=\""), "{text}");
    if strategy == "fdpass" {
        assert!(
            text.contains("prefork_held_connections{state=\"parked\"}"),
            "{text}"
        );
    }
}

/// `promtool check metrics` accepts a live scrape (Prometheus's own
/// linter; scripts/test.sh installs it).
#[test]
fn promtool_accepts_a_live_scrape() {
    let Ok(v) = std::process::Command::new("promtool")
        .arg("--version")
        .output()
    else {
        prefork_testkit::skipped(
            "promtool_accepts_a_live_scrape",
            "promtool is not installed (scripts/test.sh installs the prometheus package)",
        );
        return;
    };
    assert!(v.status.success());
    let (s, m) = start_with_metrics("fdpass", &["--workers", "2"]);
    for _ in 0..5 {
        assert_eq!(http_get(s.addr(), "/", T).expect("GET").status, 200);
    }
    let text = scrape(&m);
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed");
    let out = child.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success(),
        "{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One agent check: the line the master answers.
fn agent_check(addr: &str) -> String {
    let mut c = TcpStream::connect(addr).expect("connect to the agent port");
    c.set_read_timeout(Some(T)).expect("timeout");
    let _ = c.write_all(b"hello\n"); // HAProxy's agent-send, ignored
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read");
    out
}

/// `--agent`: `up N%` follows the idle workers (4 idle of scale 4: 100 %;
/// with requests in two workers: 50 %); WINCH (no worker) answers `maint`; with
/// `--drain 1`, QUIT answers `drain` for a second while the pool still
/// serves, then stops gracefully.
#[apply(every_strategy)]
fn the_agent_reports_idle_capacity_maint_and_drain(strategy: &str) {
    let mut s = start(
        strategy,
        &[
            "--workers",
            "4",
            "--agent",
            "127.0.0.1:0",
            "--agent-scale",
            "4",
            "--drain",
            "1",
        ],
    );
    assert!(s.wait_log("agent checks on ", T), "{}", s.log());
    let agent = s
        .log()
        .lines()
        .find_map(|l| l.split("agent checks on ").nth(1))
        .expect("the agent address")
        .trim()
        .to_string();
    assert!(wait_until(T, || agent_check(&agent) == "up 100%\n"));
    let addr = s.addr().to_string();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let a = addr.clone();
            std::thread::spawn(move || http_get(&a, "/sleep/1500", T))
        })
        .collect();
    // Two busy (reuseport may queue both on one slot's socket: then one)
    // of four: 50 % or 75 %, never 100 % while they sleep.
    assert!(
        wait_until(T, || matches!(
            agent_check(&agent).as_str(),
            "up 50%\n" | "up 75%\n"
        )),
        "busy workers lower the weight"
    );
    for t in slow {
        assert_eq!(t.join().expect("client").expect("answered").status, 200);
    }
    s.signal(Signal::SIGWINCH);
    assert!(wait_until(T, || agent_check(&agent) == "maint\n"));
    s.signal(Signal::SIGHUP); // the workers come back
    assert!(wait_until(T, || agent_check(&agent) == "up 100%\n"));
    let t0 = std::time::Instant::now();
    s.signal(Signal::SIGQUIT);
    assert!(wait_until(T, || agent_check(&agent) == "drain\n"));
    // Still serving while draining.
    assert_eq!(
        http_get(s.addr(), "/", T)
            .expect("served while draining")
            .status,
        200
    );
    assert_eq!(
        s.wait_exit(T).and_then(|st| st.code()),
        Some(0),
        "{}",
        s.log()
    );
    assert!(
        t0.elapsed() >= std::time::Duration::from_secs(1),
        "drained a second first"
    );
}
