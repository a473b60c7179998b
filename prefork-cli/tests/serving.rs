//! Serving scenarios, run for every strategy.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use rstest::rstest;
use rstest_reuse::apply;

#[apply(every_strategy)]
fn http_app_answers_with_worker_header_sleep_and_errors(strategy: &str) {
    let s = start(
        strategy,
        &["--workers", "2", "--app", "http", "--header-timeout", "1"],
    );
    let r = http_get(s.addr(), "/", T).expect("GET");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"Hello from prefork\n");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(s.workers().contains(&r.worker_pid().expect("pid")));

    let t0 = Instant::now();
    let r = http_get(s.addr(), "/sleep/200", T).expect("sleep");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"slept 200ms\n"[..]));
    assert!(t0.elapsed() >= Duration::from_millis(200));

    let raw = |req: &[u8]| {
        let out = prefork_testkit::client::exchange(s.addr(), req, T).expect("exchange");
        prefork_testkit::client::parse_reply(&out)
            .expect("reply")
            .status
    };
    assert_eq!(raw(b"NOT HTTP AT ALL\r\n\r\n"), 400);
    assert_eq!(raw(b"GET /sleep/xyz HTTP/1.1\r\n\r\n"), 400);
    let mut big = b"GET / HTTP/1.1\r\n".to_vec();
    big.extend(
        std::iter::repeat_n(
            b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            200,
        )
        .flatten(),
    );
    assert_eq!(raw(&big), 431);
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..40 {
        many.extend(format!("X-{i}: 1\r\n").bytes());
    }
    many.extend(b"\r\n");
    assert_eq!(raw(&many), 431);
    // A silent client is cut at the header deadline with 408.
    let t0 = Instant::now();
    assert_eq!(raw(b"GET / HTTP/1.1\r\n"), 408);
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[apply(every_strategy)]
fn keep_alive_when_asked_and_bounded(strategy: &str) {
    let s = start(strategy, &["--workers", "1", "--keepalive-requests", "3"]);
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(T)).expect("timeout");
    // Three pipelined requests on one connection: the third is answered
    // with Connection: close and the server closes.
    let req = b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n";
    for _ in 0..3 {
        c.write_all(req).expect("write");
    }
    let mut all = Vec::new();
    c.read_to_end(&mut all).expect("read until close");
    let text = String::from_utf8_lossy(&all);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 3, "{text}");
    assert_eq!(text.matches("Connection: keep-alive").count(), 2, "{text}");
    assert_eq!(text.matches("Connection: close").count(), 1, "{text}");
}

#[apply(every_strategy)]
fn hello_and_echo_apps(strategy: &str) {
    let s = start(strategy, &["--workers", "1", "--app", "hello"]);
    let line = read_line_from(s.addr(), T).expect("hello");
    let pid = s.workers()[0];
    assert_eq!(line, format!("hello from worker=0 pid={pid}\n"));
    drop(s);

    let s = start(strategy, &["--workers", "1", "--app", "echo"]);
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(T)).expect("timeout");
    c.write_all(b"ping 1\n").expect("write");
    let mut buf = [0u8; 7];
    c.read_exact(&mut buf).expect("echo");
    assert_eq!(&buf, b"ping 1\n");
    c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("eof");
    assert!(rest.is_empty());
}

/// The http app defers accept (TCP_DEFER_ACCEPT, 1 s by default): a client
/// that connects and sends nothing does not hold the only worker, so a
/// request right behind it is answered at once, and the silent client is
/// still accepted later (and cut with 408 at the header deadline). With
/// `--defer-accept 0` the worker takes the silent connection first and the
/// request waits for that deadline.
#[apply(every_strategy)]
fn a_client_that_sends_nothing_holds_no_worker(strategy: &str) {
    // Returns how long the GET took, and whether it was answered before the
    // silent client was.
    let silent_then_get = |extra: &[&str]| {
        let mut args = vec!["--workers", "1", "--header-timeout", "2"];
        args.extend_from_slice(extra);
        let s = start(strategy, &args);
        let mut silent = TcpStream::connect(s.addr()).expect("connect");
        silent.set_read_timeout(Some(T)).expect("timeout");
        let reader = std::thread::spawn(move || {
            let mut reply = Vec::new();
            silent
                .read_to_end(&mut reply)
                .expect("the silent client's answer");
            (Instant::now(), String::from_utf8_lossy(&reply).into_owned())
        });
        let t0 = Instant::now();
        let r = http_get(s.addr(), "/", T).expect("GET behind the silent client");
        let answered = Instant::now();
        assert_eq!(r.status, 200);
        let (silent_answered, head) = reader.join().expect("reader");
        assert!(
            head.starts_with("HTTP/1.1 408"),
            "silent client got {head:?}"
        );
        (answered - t0, answered < silent_answered)
    };
    let (_, first) = silent_then_get(&[]);
    assert!(
        first,
        "with the default, the request should be answered before the silent client \
         is even accepted"
    );
    let (waited, first) = silent_then_get(&["--defer-accept", "0"]);
    if strategy == "fdpass" {
        // The front: the master holds the silent client, never a worker,
        // so even without deferring the request is answered at once.
        assert!(
            first && waited < Duration::from_millis(1000),
            "the fdpass master should hold the silent client, but the request took {waited:?}"
        );
    } else {
        assert!(
            waited >= Duration::from_millis(1500),
            "without deferring, the worker should hold the silent client to the 2 s header \
             deadline first, but the request took only {waited:?}"
        );
    }
}

