//! Resource exhaustion against the real binary (RELIABILITY L11, L14 for
//! the master): fork(2) failing, and the master at its descriptor limit.
//! The master stays up, backs off (a log line per attempt, the attempts
//! spaced out), the workers it has serve on, and it recovers once the
//! resource is back.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use prefork_testkit::procs;
use rstest::rstest;
use rstest_reuse::apply;

/// A pids cgroup the test makes (cgroup v1's pids hierarchy, or v2 with the
/// pids controller), removed on drop after moving every process in it back
/// to the root.
struct PidsCgroup {
    dir: PathBuf,
    root: PathBuf,
}

impl PidsCgroup {
    /// A cgroup of its own for `name` (tests of one process run at once).
    fn new(name: &str) -> Result<PidsCgroup, String> {
        let v1 = Path::new("/sys/fs/cgroup/pids");
        let root = if v1.join("cgroup.procs").exists() {
            v1.to_path_buf()
        } else {
            let v2 = Path::new("/sys/fs/cgroup");
            let controllers = std::fs::read_to_string(v2.join("cgroup.controllers"))
                .map_err(|e| format!("no pids cgroup: {e}"))?;
            if !controllers.split_whitespace().any(|c| c == "pids") {
                return Err("the pids controller is not available".into());
            }
            std::fs::write(v2.join("cgroup.subtree_control"), "+pids")
                .map_err(|e| format!("enabling pids: {e}"))?;
            v2.to_path_buf()
        };
        let dir = root.join(format!("prefork-test-{}-{name}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        Ok(PidsCgroup { dir, root })
    }

    fn limit(&self, max: &str) {
        std::fs::write(self.dir.join("pids.max"), max).expect("pids.max");
    }

    fn add(&self, pid: i32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).expect("cgroup.procs");
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The master's CPU time (user + system), in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    procs::stat(pid).map_or(0, |s| s.utime + s.stime)
}

/// Kills one worker, then waits `secs` without traffic while its slot
/// cannot be refilled. Returns the log lines naming the failure and the
/// master's CPU ticks in that time. Then checks that the worker left serves
/// every request (reuseport steers around the vacant slot's socket).
fn starve(s: &Server, failure: &str, secs: u64) -> (usize, u64) {
    let victim = s.workers()[0];
    let before = s.log_count(failure);
    kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill");
    assert!(s.wait_log(failure, T), "{}", s.log());
    let cpu = cpu_ticks(s.pid());
    std::thread::sleep(Duration::from_secs(secs));
    let used = cpu_ticks(s.pid()) - cpu;
    assert!(procs::process_alive(s.pid()), "the master died");
    for _ in 0..20 {
        let r = http_get(s.addr(), "/", Duration::from_secs(3)).expect("served by the worker left");
        assert_eq!(r.status, 200);
    }
    (s.log_count(failure) - before, used)
}

fn skip(why: &str) {
    prefork_testkit::skipped("fork_failing_is_backed_off_and_the_pool_recovers", why);
}

/// fork(2) fails (pids.max of the master's cgroup reached): the master
/// logs each attempt with its back-off, does not spin, serves on with the
/// worker it has, and fills the slot once forks work again.
#[apply(every_strategy)]
fn fork_failing_is_backed_off_and_the_pool_recovers(strategy: &str) {
    if !nix::unistd::geteuid().is_root() {
        return skip("fork exhaustion needs root (a pids cgroup)");
    }
    let cg = match PidsCgroup::new(strategy) {
        Ok(cg) => cg,
        Err(e) => return skip(&format!("fork exhaustion: {e}")),
    };
    let s = start(strategy, &["--workers", "2"]);
    assert!(s.wait_workers(2, T));
    cg.add(s.pid());
    cg.limit("1"); // the master alone: no fork succeeds
    let failure = "fork() failed while spawning worker";
    let (lines, cpu) = starve(&s, failure, 2);
    eprintln!("{strategy}: {lines} fork attempts in 2 s, {cpu} ticks of master CPU");
    // Back-off from 100 ms doubling: a handful of attempts in 2 s, not a spin.
    assert!((2..=8).contains(&lines), "{lines} attempts: {}", s.log());
    assert!(
        s.log().contains("Resource temporarily unavailable"),
        "the cause is logged: {}",
        s.log()
    );
    // 2 s is 200 ticks: at most 5 % of it.
    assert!(cpu <= 10, "the master used {cpu} ticks while forks failed");
    cg.limit("max");
    assert!(s.wait_workers(2, T), "the slot is refilled: {}", s.log());
    let mut seen = std::collections::HashSet::new();
    assert!(
        wait_until(T, || {
            seen.insert(who(s.addr()).1);
            seen.len() == 2
        }),
        "both workers serve"
    );
}

/// The master at its descriptor limit (RLIMIT_NOFILE lowered to what it
/// has open, with prlimit(1)): spawning fails for want of a pipe (and the
/// fdpass master cannot accept); it backs off without spinning, a request
/// sent meanwhile is answered (at the latest once the limit is lifted), and
/// the pool is whole again after.
#[apply(every_strategy)]
fn a_master_at_its_descriptor_limit_backs_off_and_recovers(strategy: &str) {
    let s = start(strategy, &["--workers", "2"]);
    assert!(s.wait_workers(2, T));
    let open = std::fs::read_dir(format!("/proc/{}/fd", s.pid()))
        .expect("fd dir")
        .count();
    let prlimit = |soft: &str| {
        let st = std::process::Command::new("prlimit")
            .args(["--pid", &s.pid().to_string(), &format!("--nofile={soft}:")])
            .status()
            .expect("prlimit(1) (util-linux)");
        assert!(st.success());
    };
    prlimit(&open.to_string());
    let victim = s.workers()[0];
    let failure = "spawning worker".to_string();
    let cpu = cpu_ticks(s.pid());
    kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill");
    assert!(s.wait_log(&failure, T), "{}", s.log());
    assert!(
        s.wait_log("Too many open files", T),
        "the cause is logged: {}",
        s.log()
    );
    // A request now: answered by the worker left, or (fdpass, whose master
    // cannot accept) once the limit is lifted.
    let addr = s.addr().to_string();
    let request = std::thread::spawn(move || http_get(&addr, "/", T));
    std::thread::sleep(Duration::from_millis(1500));
    let used = cpu_ticks(s.pid()) - cpu;
    let attempts = s.log_count(&failure);
    assert!(procs::process_alive(s.pid()), "the master died");
    eprintln!("{strategy}: {attempts} spawn attempts in 1.5 s, {used} ticks of master CPU");
    prlimit("1024");
    let r = request.join().expect("client").expect("answered");
    assert_eq!(r.status, 200);
    assert!(used <= 8, "the master used {used} ticks at its limit");
    assert!(
        (1..=8).contains(&attempts),
        "{attempts} attempts: {}",
        s.log()
    );
    assert!(s.wait_workers(2, T), "the slot is refilled: {}", s.log());
}
