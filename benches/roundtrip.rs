//! Round trips through a real HAProxy: `set server B/S addr IP port P` sent one at a time and
//! 100 to a batch, through [`RuntimeClient`] and through a bare blocking `UnixStream` loop in
//! prompt mode (the floor: write the line, read until the prompt), in the same run.
//!
//! HAProxy is started by the integration tests' harness (`tests/common/mod.rs`) with one
//! backend of 100 servers that are never checked and never sent traffic. Every command really
//! changes a server: each server alternates between two loopback addresses and ports, and each
//! answer must be HAProxy's `IP changed from ...`; at the end `show servers state` must show
//! every server at the address the last command gave it.
//!
//! After criterion's runs, the four loops also take turns in short interleaved rounds, so that a
//! change of load on a shared machine hits them alike; the summary printed at the end gives
//! commands/s and the ratio to the bare loop from both. On a 2-core VM the single-command
//! latency depends on whether HAProxy and the bench wake each other across cores; pinning both
//! to one core (`taskset -c 0`, inherited by HAProxy) gives the steadiest ratio.
//!
//!     cargo bench --bench roundtrip
//!     taskset -c 0 cargo bench --bench roundtrip

#[path = "../tests/common/mod.rs"]
mod common;

mod util;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};
use util::{mean_ns, measuring};

use criterion::{Criterion, Throughput};
use lbagent::runtime::parse::parse_servers_state;
use lbagent::runtime::{ClientOptions, Command, Endpoint, RuntimeClient, ServerRef};

const SERVERS: usize = 100;
const BACKEND: &str = "be_bench";
/// The two places every server alternates between.
const PLACES: [(Ipv4Addr, u16); 2] = [
    (Ipv4Addr::new(127, 0, 0, 2), 30002),
    (Ipv4Addr::new(127, 0, 0, 3), 30003),
];

fn proxies() -> String {
    let mut cfg = format!("backend {BACKEND}\n    balance roundrobin\n");
    for i in 0..SERVERS {
        cfg.push_str(&format!("    server s{i:03} 127.0.0.1:{}\n", 20000 + i));
    }
    cfg
}

/// Which place each server is at, and the commands that move it to the other one.
struct Moves {
    /// `None`: still at its configured address.
    at: Vec<Option<usize>>,
    /// `commands[place][server]` and their wire forms.
    commands: [Vec<Command>; 2],
    lines: [Vec<String>; 2],
    /// Next server for the one-at-a-time loops.
    cursor: usize,
}

impl Moves {
    fn new() -> Moves {
        let make = |place: usize| -> Vec<Command> {
            (0..SERVERS)
                .map(|i| Command::SetServerAddr {
                    server: ServerRef::new(BACKEND, &format!("s{i:03}")).unwrap(),
                    addr: IpAddr::V4(PLACES[place].0),
                    port: Some(PLACES[place].1),
                })
                .collect()
        };
        let commands = [make(0), make(1)];
        let lines = [0, 1].map(|p| commands[p].iter().map(|c| c.to_string()).collect());
        Moves {
            at: vec![None; SERVERS],
            commands,
            lines,
            cursor: 0,
        }
    }

    /// The place server `s` moves to next, recorded as done.
    fn flip(&mut self, s: usize) -> usize {
        let to = match self.at[s] {
            Some(0) => 1,
            _ => 0,
        };
        self.at[s] = Some(to);
        to
    }

    /// The next single move: (place, server).
    fn next_one(&mut self) -> (usize, usize) {
        let s = self.cursor;
        self.cursor = (self.cursor + 1) % SERVERS;
        (self.flip(s), s)
    }

    /// A batch moving every server; all servers are at the same place after a full cycle of
    /// single moves, so one place serves the whole batch.
    fn next_all(&mut self) -> usize {
        assert_eq!(
            self.cursor, 0,
            "single moves left the servers at mixed places"
        );
        let to = self.flip(0);
        for s in 1..SERVERS {
            assert_eq!(self.flip(s), to, "servers at mixed places");
        }
        to
    }
}

const PROMPT_END: &[u8] = b"\n> ";

/// The floor: a blocking std `UnixStream` in prompt mode, one read buffer, no parsing.
struct Bare {
    stream: UnixStream,
    buf: Vec<u8>,
    /// `read()` calls and answers read, to show how HAProxy's output arrives.
    reads: u64,
    answers: u64,
}

impl Bare {
    fn connect(path: &Path) -> Bare {
        let stream = UnixStream::connect(path).expect("connect the admin socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut bare = Bare {
            stream,
            buf: Vec::with_capacity(64 * 1024),
            reads: 0,
            answers: 0,
        };
        bare.send(b"prompt\n");
        bare.read_prompts(1);
        bare
    }

    fn send(&mut self, line: &[u8]) {
        self.stream.write_all(line).expect("write to the socket");
    }