#[rstest]
#[case::blocking("blocking")]
#[case::mutex("mutex")]
#[case::fdpass("fdpass")]
fn several_listeners_tcp_and_unix_are_all_served(#[case] strategy: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("p.sock");
    let unix = format!("unix:{}", sock.display());
    let s = start(
        strategy,
        &[
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            "--bind",
            &unix,
            "--unix-mode",
            "600",
        ],
    );
    assert_eq!(s.addrs().len(), 3, "{}", s.ready_line());
    assert_eq!(s.addrs()[2], unix);
    for a in s.addrs() {
        for _ in 0..20 {
            assert_eq!(http_get(a, "/", T).expect("GET").status, 200, "on {a}");
        }
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock)
        .expect("socket file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let mut s = s;
    assert_eq!(s.stop(T).and_then(|st| st.code()), Some(0));
    assert!(!sock.exists(), "the socket file is removed on exit");
}

#[apply(every_strategy)]
fn two_thousand_connections_to_four_workers_all_answered_by_every_worker(strategy: &str) {
    let s = start(strategy, &["--workers", "4"]);
    let (answers, errors) = burst(s.addr(), 8, 250);
    let mut per_slot: BTreeMap<usize, u32> = BTreeMap::new();
    for (slot, _) in answers {
        *per_slot.entry(slot).or_insert(0) += 1;
    }
    assert_eq!(errors, 0);
    assert_eq!(per_slot.values().sum::<u32>(), 2000);
    assert_eq!(
        per_slot.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2, 3],
        "{per_slot:?}"
    );
}

#[apply(every_strategy)]
fn ipv6_loopback_is_served_when_available(strategy: &str) {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        prefork_testkit::skipped(
            "ipv6_loopback_is_served_when_available",
            "no IPv6 loopback on this machine",
        );
        return;
    }
    let s = prefork()
        .args(strategy_args(strategy))
        .args(["--bind", "[::1]:0", "--workers", "1"])
        .start()
        .expect("start");
    assert!(s.addr().starts_with("[::1]:"), "{}", s.ready_line());
    assert_eq!(http_get(s.addr(), "/", T).expect("GET").status, 200);
}

/// Runs prefork through a python shim that binds a socket, puts it on
/// descriptor `fd`, sets `env` (LISTEN_PID becomes the exec'd pid) and execs.
fn exec_with_socket(fd: i32, activation: bool, args: &[&str]) -> Server {
    let shim = format!(
        r#"
import os, socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(64)
os.dup2(s.fileno(), {fd})
os.set_inheritable({fd}, True)
if {activation}:
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="web")
os.execv(sys.argv[1], sys.argv[1:])
"#,
        activation = if activation { "True" } else { "False" }
    );
    ServerBuilder::new("python3")
        .args(["-c", &shim, env!("CARGO_BIN_EXE_prefork")])
        .args(args.iter().copied())
        .start()
        .expect("prefork starts with an inherited socket")
}

