//! `Master::start` through the library: a start that fails leaves nothing
//! on disk, whichever step fails.
//!
//! The master refuses to start in a process with more than one thread, and
//! the test harness has several, so each start runs in a forked child that
//! does nothing but try it and report how it went in its exit code.

use std::path::Path;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::ForkResult;
use prefork_core::{
    App, BindSpec, BoxError, Connection, Master, MasterConfig, Next, ReportMode, ScaleConfig,
};

/// Forks, runs `start` in the child and returns its exit code.
fn in_a_child(start: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs only `start` (which allocates and makes
    // syscalls; glibc resets its malloc locks in the child) and leaves with
    // _exit, never returning into the test harness.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        ForkResult::Child => {
            let code = start();
            // SAFETY: _exit ends the child at once, running nothing else.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => match waitpid(child, None).expect("waitpid") {
            WaitStatus::Exited(_, code) => code,
            other => panic!("the child did not exit normally: {other:?}"),
        },
    }
}

/// An app whose preload fails, or succeeds.
struct Preload(bool);

impl App for Preload {
    fn preload(&mut self) -> Result<(), BoxError> {
        if self.0 {
            Ok(())
        } else {
            Err("the preload failed on purpose".into())
        }
    }

    fn handle(&mut self, _conn: &mut Connection) -> std::io::Result<Next> {
        Ok(Next::Close)
    }
}

/// A configuration that creates every file a master leaves on disk.
fn leaving_files(dir: &Path) -> MasterConfig {
    MasterConfig {
        binds: vec![BindSpec::Unix(dir.join("app.sock"))],
        socket_activation: false,
        pid_file: Some(dir.join("master.pid")),
        status_socket: Some(dir.join("status.sock")),
        ..MasterConfig::default()
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read the temp dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Exit codes of the child: 0 started (not expected), 1 failed as expected.
fn try_start(cfg: MasterConfig, app: Preload) -> i32 {
    in_a_child(
        move || match Master::start(cfg, prefork_blocking_like::Plain, app) {
            Ok(_) => 0,
            Err(_) => 1,
        },
    )
}

/// The simplest strategy there is, so the test needs no strategy crate.
mod prefork_blocking_like {
    use prefork_core::accept::ListenerSet;
    use prefork_core::{AcceptContext, AcceptStrategy, Accepted, Listener, WorkerAcceptor};

    #[derive(Debug)]
    pub struct Plain;

    impl AcceptStrategy for Plain {
        type Acceptor = Acceptor;

        fn name(&self) -> &'static str {
            "plain"
        }

        fn into_acceptor(self, _slot: usize, l: Vec<Listener>) -> std::io::Result<Acceptor> {
            Ok(Acceptor(ListenerSet::new(l)))
        }
    }

    #[derive(Debug)]
    pub struct Acceptor(ListenerSet);

    impl WorkerAcceptor for Acceptor {
        fn accept(&mut self, ctx: &AcceptContext<'_>) -> std::io::Result<Accepted> {
            self.0.accept(ctx)
        }
    }
}

/// The regression: a pool that sizes itself without busy/idle reports was
/// refused after the pid file and the status socket were made, and that
/// return skipped their clean-up.
#[test]
fn a_start_refused_for_its_configuration_leaves_no_file_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = MasterConfig {
        workers: 1,
        scale: Some(ScaleConfig {
            min: 1,
            max: 2,
            ..ScaleConfig::default()
        }),
        report: ReportMode::Off,
        ..leaving_files(dir.path())
    };
    assert_eq!(try_start(cfg, Preload(true)), 1, "start must fail");
    assert_eq!(files_in(dir.path()), Vec::<String>::new());
}

/// A preload that fails comes after every file was made: all are removed.
#[test]
fn a_failed_preload_leaves_no_file_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(
        try_start(leaving_files(dir.path()), Preload(false)),
        1,
        "start must fail"
    );
    assert_eq!(files_in(dir.path()), Vec::<String>::new());
}

/// The control: the same configuration with a preload that succeeds does
/// leave the files (so the two tests above see a real clean-up).
#[test]
fn a_successful_start_makes_the_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(try_start(leaving_files(dir.path()), Preload(true)), 0);
    assert_eq!(
        files_in(dir.path()),
        ["app.sock", "master.pid", "status.sock"]
    );
}
