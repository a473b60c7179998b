//! A fleet behind HAProxy: three network namespaces as three hosts, each
//! running a prefork server with `--agent`, and HAProxy in front with agent
//! checks, under load. Traffic stays on this machine: the clients talk to
//! HAProxy on loopback, HAProxy to the hosts over veth pairs the test
//! makes and removes. Needs root (namespaces) and haproxy (scripts/test.sh
//! installs it); otherwise each test says SKIPPED.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use prefork_testkit::process_alive;

const AGENT_INTER_MS: u64 = 200;

fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(st.success(), "{args:?}: {st}");
}

/// A host: a namespace, its address, its prefork (started by `ip netns
/// exec`, which execs it: the pid is the master's), and its pid file.
struct Host {
    name: String,
    ns: String,
    ip: String,
    server: Option<Server>,
    pid_file: PathBuf,
}

struct Fleet {
    hosts: Vec<Host>,
    veths: Vec<String>,
    haproxy: Option<Child>,
    front: String,
    _dir: tempfile::TempDir,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Some(h) = &mut self.haproxy {
            let _ = h.kill();
            let _ = h.wait();
        }
        for h in &mut self.hosts {
            // Every master of the host (a USR2 may have made more).
            drop(Masters(h.pid_file.to_string_lossy().into_owned()));
            drop(h.server.take());
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).status();
        }
        // (Deleting a namespace deletes its veth pair; this is for a setup
        // that stopped half-way.)
        for v in &self.veths {
            let _ = Command::new("ip")
                .args(["link", "del", v])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// None (after saying SKIPPED) when the machine cannot build a fleet.
fn can_build(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        prefork_testkit::skipped(test, "network namespaces need root");
        return false;
    }
    if Command::new("haproxy").arg("-v").output().is_err() {
        prefork_testkit::skipped(
            test,
            "haproxy is not installed (scripts/test.sh installs it)",
        );
        return false;
    }
    true
}

impl Fleet {
    /// Hosts `a`, `b`, `c` on 10.`net`.N.2 with the given workers each,
    /// extra prefork flags, and HAProxy in front.
    fn build(net: u8, workers: [usize; 3], extra: &[&str]) -> Fleet {
        let dir = tempfile::tempdir().expect("tempdir");
        let tag = format!("{}{net}", std::process::id() % 10_000);
        let mut fleet = Fleet {
            hosts: Vec::new(),
            veths: Vec::new(),
            haproxy: None,
            front: String::new(),
            _dir: tempfile::tempdir().expect("tempdir"),
        };
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            let ns = format!("pf{tag}{name}");
            let (outer, inner) = (format!("pv{tag}{name}"), format!("pi{tag}{name}"));
            let ip = format!("10.{net}.{}.2", i + 1);
            sh(&["ip", "netns", "add", &ns]);
            fleet.hosts.push(Host {
                name: name.into(),
                ns: ns.clone(),
                ip: ip.clone(),
                server: None,
                pid_file: dir.path().join(format!("{name}.pid")),
            });
            sh(&[
                "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            fleet.veths.push(outer.clone());
            sh(&["ip", "link", "set", &inner, "netns", &ns]);
            sh(&[
                "ip",
                "addr",
                "add",
                &format!("10.{net}.{}.1/24", i + 1),
                "dev",
                &outer,
            ]);
            sh(&["ip", "link", "set", &outer, "up"]);
            sh(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                &inner,
            ]);
            sh(&[
                "ip", "netns", "exec", &ns, "ip", "link", "set", &inner, "up",
            ]);
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        }
        for (h, n) in fleet.hosts.iter_mut().zip(workers) {
            let bind = format!("{}:8080", h.ip);
            let agent = format!("{}:9999", h.ip);
            let pid_file = h.pid_file.to_string_lossy().into_owned();
            let w = n.to_string();
            let mut args = vec![
                "netns",
                "exec",
                &h.ns,
                env!("CARGO_BIN_EXE_prefork"),
                "--bind",
                &bind,
                "--agent",
                &agent,
                "--workers",
                &w,
                "--pid-file",
                &pid_file,
                "--log-level",
                "info",
            ];
            args.extend_from_slice(extra);
            h.server = Some(
                prefork_testkit::ServerBuilder::new("ip")
                    .args(args.iter().copied())
                    .start()
                    .expect("a host's prefork starts"),
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        fleet.front = format!("127.0.0.1:{port}");
        let mut cfg = format!(
            "global\n  maxconn 4000\n\
defaults\n  mode http\n  timeout connect 300ms\n  timeout client 10s\n  timeout server 10s\n  \
retries 3\n  option redispatch 1\n  retry-on conn-failure empty-response\n  option http-server-close\n\
frontend fe\n  bind {}\n  default_backend be\n\
backend be\n  balance roundrobin\n  http-response set-header X-Server %[srv_name]\n",
            fleet.front
        );
        for h in &fleet.hosts {
            cfg.push_str(&format!(
                "  server {} {}:8080 weight 256 check inter 200ms fall 2 rise 2 agent-check agent-port 9999 agent-inter {AGENT_INTER_MS}ms\n",
                h.name, h.ip
            ));
        }
        let cfg_path = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg_path, cfg).expect("haproxy.cfg");
        fleet.haproxy = Some(
            Command::new("haproxy")
                .args(["-db", "-f"])
                .arg(&cfg_path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("haproxy"),
        );
        fleet._dir = dir;
        // Every host served through the front.
        let mut seen = std::collections::HashSet::new();
        assert!(
            wait_until(T, || {
                if let Ok(r) = http_get(&fleet.front, "/", Duration::from_secs(2)) {
                    if let Some(s) = r.header("x-server") {
                        seen.insert(s.to_string());
                    }
                }
                seen.len() == 3
            }),
            "the front reaches every host: {seen:?}"
        );
        fleet
    }

    fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).expect("host")
    }