#[rstest]
#[case::blocking("blocking")]
#[case::mutex("mutex")]
#[case::fdpass("fdpass")]
fn systemd_socket_activation_is_adopted_and_no_default_bind_added(#[case] strategy: &str) {
    let mut args = strategy_args(strategy);
    args.extend(["--workers".into(), "2".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = exec_with_socket(3, true, &args);
    assert_eq!(s.addrs().len(), 1, "{}", s.ready_line());
    assert!(s.addr().starts_with("127.0.0.1:") && !s.addr().ends_with(":8080"));
    assert_eq!(http_get(s.addr(), "/", T).expect("GET").status, 200);
}

#[rstest]
#[case::blocking("blocking")]
#[case::mutex("mutex")]
#[case::fdpass("fdpass")]
fn an_inherited_fd_is_served_with_fd_bind(#[case] strategy: &str) {
    let mut args = strategy_args(strategy);
    args.extend(["--workers", "1", "--bind", "fd:5"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = exec_with_socket(5, false, &args);
    assert!(s.addr().starts_with("127.0.0.1:"), "{}", s.ready_line());
    assert_eq!(http_get(s.addr(), "/", T).expect("GET").status, 200);
}

#[test]
fn json_logs_are_one_object_per_line() {
    let s = prefork()
        .args([
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--log-format",
            "json",
        ])
        .start()
        .expect("start");
    assert!(s.wait_log("ready", T));
    let log = s.log();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(log.contains(r#""message":"worker=0 pid="#), "{log}");
}

/// A process's descriptors: number, target and whether close-on-exec is set.
fn descriptors(pid: &str) -> Vec<(i32, String, bool)> {
    fd_table(pid)
        .into_iter()
        .map(|(n, target, flags)| (n, target, flags & 0o2_000_000 != 0))
        .collect()
}

/// S4: a worker holds exactly its own descriptors (one socket: the shared
/// listener, its slot's socket or its channel; the master-alive pipe; its
/// status pipe), and every one of them is close-on-exec, so a program the
/// app runs gets only 0, 1, 2 and what was passed to prefork itself.
#[apply(every_strategy)]
fn s4_a_worker_holds_only_its_own_descriptors_all_close_on_exec(strategy: &str) {
    let s = start(strategy, &["--workers", "2"]);
    assert!(s.wait_workers(2, T));
    // What this test process passes down to prefork: its own descriptors
    // without close-on-exec (the CI runner's, say).
    let passed: Vec<i32> = descriptors("self")
        .into_iter()
        .filter(|&(n, _, cloexec)| n > 2 && !cloexec)
        .map(|(n, _, _)| n)
        .collect();
    for w in s.workers() {
        let own: Vec<(i32, String, bool)> = descriptors(&w.to_string())
            .into_iter()
            .filter(|(n, _, _)| *n > 2 && !passed.contains(n))
            .collect();
        let count = |kind: &str| own.iter().filter(|(_, t, _)| t.starts_with(kind)).count();
        assert_eq!(
            (own.len(), count("socket:"), count("pipe:")),
            (3, 1, 2),
            "worker {w}: {own:?}"
        );
        assert!(
            own.iter().all(|(_, _, cloexec)| *cloexec),
            "worker {w}: a descriptor without close-on-exec: {own:?}"
        );
    }
}

/// L16: slow clients trickling a header byte every 250 ms, more of them
/// than there are workers. The header deadline counts from the start of
/// the request, not from the last byte, so each is cut with a 408 at the
/// deadline (a per-byte deadline would let them hold the workers for the
/// whole 10 s they trickle), and a normal client is served meanwhile.
#[apply(every_strategy)]
fn l16_trickling_clients_are_cut_at_the_header_deadline(strategy: &str) {
    let s = start(strategy, &["--workers", "2", "--header-timeout", "1"]);
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let addr = s.addr().to_string();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut c = TcpStream::connect(&addr).expect("connect");
                c.set_read_timeout(Some(Duration::from_millis(250)))
                    .expect("timeout");
                let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Trickle: 1234567890\r\n\r\n";
                let mut reply = Vec::new();
                for &byte in head.iter().take(40) {
                    if c.write_all(&[byte]).is_err() {
                        break;
                    }
                    let mut buf = [0u8; 512];
                    match c.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            reply.extend_from_slice(&buf[..n]);
                            break;
                        }
                        Err(_) => {} // nothing yet: the next byte
                    }
                }
                (t0.elapsed(), String::from_utf8_lossy(&reply).into_owned())
            })
        })
        .collect();
    let t0 = Instant::now();
    let r = http_get(s.addr(), "/", T).expect("a normal client");
    let normal = t0.elapsed();
    assert_eq!(r.status, 200);
    assert!(
        normal < Duration::from_secs(4),
        "the normal client waited {normal:?}"
    );
    for h in slow {
        let (took, reply) = h.join().expect("slow client");
        assert!(
            reply.starts_with("HTTP/1.1 408"),
            "a trickling client got {reply:?} after {took:?}"
        );
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "a trickling client was cut after {took:?} (deadline 1 s)"
        );
    }
}

