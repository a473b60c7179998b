//! What reporting busy and idle costs a worker per connection, for each
//! way of reporting. Run: `cargo bench -p prefork-core --bench status_report`.
//! docs/status.md puts these beside the per-connection CPU of the server.

use std::hint::black_box;
use std::os::fd::AsFd;

use criterion::{criterion_group, criterion_main, Criterion};
use prefork_core::scoreboard::Scoreboard;
use prefork_core::status::{self, StatusKind, StatusWriter};

fn report(c: &mut Criterion) {
    let mut g = c.benchmark_group("busy+idle per connection");
    let mut sb = Scoreboard::new(64).expect("scoreboard");
    let i = sb.allocate().expect("cell");
    let cell = sb.cell(i).expect("cell");
    g.bench_function("scoreboard (worker: 2 clock reads, 3 atomic ops)", |b| {
        b.iter(|| {
            cell.busy(prefork_core::MonoTime::now());
            cell.idle(prefork_core::MonoTime::now());
            black_box(cell);
        })
    });
    g.bench_function("scoreboard (master: read one cell)", |b| {
        b.iter(|| black_box((cell.state(), cell.requests())))
    });
    let (rd, wr) = status::channel().expect("pipe");
    let w = StatusWriter::new(wr, 0);
    let mut msgs = Vec::with_capacity(64);
    g.bench_function("pipe (worker: 2 writes; master: 1 read)", |b| {
        b.iter(|| {
            w.send(StatusKind::Busy);
            w.send(StatusKind::Idle);
            msgs.clear();
            black_box(status::read_messages(rd.as_fd(), &mut msgs));
        })
    });
    g.finish();
}

criterion_group!(benches, report);
criterion_main!(benches);
