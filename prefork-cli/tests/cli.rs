//! Bad input: one clear line on stderr, exit 2 for usage errors, 1 for
//! runtime failures, and nothing started.

mod common;

use std::process::Command;

use common::*;
use rstest::rstest;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_prefork"))
        .args(args)
        .output()
        .expect("run prefork");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[rstest]
#[case::unknown_strategy(&["--strategy", "nope"], "[possible values: blocking, mutex, reuseport, fdpass]")]
#[case::bad_port(&["--bind", "127.0.0.1:99999"], "the port must be a number from 0 to 65535")]
#[case::unbracketed_v6(&["--bind", "::1:80"], "must be written in brackets")]
#[case::no_host(&["--bind", ":80"], "the host is empty")]
#[case::zero_workers(&["--workers", "0"], "'--workers <N|MIN:MAX>': \"0\" is not in 1..=1024")]
#[case::word_workers(&["--workers", "many"], "'--workers <N|MIN:MAX>': \"many\" is not a number")]
#[case::inverted_range(&["--workers", "8:2"], "MIN 8 is more than MAX 2")]
#[case::open_range(&["--workers", "2:"], "\"\" is not a number (expected N or MIN:MAX)")]
#[case::range_too_big(&["--workers", "1:5000"], "\"5000\" is not in 1..=1024")]
#[case::spare_on_fixed_pool(&["--workers", "4", "--spare", "2"], "apply only to a pool that sizes itself")]
#[case::window_on_fixed_pool(&["--scale-window", "5"], "apply only to a pool that sizes itself")]
#[case::zero_window(&["--workers", "1:4", "--scale-window", "0"], "must be more than 0")]
#[case::negative_spare(&["--workers", "1:4", "--spare", "-1"], "'--spare <N>'")]
#[case::negative_timeout(&["--graceful-timeout", "-1"], "must be more than 0")]
#[case::bad_mode(&["--unix-mode", "999"], "not an octal file mode")]
#[case::unknown_flag(&["--frobnicate"], "unexpected argument '--frobnicate'")]
#[case::bad_app(&["--app", "wsgi"], "[possible values: hello, echo, http, static]")]
#[case::bad_log_level(&["--log-level", "loud=["], "--log-level")]
#[case::lock_without_mutex(&["--lock", "flock"], "apply only to --strategy mutex")]
#[case::defer_with_hello(&["--app", "hello", "--defer-accept", "1"], "--defer-accept: the hello app speaks first")]
#[case::defer_too_long(&["--defer-accept", "7200"], "'--defer-accept <SECS>': 7200 is not in 0..=3600")]
#[case::bad_lock(&["--strategy", "mutex", "--lock", "spin"], "[possible values: flock, fcntl, sysvsem, pthread]")]
#[case::unknown_user(&["--user", "no-such-user-prefork"], "--user: no such user \"no-such-user-prefork\"")]
#[case::unknown_group(&["--user", "root", "--group", "no-such-group-prefork"], "--group: no such group \"no-such-group-prefork\"")]
#[case::group_without_user(&["--group", "root"], "--user <USER>")]
#[case::no_boot_timeout(&["--boot-timeout", "0"], "\"0\" must be more than 0")]
#[case::static_without_root(&["--app", "static"], "--app static needs --root DIR")]
#[case::root_not_a_dir(&["--app", "static", "--root", "/proc/no/such"], "--root /proc/no/such: not a directory")]
#[case::root_without_static(&["--root", "/tmp"], "--root applies only to --app static")]
#[case::bad_static_max(&["--app", "static", "--root", "/tmp", "--static-max", "big"], "\"big\" is not a size")]
#[case::bad_max_memory(&["--max-memory", "lots"], "\"lots\" is not a size")]
#[case::no_max_age(&["--max-age", "0"], "\"0\" must be more than 0")]
#[case::no_memory_check(&["--memory-check", "0"], "\"0\" must be more than 0")]
#[case::bad_metrics(&["--metrics", "localhost"], "\"localhost\" is not an address such as 127.0.0.1:9100")]
#[case::no_agent_scale(&["--agent", "127.0.0.1:0", "--agent-scale", "0"], "0 is not in 1..=1024")]
#[case::drain_without_agent(&["--drain", "5"], "--agent <HOST:PORT>")]
#[case::bad_agent(&["--agent", "somewhere"], "\"somewhere\" is not an address")]
#[case::bad_term(&["--term", "soft"], "[possible values: fast, graceful]")]
#[case::no_reload_batch(&["--reload-batch", "0"], "\"0\" is not a count of at least 1, or \"all\"")]
#[case::bad_size(&["--max-body", "lots"], "\"lots\" is not a size such as 64k or 1m")]
#[case::buffer_over_body(&["--max-body", "64k", "--max-body-buffer", "1m"], "--max-body-buffer (1048576) is larger than --max-body (65536)")]
#[case::no_connections(&["--strategy", "fdpass", "--max-connections", "0"], "'--max-connections <N>': 0 is not in 1..=1000000")]
#[case::dispatch_without_fdpass(&["--dispatch", "ready"], "--dispatch applies only to --strategy fdpass")]
#[case::bad_dispatch(&["--strategy", "fdpass", "--dispatch", "later"], "[possible values: ready, accept]")]
fn usage_errors_exit_2_with_one_line(#[case] args: &[&str], #[case] needle: &str) {
    let (code, err) = run(args);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{err}");
}