    fn master(&self, name: &str) -> i32 {
        self.host(name).server.as_ref().expect("server").pid()
    }
}

/// When a request was sent, and which host answered it (or the failure).
type Answer = (Instant, Result<String, String>);

/// Open-loop-ish load through the front: `clients` threads, each a new
/// connection per request every `every`, recording (when, answered by).
struct Load {
    done: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Answer>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(front: &str, path: &str, clients: usize, every: Duration) -> Load {
        let done = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (done, seen) = (Arc::clone(&done), Arc::clone(&seen));
                let (front, path) = (front.to_string(), path.to_string());
                std::thread::spawn(move || {
                    let mut next = Instant::now();
                    while !done.load(Ordering::Relaxed) {
                        let at = Instant::now();
                        let r = match http_get(&front, &path, Duration::from_secs(5)) {
                            Ok(r) if r.status == 200 => {
                                Ok(r.header("x-server").unwrap_or("?").to_string())
                            }
                            Ok(r) => Err(format!("status {}", r.status)),
                            Err(e) => Err(e.to_string()),
                        };
                        if let Ok(mut v) = seen.lock() {
                            v.push((at, r));
                        }
                        next += every;
                        if let Some(d) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(d);
                        }
                    }
                })
            })
            .collect();
        Load {
            done,
            seen,
            threads,
        }
    }

    fn stop(self) -> Vec<Answer> {
        self.done.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

fn failures(seen: &[Answer]) -> Vec<String> {
    seen.iter().filter_map(|(_, r)| r.clone().err()).collect()
}

/// A rolling binary upgrade of every host, one after another (USR2, then
/// QUIT of the old master): not one request fails.
#[test]
fn fleet_rolling_upgrade_loses_nothing() {
    if !can_build("fleet_rolling_upgrade_loses_nothing") {
        return;
    }
    let fleet = Fleet::build(71, [2, 2, 2], &[]);
    let load = Load::start(&fleet.front, "/", 8, Duration::from_millis(20));
    for name in ["a", "b", "c"] {
        let old = fleet.master(name);
        let pid_file = fleet.host(name).pid_file.clone();
        kill(Pid::from_raw(old), Signal::SIGUSR2).expect("USR2");
        let mut new = 0;
        assert!(wait_until(T, || {
            new = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(0);
            new != old && process_alive(new) && prefork_testkit::children_of(new).len() >= 2
        }));
        kill(Pid::from_raw(old), Signal::SIGQUIT).expect("QUIT the old master");
        assert!(wait_until(T, || !process_alive(old)));
        // The fleet serves on a while before the next host (100 answers).
        let n = load.seen.lock().map(|v| v.len()).unwrap_or(0);
        assert!(wait_until(T, || load
            .seen
            .lock()
            .map(|v| v.len())
            .unwrap_or(0)
            >= n + 100));
    }
    let seen = load.stop();
    eprintln!(
        "rolling upgrade: {} requests, {} failed",
        seen.len(),
        failures(&seen).len()
    );
    assert!(seen.len() > 300, "{}", seen.len());
    assert_eq!(failures(&seen), Vec::<String>::new());
}

/// Draining one host (`--drain 2`, then QUIT): its share of new requests
/// falls to 0 within two agent intervals, nothing fails, then it stops.
#[test]
fn fleet_drain_moves_traffic_away_and_loses_nothing() {
    if !can_build("fleet_drain_moves_traffic_away_and_loses_nothing") {
        return;
    }
    let fleet = Fleet::build(72, [2, 2, 2], &["--drain", "2"]);
    let load = Load::start(&fleet.front, "/", 8, Duration::from_millis(20));
    let a = fleet.master("a");
    // Traffic on every host first (an event: a answered at least once more).
    let answered_by = |seen: &Arc<Mutex<Vec<Answer>>>, h: &str| {
        seen.lock()
            .map(|v| v.iter().filter(|(_, r)| r.as_deref() == Ok(h)).count())
            .unwrap_or(0)
    };
    assert!(wait_until(T, || answered_by(&load.seen, "a") >= 20));
    let quit = Instant::now();
    kill(Pid::from_raw(a), Signal::SIGQUIT).expect("QUIT a");
    assert!(
        wait_until(T, || !process_alive(a)),
        "a stops after its drain"
    );
    let seen = load.stop();
    let after_two_intervals = quit + Duration::from_millis(2 * AGENT_INTER_MS + 100);
    let to_a_late = seen
        .iter()
        .filter(|(t, r)| *t > after_two_intervals && r.as_deref() == Ok("a"))
        .count();
    let per_host = shares(&seen);
    eprintln!("drain: {per_host:?}, {to_a_late} to a after two agent intervals");
    assert_eq!(to_a_late, 0, "{per_host:?}");
    assert_eq!(failures(&seen), Vec::<String>::new());
}

/// A plain QUIT of one host, no `--drain`: its listener drops new SYNs and
/// its workers empty the accept queue, so HAProxy's connect times out and
/// it retries another host: nothing fails.
#[test]
fn fleet_stop_without_drain_loses_nothing() {
    if !can_build("fleet_stop_without_drain_loses_nothing") {
        return;
    }
    let fleet = Fleet::build(73, [2, 2, 2], &[]);
    let load = Load::start(&fleet.front, "/", 8, Duration::from_millis(20));
    let count = |load: &Load, h: Option<&str>| {
        load.seen
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|(_, r)| h.is_none_or(|h| r.as_deref() == Ok(h)))
                    .count()
            })
            .unwrap_or(0)
    };
    assert!(
        wait_until(T, || count(&load, Some("b")) >= 20),
        "b serves first"
    );
    let b = fleet.master("b");
    kill(Pid::from_raw(b), Signal::SIGQUIT).expect("QUIT b");
    assert!(wait_until(T, || !process_alive(b)));
    let n = count(&load, None);
    assert!(
        wait_until(T, || count(&load, None) >= n + 150),
        "the fleet serves on"
    );
    let seen = load.stop();
    eprintln!(
        "stop without drain: {:?}, {} failed",
        shares(&seen),
        failures(&seen).len()
    );
    assert!(seen.len() > 100);
    assert_eq!(failures(&seen), Vec::<String>::new());
}