/// S1: started as root with `--user nobody`, every worker has nobody's uid
/// and gid (real, effective and saved), nobody's groups only, and no
/// capability left (the bounding set empty too, and no_new_privs set, so
/// not even a setuid-root program the app runs can elevate), so setuid(0)
/// cannot succeed; and it serves. Started
/// as another user, `--user` for a different user is refused (exit 2)
/// before anything is bound.
#[rstest]
#[case::blocking("blocking")]
#[case::mutex_flock("mutex-flock")]
#[case::mutex_sysvsem("mutex-sysvsem")]
#[case::mutex_pthread("mutex-pthread")]
#[case::fdpass("fdpass")]
#[case::reuseport("reuseport")]
fn s1_workers_run_as_the_user_with_nothing_of_root_left(#[case] strategy: &str) {
    use nix::unistd::{Group, User};
    let nobody = User::from_name("nobody")
        .expect("passwd lookup")
        .expect("the nobody user exists");
    if !nix::unistd::geteuid().is_root() {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefork"))
            .args(strategy_args(strategy))
            .args(["--bind", "127.0.0.1:0", "--user", "nobody"])
            .output()
            .expect("run prefork");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("needs the master to run as root"), "{err}");
        return;
    }
    let s = start(strategy, &["--workers", "2", "--user", "nobody"]);
    let gid = nobody.gid.as_raw().to_string();
    let uid = nobody.uid.as_raw().to_string();
    let groups: Vec<String> =
        nix::unistd::getgrouplist(&std::ffi::CString::new("nobody").expect("name"), nobody.gid)
            .expect("getgrouplist")
            .iter()
            .map(|g| g.as_raw().to_string())
            .collect();
    assert!(Group::from_gid(nobody.gid).expect("group lookup").is_some());
    let workers = s.workers();
    assert_eq!(workers.len(), 2);
    for w in workers {
        let status = std::fs::read_to_string(format!("/proc/{w}/status")).expect("status");
        let field = |name: &str| -> Vec<String> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default()
        };
        // Real, effective, saved, filesystem.
        assert_eq!(field("Uid:"), vec![uid.clone(); 4], "worker {w}: {status}");
        assert_eq!(field("Gid:"), vec![gid.clone(); 4], "worker {w}: {status}");
        let mut have = field("Groups:");
        have.sort();
        let mut want = groups.clone();
        want.sort();
        want.dedup();
        assert_eq!(have, want, "worker {w}: root's groups are gone");
        for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:", "CapBnd:"] {
            assert_eq!(field(caps), vec!["0000000000000000"], "worker {w} {caps}");
        }
        // A setuid program the app runs cannot elevate either.
        assert_eq!(
            field("NoNewPrivs:"),
            vec!["1"],
            "worker {w}: no new privileges"
        );
    }
    // The master is still root (it binds, reloads and signals).
    let master = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).expect("status");
    assert!(master
        .lines()
        .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Uid:", "0", "0", "0", "0"]));
    for _ in 0..10 {
        assert_eq!(http_get(s.addr(), "/", T).expect("GET").status, 200);
    }
}

/// CPU time (user + system, in clock ticks) a process has used so far.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 here.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// L14: the only worker has no descriptor number left for its first second
/// (EMFILE on accept, or for fdpass a message whose descriptor the kernel
/// could not install) while a request waits. It backs off instead of
/// spinning (little CPU in that time), logs it, and once relieved serves the
/// request: nothing is lost.
#[apply(every_strategy)]
fn l14_a_worker_at_its_descriptor_limit_backs_off_and_serves_after_relief(strategy: &str) {
    let s = start(strategy, &["--workers", "1", "--fault", "fd-limit-1s"]);
    let worker = s.workers()[0];
    let before = cpu_ticks(worker);
    let t0 = Instant::now();
    let r = http_get(s.addr(), "/", T).expect("answered after relief");
    let took = t0.elapsed();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.worker_pid(),
        Some(worker),
        "the same worker, not a new one"
    );
    let used = cpu_ticks(worker) - before;
    assert!(
        s.wait_log("backing off", T),
        "the worker says it backs off: {}",
        s.log()
    );
    // Spinning for that second would be about 100 ticks.
    assert!(used < 30, "{used} ticks of CPU in {took:?}: spinning");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(4),
        "answered after {took:?} (relief after 1 s)"
    );
}
