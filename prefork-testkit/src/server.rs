//! Start the `prefork` binary, read its ready line, and stop it by pid.

use std::io::{self, BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::procs::children_of;

/// Polls `cond` until it holds or `timeout` passes. Returns whether it held.
/// (Waiting on a condition with a deadline, never a fixed sleep.)
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The document a master's status socket (`--status unix:PATH`) answers
/// with, parsed; `None` when it cannot be read.
pub fn read_status(path: &std::path::Path) -> Option<serde_json::Value> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(path).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    ready_timeout: Duration,
}

impl ServerBuilder {
    /// A server from this binary.
    pub fn new(bin: impl Into<PathBuf>) -> ServerBuilder {
        ServerBuilder {
            bin: bin.into(),
            args: Vec::new(),
            env: Vec::new(),
            ready_timeout: Duration::from_secs(20),
        }
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// How long to wait for the ready line.
    pub fn ready_timeout(mut self, t: Duration) -> Self {
        self.ready_timeout = t;
        self
    }

    /// Spawns without waiting for readiness (for tests of failing starts).
    pub fn spawn(&self) -> io::Result<Server> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let (tx, rx) = mpsc::channel();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| io::Error::other("no stderr"))?;
        let sink = Arc::clone(&log);
        let (eof_tx, stderr_eof) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
            let _ = eof_tx.send(());
        });
        Ok(Server {
            pid: child.id() as i32,
            child,
            stdout: rx,
            log,
            stderr_eof,
            ready_line: String::new(),
            addrs: Vec::new(),
            exit: None,
        })
    }

    /// Spawns and waits for the ready line.
    pub fn start(&self) -> io::Result<Server> {
        let mut s = self.spawn()?;
        s.wait_ready(self.ready_timeout)?;
        Ok(s)
    }
}

/// A running `prefork` master. Dropping it kills the master and every
/// worker by pid.
#[derive(Debug)]
pub struct Server {
    pid: i32,
    child: Child,
    stdout: mpsc::Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
    /// Signals that every stderr line has been collected.
    stderr_eof: mpsc::Receiver<()>,
    ready_line: String,
    addrs: Vec<String>,
    exit: Option<ExitStatus>,
}

impl Server {
    /// Waits for `prefork ready ...` on stdout and records the addresses.
    pub fn wait_ready(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .stdout
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(line) if line.starts_with("prefork ready ") => {
                    self.addrs = line
                        .split_whitespace()
                        .filter_map(|t| t.strip_prefix("listen="))
                        .map(str::to_string)
                        .collect();
                    self.ready_line = line;
                    return Ok(());
                }
                Ok(_) => {}
                Err(_) => {
                    if let Some(st) = self.try_exit() {
                        return Err(io::Error::other(format!(
                            "prefork exited ({st}) before it was ready:\n{}",
                            self.log()
                        )));
                    }
                    if Instant::now() >= deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no ready line within {timeout:?}:\n{}", self.log()),
                        ));
                    }
                }
            }
        }
    }

    /// The master's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The ready line.
    pub fn ready_line(&self) -> &str {
        &self.ready_line
    }

    /// Listen addresses from the ready line (`127.0.0.1:PORT`, `unix:/p`).
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// The first listen address.
    pub fn addr(&self) -> &str {
        self.addrs.first().map(String::as_str).unwrap_or("")
    }

    /// The TCP port of the first listen address (0 for a Unix socket).
    pub fn port(&self) -> u16 {
        self.addr()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    /// Sends a signal to the master.
    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid), sig);
    }

    /// Live worker pids (children of the master).
    pub fn workers(&self) -> Vec<i32> {
        children_of(self.pid)
    }

    /// Waits until exactly `n` workers are alive.
    pub fn wait_workers(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.workers().len() == n)
    }

    /// Waits until some worker is inside a `/sleep/MS` request.
    pub fn wait_worker_sleeping(&self, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.workers()
                .into_iter()
                .any(crate::procs::is_sleeping_in_nanosleep)
        })
    }

    /// Everything the server wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Waits until a stderr line contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.log
                .lock()
                .map(|l| l.iter().any(|x| x.contains(needle)))
                .unwrap_or(false)
        })
    }

    /// Number of stderr lines containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .map(|l| l.iter().filter(|x| x.contains(needle)).count())
            .unwrap_or(0)
    }

    /// The exit status, if the master has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
            if self.exit.is_some() {
                // Let the reader collect the last lines (bounded: a worker
                // that outlived the master may still hold the pipe).
                let _ = self.stderr_eof.recv_timeout(Duration::from_secs(2));
            }
        }
        self.exit
    }

    /// Waits for the master to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Graceful stop (QUIT) and wait.
    pub fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGQUIT);
        self.wait_exit(timeout)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            for w in self.workers() {
                let _ = kill(Pid::from_raw(w), Signal::SIGKILL);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- prefork pid {} stderr ---\n{}", self.pid, self.log());
        }
    }
}