/// One host with 1 worker, two with 4, under a load of 20 ms requests that
/// keeps workers busy: the agents' weights (idle capacity) give the small
/// host the smaller share.
#[test]
fn fleet_weights_follow_capacity() {
    if !can_build("fleet_weights_follow_capacity") {
        return;
    }
    let fleet = Fleet::build(74, [1, 4, 4], &["--agent-scale", "4"]);
    let load = Load::start(&fleet.front, "/sleep/20", 6, Duration::from_millis(5));
    std::thread::sleep(Duration::from_secs(4)); // the measurement window
    let seen = load.stop();
    let per_host = shares(&seen);
    let total: usize = per_host.values().sum();
    let share = |h: &str| per_host.get(h).copied().unwrap_or(0) as f64 / total.max(1) as f64;
    eprintln!(
        "weights: a (1 worker) {:.2}, b (4) {:.2}, c (4) {:.2} of {total}",
        share("a"),
        share("b"),
        share("c")
    );
    assert_eq!(failures(&seen), Vec::<String>::new());
    assert!(
        share("a") < share("b") && share("a") < share("c"),
        "{per_host:?}"
    );
    assert!(share("a") < 0.25, "{per_host:?}");
}

fn shares(seen: &[Answer]) -> BTreeMap<String, usize> {
    seen.iter()
        .filter_map(|(_, r)| r.clone().ok())
        .fold(BTreeMap::new(), |mut m, h| {
            *m.entry(h).or_default() += 1;
            m
        })
}