    /// Reads until `n` answers (each ending in `\n> `) have arrived; leaves them in `buf`.
    fn read_prompts(&mut self, n: usize) {
        self.buf.clear();
        let mut seen = 0;
        let mut scanned: usize = 0;
        let mut chunk = [0u8; 64 * 1024];
        while seen < n {
            let got = self.stream.read(&mut chunk).expect("read from the socket");
            assert!(got > 0, "HAProxy closed the connection");
            self.reads += 1;
            self.buf.extend_from_slice(&chunk[..got]);
            // Count terminators in what has not been counted yet (a terminator may straddle reads).
            let from = scanned.saturating_sub(PROMPT_END.len() - 1);
            seen += self.buf[from..]
                .windows(PROMPT_END.len())
                .filter(|w| *w == PROMPT_END)
                .count();
            scanned = self.buf.len();
        }
        assert_eq!(seen, n, "more answers than commands");
        self.answers += n as u64;
    }
}

const SINGLE: &str = "set_server_addr";
const BATCH: &str = "set_server_addr_batch100";

/// One command through the client.
async fn client_one(client: &mut RuntimeClient, moves: &mut Moves) {
    let (p, s) = moves.next_one();
    let reply = client.execute(&moves.commands[p][s]).await.unwrap();
    assert!(
        reply.outcome.text.starts_with("IP changed"),
        "{}: {:?}",
        reply.command,
        reply.outcome
    );
}

/// One batch of `SERVERS` commands through the client.
async fn client_all(client: &mut RuntimeClient, moves: &mut Moves) {
    let p = moves.next_all();
    let replies = client.batch(&moves.commands[p]).await.unwrap();
    assert_eq!(replies.len(), SERVERS);
    for r in &replies {
        assert!(r.outcome.text.starts_with("IP changed"), "{r:?}");
    }
}

impl Bare {
    /// One command, one line.
    fn one(&mut self, moves: &mut Moves, line: &mut Vec<u8>) {
        let (p, s) = moves.next_one();
        line.clear();
        line.extend_from_slice(moves.lines[p][s].as_bytes());
        line.push(b'\n');
        self.send(line);
        self.read_prompts(1);
        assert!(self.buf.starts_with(b"IP changed"), "{}", moves.lines[p][s]);
    }

    /// `SERVERS` commands, one per line, in one write (prebuilt per place). One line each, as
    /// the client sends them: HAProxy 3.2 answers a `;`-joined line with a single prompt.
    fn all(&mut self, moves: &mut Moves, joined: &[Vec<u8>; 2]) {
        let p = moves.next_all();
        self.send(&joined[p]);
        self.read_prompts(SERVERS);
        assert!(self.buf.starts_with(b"IP changed"));
    }
}

fn joined_lines(moves: &Moves) -> [Vec<u8>; 2] {
    [0, 1].map(|p| {
        let mut l = moves.lines[p].join("\n").into_bytes();
        l.push(b'\n');
        l
    })
}

/// What the run measured besides criterion's own estimates.
#[derive(Default)]
struct Extra {
    /// `read()` calls per answer of the bare loops: one at a time, batched.
    reads_per_answer: (f64, f64),
    /// Interleaved rounds: median microseconds per command for
    /// [bare single, client single, bare batched, client batched].
    interleaved_us: [f64; 4],
    rounds: usize,
}