#[test]
fn port_in_use_exits_1_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, err) = run(&["--bind", &addr, "--workers", "1"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot listen on {addr}: Address already in use")),
        "{err}"
    );
}

#[test]
fn unwritable_pid_file_exits_1_naming_the_path() {
    let (code, err) = run(&[
        "--bind",
        "127.0.0.1:0",
        "--pid-file",
        "/proc/no/such/dir/p.pid",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("pid file /proc/no/such/dir/p.pid"), "{err}");
}

#[test]
fn unwritable_log_file_exits_1_naming_the_path_on_the_terminal() {
    let (code, err) = run(&[
        "--bind",
        "127.0.0.1:0",
        "--log-file",
        "/proc/no/such/dir/prefork.log",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("log file /proc/no/such/dir/prefork.log"),
        "{err}"
    );
}

#[test]
fn unix_path_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("data");
    std::fs::write(&f, "precious").expect("write");
    let (code, err) = run(&["--bind", &format!("unix:{}", f.display())]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("the path exists and is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&f).expect("kept"), "precious");
}

#[test]
fn live_unix_socket_is_refused_and_stale_one_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    let spec = format!("unix:{}", path.display());
    let first = start("blocking", &["--workers", "1", "--bind", &spec]);
    let (code, err) = run(&["--bind", &spec, "--workers", "1"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("another server is accepting on it"), "{err}");
    // The first server was not disturbed.
    assert_eq!(http_get(&spec, "/", T).expect("still served").status, 200);
    // SIGKILL leaves a stale socket file behind; the next start replaces it.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.pid()), Signal::SIGKILL).expect("kill");
    let mut first = first;
    first.wait_exit(T);
    assert!(path.exists(), "stale socket file left by SIGKILL");
    let again = start("blocking", &["--workers", "1", "--bind", &spec]);
    assert_eq!(http_get(&spec, "/", T).expect("served again").status, 200);
    drop(again);
}

#[test]
fn help_and_version_exit_0() {
    let (code, _) = run(&["--help"]);
    assert_eq!(code, Some(0));
    let (code, _) = run(&["--version"]);
    assert_eq!(code, Some(0));
}

/// `PREFORK_INHERIT` is adopted only by the process it is addressed to (as
/// systemd's LISTEN_PID): one meant for another pid is ignored, with a
/// warning, and the server binds as usual. One addressed to this process
/// that names a descriptor twice (two owners, closed twice) is refused.
#[test]
fn a_hand_over_is_adopted_only_by_its_addressee_and_never_twice() {
    let s = prefork()
        .args([
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--log-level",
            "info",
        ])
        .env("PREFORK_INHERIT", "1>1\n3 127.0.0.1:0")
        .start()
        .expect("starts, ignoring a hand-over meant for pid 1");
    assert!(
        s.wait_log("addressed to pid 1, not to this process", T),
        "{}",
        s.log()
    );
    assert_eq!(http_get(s.addr(), "/", T).expect("GET").status, 200);
    drop(s);

    // `exec` keeps the shell's pid: $$ is the pid prefork will have.
    let out = Command::new("sh")
        .args([
            "-c",
            r#"PREFORK_INHERIT="$(printf '1>%s\n5 a\n5 b' $$)" exec "$0" --bind 127.0.0.1:0"#,
            env!("CARGO_BIN_EXE_prefork"),
        ])
        .output()
        .expect("run prefork");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("PREFORK_INHERIT names descriptor 5 twice"),
        "{err}"
    );
}

/// `prefork man` prints a manual page made from the same definitions as
/// `--help` (every flag in it), which man(1) can render; `prefork
/// completions SHELL` prints a completion script naming the flags.
#[test]
fn the_manual_page_and_completions_come_from_the_flags() {
    let bin = env!("CARGO_BIN_EXE_prefork");
    let out = std::process::Command::new(bin)
        .arg("man")
        .output()
        .expect("prefork man");
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH prefork"),
        "{page}"
    );
    for flag in [
        "\\-\\-reload\\-batch",
        "\\-\\-max\\-memory",
        "\\-\\-strategy",
    ] {
        assert!(page.contains(flag), "{flag} in the manual page");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("prefork.1");
    std::fs::write(&path, page.as_bytes()).expect("write");
    if let Ok(rendered) = std::process::Command::new("man")
        .args(["-l", "-P", "cat"])
        .arg(&path)
        .env("MANWIDTH", "100")
        .output()
    {
        if rendered.status.success() {
            let text = String::from_utf8_lossy(&rendered.stdout);
            assert!(text.contains("--reload-batch"), "{text}");
        }
    }
    for (shell, needle) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef prefork"),
        ("fish", "complete -c prefork"),
    ] {
        let out = std::process::Command::new(bin)
            .args(["completions", shell])
            .output()
            .expect("completions");
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(needle), "{shell}: {script}");
        assert!(
            script.contains("--max-memory"),
            "{shell} completes the flags"
        );
    }
    let (code, err) = run(&["completions", "tcsh"]);
    assert_eq!(code, Some(2), "{err}");
}
