//! `--config FILE`: settings from a TOML file, the command line over them,
//! and HUP reading the file again (RELIABILITY L6: a broken file changes
//! nothing), on the real binary.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use common::*;
use rstest::rstest;
use rstest_reuse::apply;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write the config file");
}

#[test]
fn the_file_sets_what_the_flags_set_and_the_command_line_wins() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("prefork.toml");
    let pid_file = dir.path().join("p.pid");
    write(
        &file,
        &format!(
            "# a comment\nbind = [\"127.0.0.1:0\", \"unix:{}/s.sock\"]\nstrategy = \"mutex\"\nlock = \"flock\"\nlock-always = true\nworkers = 3\npid_file = \"{}\"\n",
            dir.path().display(),
            pid_file.display()
        ),
    );
    let mut s = prefork()
        .args(["--config", file.to_str().expect("utf-8"), "--workers", "2"])
        .start()
        .expect("prefork starts from its config file");
    let line = s.ready_line().to_string();
    assert!(line.contains("strategy=mutex"), "{line}");
    assert!(line.contains("workers=2"), "the command line wins: {line}");
    assert_eq!(s.addrs().len(), 2, "both binds of the list: {line}");
    assert!(s.addrs()[1].starts_with("unix:"), "{line}");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file from the config")
        .trim()
        .parse()
        .expect("a pid");
    assert_eq!(pid, s.pid());
    assert!(who(s.addr()).0 < 2, "served by one of the 2 workers");
    assert!(
        s.log().contains("flock"),
        "the lock kind from the file: {}",
        s.log()
    );
    assert_eq!(s.stop(T).and_then(|st| st.code()), Some(0));
}

#[rstest]
#[case::missing("", "No such file or directory")]
#[case::syntax("workers = \n", "line 1:")]
#[case::unknown_key("wokers = 2\n", "unknown setting \"wokers\"")]
#[case::bad_value("workers = 0\n", "'--workers <N|MIN:MAX>': \"0\" is not in 1..=1024")]
#[case::list_for_one("workers = [1, 2]\n", "\"workers\" takes one value, not a list")]
#[case::switch_as_string("lock-always = \"yes\"\n", "\"lock-always\" is a switch")]
#[case::hidden_flag("fault = \"boot-fail\"\n", "unknown setting \"fault\"")]
#[case::across_flags("lock = \"flock\"\n", "apply only to --strategy mutex")]
fn a_bad_config_file_exits_2_with_one_line_naming_it(#[case] text: &str, #[case] needle: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("prefork.toml");
    if !text.is_empty() {
        write(&file, text);
    }
    let pid_file = dir.path().join("p.pid");
    let out = Command::new(env!("CARGO_BIN_EXE_prefork"))
        .args(["--config", file.to_str().expect("utf-8")])
        .args([
            "--bind",
            "127.0.0.1:0",
            "--pid-file",
            pid_file.to_str().expect("utf-8"),
        ])
        .output()
        .expect("run prefork");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{err}");
    if needle != "apply only to --strategy mutex" {
        assert!(err.contains("config file"), "names the file: {err}");
    }
    assert!(!pid_file.exists(), "nothing started");
}

/// L6: HUP reads the file again. A good file resizes the pool, replaces
/// every worker and brings its new timeout; a file with a mistake is logged
/// and changes nothing: the same workers keep serving, nothing is lost.
#[apply(every_strategy)]
fn l6_hup_rereads_the_config_file_and_a_broken_one_changes_nothing(strategy: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("prefork.toml");
    write(&file, "workers = 2\n");
    let mut args = strategy_args(strategy);
    args.extend(["--bind", "127.0.0.1:0", "--config"].map(String::from));
    args.push(file.to_string_lossy().into_owned());
    let mut s = prefork().args(args).start().expect("prefork starts");
    assert!(s.wait_workers(2, T), "{}", s.log());
    let traffic = Load::start(s.addr());

    // A good file: 3 workers, all new, with a 1 s timeout.
    let first: HashSet<i32> = s.workers().into_iter().collect();
    write(&file, "workers = 3\ntimeout = 1\n");
    s.signal(Signal::SIGHUP);
    assert!(
        wait_replaced(&s, &first, 3),
        "three new workers: {}",
        s.log()
    );
    assert!(s.log().contains("configuration re-read"), "{}", s.log());

    // A broken file: logged with its line, nothing else happens.
    let running: HashSet<i32> = s.workers().into_iter().collect();
    write(&file, "workers = 5\ntimeout = \n");
    s.signal(Signal::SIGHUP);
    assert!(
        s.wait_log("reload failed, the running workers and settings stay", T),
        "{}",
        s.log()
    );
    assert!(s.log().contains("line 2:"), "{}", s.log());
    // Another HUP with a value the flag refuses.
    write(&file, "workers = 0\n");
    s.signal(Signal::SIGHUP);
    assert!(
        wait_until(T, || s.log_count("reload failed") == 2),
        "{}",
        s.log()
    );
    let now: HashSet<i32> = s.workers().into_iter().collect();
    assert_eq!(now, running, "the same workers stay after broken reloads");
    let (ok, failed) = traffic.finish();
    assert_eq!(failed, 0, "connections lost across the reloads");
    assert!(ok > 0);

    // The reloaded timeout is in force: a request busy beyond 1 s is killed.
    let _ = http_get(s.addr(), "/sleep/4000", T);
    assert!(s.wait_log("> 1s, killing", T), "{}", s.log());
    assert_eq!(s.stop(T).and_then(|st| st.code()), Some(0));
}

#[test]
fn check_config_says_ok_or_names_the_mistake_and_binds_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("prefork.toml");
    let pid_file = dir.path().join("p.pid");
    // A port someone else holds: a check that bound it would fail.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    write(
        &file,
        &format!(
            "bind = \"{addr}\"\nworkers = \"2:4\"\npid-file = \"{}\"\n",
            pid_file.display()
        ),
    );
    let check = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_prefork"))
            .args(["--config", file.to_str().expect("utf-8"), "--check-config"])
            .args(extra)
            .output()
            .expect("run prefork");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = check(&[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), format!("configuration ok: {}", file.display()));
    assert!(!pid_file.exists(), "nothing started");
    let (code, _, err) = check(&["--spare", "9", "--workers", "3"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("apply only to a pool that sizes itself"),
        "{err}"
    );
    write(&file, "workers = \"4:2\"\n");
    let (code, out, err) = check(&[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("config file") && err.contains("MIN 4 is more than MAX 2"),
        "{err}"
    );
}

#[test]
fn hup_applies_a_new_log_level() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("prefork.toml");
    write(&file, "workers = 1\nlog-level = \"info\"\n");
    let s = prefork()
        .args([
            "--bind",
            "127.0.0.1:0",
            "--config",
            file.to_str().expect("utf-8"),
        ])
        .start()
        .expect("prefork starts");
    s.signal(Signal::SIGTTIN);
    assert!(s.wait_log("SIGTTIN", T), "info is logged: {}", s.log());
    write(&file, "workers = 1\nlog-level = \"warn\"\n");
    let before: HashSet<i32> = s.workers().into_iter().collect();
    s.signal(Signal::SIGHUP);
    assert!(wait_replaced(&s, &before, 1), "reloaded: {}", s.log());
    let infos = s.log_count(" INFO ");
    s.signal(Signal::SIGTTIN);
    assert!(s.wait_workers(2, T), "{}", s.log());
    assert_eq!(
        s.log_count("SIGTTIN"),
        1,
        "info no longer logged: {}",
        s.log()
    );
    assert_eq!(s.log_count(" INFO "), infos, "{}", s.log());
}
