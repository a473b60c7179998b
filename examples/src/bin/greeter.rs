//! A library user's own server in a short `main`: the greeting table is
//! loaded once in the master (`preload`) and shared copy-on-write; each
//! worker counts what it served (`after_fork` state); `handle` answers.
//!
//!     cargo run -p prefork-examples --bin greeter -- 127.0.0.1:9000
//!     curl http://127.0.0.1:9000/

#![forbid(unsafe_code)]

use std::io::{Read, Write};

use prefork_core::{App, BindSpec, BoxError, Connection, Master, MasterConfig, Next, WorkerInfo};

#[derive(Default)]
struct Greeter {
    greetings: Vec<String>,
    worker: Option<WorkerInfo>,
    served: u64,
}

impl App for Greeter {
    fn preload(&mut self) -> Result<(), BoxError> {
        self.greetings = ["hello", "bonjour", "hallo", "hola", "ciao"]
            .map(String::from)
            .to_vec();
        Ok(())
    }

    fn after_fork(&mut self, w: &WorkerInfo) -> Result<(), BoxError> {
        self.worker = Some(*w);
        Ok(())
    }

    fn handle(&mut self, c: &mut Connection) -> std::io::Result<Next> {
        let mut buf = [0u8; 4096];
        let _ = c.read(&mut buf)?; // the request head; this toy ignores it
        self.served += 1;
        let greeting = &self.greetings[self.served as usize % self.greetings.len()];
        let slot = self.worker.map_or(0, |w| w.slot);
        let body = format!("{greeting} from worker {slot} (request {})\n", self.served);
        write!(
            c,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        Ok(Next::Close)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".into());
    let cfg = MasterConfig {
        binds: vec![BindSpec::parse(&addr)?],
        workers: 2,
        ..MasterConfig::default()
    };
    let master = Master::start(cfg, prefork_blocking::Blocking::new(), Greeter::default())?;
    let code = master.run(|ready| println!("greeter ready on {:?}", ready.addrs))?;
    std::process::exit(code)
}