/// Runs the benchmarks, then the interleaved comparison, then checks HAProxy's final state.
fn benches(c: &mut Criterion, admin: &Path) -> Extra {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut client = RuntimeClient::new(
        Endpoint::Unix(admin.to_path_buf()),
        ClientOptions::default(),
    );
    rt.block_on(client.connect()).expect("client connects");
    let mut moves = Moves::new();
    let joined = joined_lines(&moves);
    // (read() calls, answers) of the bare loops.
    let mut single_reads = (0u64, 0u64);
    let mut batch_reads = (0u64, 0u64);

    let mut g = c.benchmark_group(SINGLE);
    g.throughput(Throughput::Elements(1));
    g.bench_function("client_execute", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    client_one(&mut client, &mut moves).await;
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("bare_unix_stream", |b| {
        let mut bare = Bare::connect(admin);
        let mut line = Vec::with_capacity(128);
        let before = (bare.reads, bare.answers);
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                bare.one(&mut moves, &mut line);
            }
            start.elapsed()
        });
        single_reads.0 += bare.reads - before.0;
        single_reads.1 += bare.answers - before.1;
    });
    g.finish();

    // Bring every server to the same place so whole batches can alternate.
    while moves.cursor != 0 {
        rt.block_on(client_one(&mut client, &mut moves));
    }

    let mut g = c.benchmark_group(BATCH);
    g.throughput(Throughput::Elements(SERVERS as u64));
    g.bench_function("client_batch", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    client_all(&mut client, &mut moves).await;
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("bare_unix_stream_joined", |b| {
        let mut bare = Bare::connect(admin);
        let before = (bare.reads, bare.answers);
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                bare.all(&mut moves, &joined);
            }
            start.elapsed()
        });
        batch_reads.0 += bare.reads - before.0;
        batch_reads.1 += bare.answers - before.1;
    });
    g.finish();

    let mut extra = Extra::default();
    let per = |(reads, answers): (u64, u64)| reads as f64 / answers.max(1) as f64;
    extra.reads_per_answer = (per(single_reads), per(batch_reads));

    // Interleaved: the four loops take turns in short rounds, so a change in machine load (2
    // shared cores) hits all of them alike; the medians over rounds give a steadier ratio than
    // four criterion runs made one after another. Skipped in `--test` mode.
    if measuring() {
        const ROUNDS: usize = 15;
        const SINGLES: usize = 2 * SERVERS;
        const BATCHES: usize = 10;
        let mut bare = Bare::connect(admin);
        let mut line = Vec::with_capacity(128);
        let mut samples: [Vec<f64>; 4] = Default::default();
        for round in 0..ROUNDS {
            let mut timed = |k: usize, per: usize, f: &mut dyn FnMut()| {
                let start = Instant::now();
                f();
                samples[k].push(start.elapsed().as_secs_f64() * 1e6 / per as f64);
            };
            let mut order = [0, 1, 2, 3];
            if round % 2 == 1 {
                order = [1, 0, 3, 2];
            }
            for k in order {
                match k {
                    0 => timed(0, SINGLES, &mut || {
                        for _ in 0..SINGLES {
                            bare.one(&mut moves, &mut line);
                        }
                    }),
                    1 => timed(1, SINGLES, &mut || {
                        rt.block_on(async {
                            for _ in 0..SINGLES {
                                client_one(&mut client, &mut moves).await;
                            }
                        })
                    }),
                    2 => timed(2, BATCHES * SERVERS, &mut || {
                        for _ in 0..BATCHES {
                            bare.all(&mut moves, &joined);
                        }
                    }),
                    _ => timed(3, BATCHES * SERVERS, &mut || {
                        rt.block_on(async {
                            for _ in 0..BATCHES {
                                client_all(&mut client, &mut moves).await;
                            }
                        })
                    }),
                }
            }
        }
        for (k, v) in samples.iter_mut().enumerate() {
            v.sort_by(f64::total_cmp);
            extra.interleaved_us[k] = v[v.len() / 2];
        }
        extra.rounds = ROUNDS;
    }

    // Every command did what it said: each server is where its last move put it.
    let text = common::answers(admin, &format!("show servers state {BACKEND}\n"))
        .expect("show servers state");
    let rows = parse_servers_state(&text).expect("parse show servers state");
    assert_eq!(rows.len(), SERVERS);
    for (i, row) in rows.iter().enumerate() {
        if let Some(p) = moves.at[i] {
            assert_eq!(row.server, format!("s{i:03}"));
            assert_eq!(
                (row.addr.as_deref(), row.port),
                (Some(PLACES[p].0.to_string().as_str()), Some(PLACES[p].1)),
                "{}",
                row.server
            );
        }
    }
    extra
}

fn summary(since: SystemTime, extra: &Extra) {
    // (group, id, commands per iteration, baseline id, index in interleaved_us)
    let cases = [
        (SINGLE, "bare_unix_stream", 1.0, "bare_unix_stream", 0),
        (SINGLE, "client_execute", 1.0, "bare_unix_stream", 1),
        (
            BATCH,
            "bare_unix_stream_joined",
            100.0,
            "bare_unix_stream_joined",
            2,
        ),
        (BATCH, "client_batch", 100.0, "bare_unix_stream_joined", 3),
    ];
    let fmt = |r: Option<f64>, prec: usize| r.map_or_else(|| "-".into(), |r| format!("{r:.prec$}"));
    eprintln!();
    eprintln!("roundtrip summary: `set server B/S addr IP port P` on HAProxy, per command");
    eprintln!(
        "  criterion: mean of its samples; interleaved: median of {} rounds taking turns",
        extra.rounds
    );
    eprintln!(
        "{:<48} {:>9} {:>9} {:>8} | {:>9} {:>9} {:>8}",
        "case", "crit us", "ops/s", "x bare", "intl us", "ops/s", "x bare"
    );
    for (group, id, per_iter, base, k) in cases {
        let crit = mean_ns(group, id, since).map(|ns| ns / per_iter / 1e3);
        let crit_base = mean_ns(group, base, since).map(|ns| ns / per_iter / 1e3);
        let intl = Some(extra.interleaved_us[k]).filter(|v| *v > 0.0);
        let intl_base = Some(extra.interleaved_us[k & !1]).filter(|v| *v > 0.0);
        let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
        eprintln!(
            "{:<48} {:>9} {:>9} {:>8} | {:>9} {:>9} {:>8}",
            format!("{group}/{id}"),
            fmt(crit, 1),
            fmt(crit.map(|us| 1e6 / us), 0),
            fmt(ratio(crit, crit_base), 2),
            fmt(intl, 1),
            fmt(intl.map(|us| 1e6 / us), 0),
            fmt(ratio(intl, intl_base), 2),
        );
    }
    eprintln!(
        "bare loops: {:.2} read() calls per answer one at a time, {:.2} per answer batched",
        extra.reads_per_answer.0, extra.reads_per_answer.1
    );
}

fn main() {
    let since = SystemTime::now();
    let mut c = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let h = common::Haproxy::start(&proxies());
    let extra = benches(&mut c, &h.admin);
    drop(h);
    c.final_summary();
    if measuring() {
        summary(since, &extra);
    }
}
