//! `prefork status unix:/path`: the workers of a running server, as a table.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

fn fail(msg: String) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(1)
}

/// Connects, reads the document, prints it.
pub fn run(socket: &str, json: bool) -> ExitCode {
    let Some(path) = socket.strip_prefix("unix:") else {
        eprintln!("error: {socket:?}: expected unix:/path/to/status.sock");
        return ExitCode::from(2);
    };
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot connect to {socket}: {e}")),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut text = String::new();
    if let Err(e) = stream.read_to_string(&mut text) {
        return fail(format!("reading {socket}: {e}"));
    }
    if json {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    let doc: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(_) if text.is_empty() => {
            return fail(format!(
                "{socket} closed without answering (not the same uid?)"
            ))
        }
        Err(e) => return fail(format!("{socket} answered something that is not JSON: {e}")),
    };
    print!("{}", table(&doc));
    ExitCode::SUCCESS
}

fn secs(v: &Value) -> String {
    let s = v.as_f64().unwrap_or(0.0);
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

fn mib(v: &Value) -> String {
    v.as_u64()
        .map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

/// The document as a table a person reads.
pub fn table(doc: &Value) -> String {
    let m = &doc["master"];
    let t = &doc["totals"];
    let mm = &m["memory"];
    let mut out = format!(
        "master pid {}  strategy {}  generation {}  up {}  rss {}  pss {}  private {}\n\n",
        m["pid"],
        m["strategy"].as_str().unwrap_or("?"),
        m["generation"],
        secs(&m["uptime_s"]),
        mib(&m["rss_kib"]),
        mib(&mm["pss_kib"]),
        mib(&mm["private_kib"])
    );
    out.push_str(&format!(
        "{:>4}  {:>8}  {:>3}  {:<8}  {:>8}  {:>9}  {:>10}  {:>10}  {:>10}\n",
        "slot", "pid", "gen", "state", "for", "requests", "rss", "pss", "private"
    ));
    for w in doc["workers"].as_array().into_iter().flatten() {
        let wm = &w["memory"];
        out.push_str(&format!(
            "{:>4}  {:>8}  {:>3}  {:<8}  {:>8}  {:>9}  {:>10}  {:>10}  {:>10}\n",
            w["slot"].to_string(),
            w["pid"].to_string(),
            w["generation"].to_string(),
            w["state"].as_str().unwrap_or("?"),
            secs(&w["for_s"]),
            w["requests"].to_string(),
            mib(&w["rss_kib"]),
            mib(&wm["pss_kib"]),
            mib(&wm["private_kib"])
        ));
    }
    out.push_str(&format!(
        "\nworkers {} of {}: {} busy, {} idle, {} keepalive, {} booting, {} stopping; {} requests served\n",
        t["workers"],
        t["target"],
        t["busy"],
        t["idle"],
        t["keepalive"].as_u64().unwrap_or(0),
        t["booting"],
        t["stopping"],
        t["requests"]
    ));
    let held = &doc["held"];
    if let Some(total) = held["total"].as_u64() {
        out.push_str(&format!(
            "held by the master: {total} ({} reading a request, {} queued for a worker, {} parked between requests)\n",
            held["reading"], held["queued"], held["parked"]
        ));
    }
    let sc = &doc["scale"];
    if let (Some(min), Some(max)) = (sc["min"].as_u64(), sc["max"].as_u64()) {
        out.push_str(&format!(
            "pool sizes itself: {min} to {max} workers, {} spare, window {}s, stall {}s\n",
            sc["spare"], sc["window_s"], sc["stall_s"]
        ));
    }
    for l in doc["listeners"].as_array().into_iter().flatten() {
        match (l["accept_queue"].as_u64(), l["backlog"].as_u64()) {
            (Some(q), Some(b)) => out.push_str(&format!(
                "listener {}: accept queue {q} of {b}\n",
                l["addr"].as_str().unwrap_or("?")
            )),
            _ => out.push_str(&format!("listener {}\n", l["addr"].as_str().unwrap_or("?"))),
        }
    }
    out
}
