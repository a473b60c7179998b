//! Black-box tests of the `prefork-load` binary against a small in-test server.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;

fn server(n: usize) -> (String, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let h = std::thread::spawn(move || {
        for k in 0..n {
            let (mut s, _) = l.accept().expect("accept");
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Worker: {}/1\r\nConnection: close\r\n\r\nok",
                k % 2
            );
            let _ = s.write_all(reply.as_bytes());
        }
    });
    (addr, h)
}

#[test]
fn json_report_counts_every_request_and_both_workers() {
    let (addr, h) = server(200);
    let out = Command::new(env!("CARGO_BIN_EXE_prefork-load"))
        .args(["-c", "4", "-n", "200", "--workers", "2", "--json", &addr])
        .output()
        .expect("run prefork-load");
    h.join().expect("server");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(j["requests"], 200);
    assert_eq!(j["errors"]["refused"], 0);
    assert_eq!(j["per_worker"]["0"], 100);
    assert_eq!(j["per_worker"]["1"], 100);
    assert_eq!(j["fairness"], 1.0);
    assert!(j["latency_us"]["p99"].as_u64().is_some_and(|v| v > 0));
}

#[test]
fn human_table_and_silence_when_not_a_terminal() {
    let (addr, h) = server(50);
    let out = Command::new(env!("CARGO_BIN_EXE_prefork-load"))
        .args(["-c", "2", "-n", "50", &addr])
        .output()
        .expect("run");
    h.join().expect("server");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("requests    50 ok"), "{text}");
    assert!(text.contains("latency µs  p50"), "{text}");
    assert!(
        out.stderr.is_empty(),
        "no progress line when stderr is not a terminal"
    );
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    for args in [
        vec!["-c", "0", "127.0.0.1:1"],
        vec!["--rate", "-5", "127.0.0.1:1"],
        vec!["--slow", "nopath", "127.0.0.1:1"],
        vec!["not an address"],
        vec![],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_prefork-load"))
            .args(&args)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.trim_end().lines().count() == 1,
            "{args:?}: {err}"
        );
    }
}

#[test]
fn bench_usage_errors_exit_2_before_running_anything() {
    for args in [
        vec!["--scenarios", "nope"],
        vec!["--faults", "earthquake"],
        vec!["--variant", "no-equals-sign"],
        vec!["--variant", "x=--lock flock"],
        vec!["--repeat", "0"],
        vec!["--mixed-rate", "0"],
        vec!["--mixed-rate", "-5"],
        vec!["--step", "--step-min", "4", "--step-max", "4"],
        vec!["--step", "--step-factor", "0"],
        vec!["--step", "--faults", "hup"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_prefork-bench"))
            .args(&args)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
}
