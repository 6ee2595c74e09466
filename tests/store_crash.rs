//! `kill -9` at any instant: the store never loses an acknowledged commit and always loads.
//!
//! The test binary re-executes itself as a child (`crash_child`, selected with `--exact` and
//! the `LBAGENT_STORE_CRASH_CHILD` variable) that commits a deterministic stream of batches and
//! prints `ACK <generation>` right after each `commit` returns. The parent SIGKILLs it after a
//! random number of acknowledgements (sometimes before the first, so the kill can land in
//! `open`), reopens the directory and checks the state against a replay of the same stream.
//! Rounds are chained five to a directory, so later children start from whatever a kill left
//! (torn tails, interrupted compactions), and most rounds use tiny compaction thresholds so
//! kills also land while a snapshot is written or the journal truncated.
//!
//! `LBAGENT_STORE_CRASH_SEED=<n>` replays a run (the seed is printed on failure).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lbagent::model::{Change, DesiredState, Effect, Mode, NodeName, ServerSpec, ServerState};
use lbagent::store::{Store, StoreOptions, JOURNAL_FILE, SNAPSHOT_FILE};

const CHILD_ENV: &str = "LBAGENT_STORE_CRASH_CHILD";
const OPTIONS_ENV: &str = "LBAGENT_STORE_CRASH_OPTIONS";
const SEED_ENV: &str = "LBAGENT_STORE_CRASH_SEED";
const CHILD_TEST: &str = "crash_child";

const ROUNDS: u64 = 20;
const ROUNDS_PER_DIR: u64 = 5;
/// Stop starting rounds after this long, keeping the test well under 30 s on a slow disk.
const BUDGET: Duration = Duration::from_secs(15);
/// A child that has not been killed by then is killed by the watchdog, and the test fails.
const CHILD_TIMEOUT: Duration = Duration::from_secs(10);
/// The child stops by itself after this many batches (it is always killed long before).
const CHILD_MAX_BATCHES: u64 = 1_000_000;

/// Frontend ports with their mode (fixed per port, so a put never conflicts).
const PORTS: [(u16, Mode); 6] = [
    (80, Mode::Http),
    (443, Mode::Tcp),
    (1883, Mode::Tcp),
    (8080, Mode::Http),
    (8883, Mode::Tcp),
    (9000, Mode::Tcp),
];

/// The deterministic stream of batches both processes generate. Every change has an effect,
/// so each batch ends at a distinct generation and a generation names a batch boundary.
struct Workload {
    rng: u64,
    state: DesiredState,
}

impl Workload {
    fn new() -> Workload {
        Workload {
            rng: 0x2545_f491_4f6c_dd1d,
            state: DesiredState::default(),
        }
    }

    fn below(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }

    /// The next batch, already applied to `self.state`.
    fn next_batch(&mut self) -> Vec<Change> {
        // Mostly small groups, sometimes a full group commit's worth.
        let size = if self.below(5) == 0 {
            1 + self.below(64)
        } else {
            1 + self.below(6)
        };
        let mut batch = Vec::with_capacity(size as usize);
        for _ in 0..size {
            let (port, mode) = PORTS[self.below(PORTS.len() as u64) as usize];
            let node = NodeName::new(&format!("node-{}", self.below(400))).unwrap();
            let frontend = self.state.frontends.get(&port);
            let current = frontend.and_then(|fe| fe.servers.get(&node)).cloned();
            let current_maxconn = frontend.and_then(|fe| fe.settings.maxconn);
            let change = if frontend.is_some() && self.below(300) == 0 {
                Change::DeleteFrontend {
                    frontend_port: port,
                }
            } else if self.below(50) == 0 {
                // A settings change (or a new frontend with settings): the journal holds
                // settings too. A different maxconn each time, so it always changes something.
                let maxconn = current_maxconn.map_or(1, |m| m % 1000 + 1);
                let proxy = ["none", "v1", "v2"][self.below(3) as usize];
                let settings: lbagent::model::FrontendSettings =
                    serde_json::from_value(serde_json::json!({
                        "proxy_protocol": proxy,
                        "check": {"port": 32000 + self.below(10), "interval": "500ms"},
                        "timeouts": {"tunnel": "1h"},
                        "maxconn": maxconn,
                    }))
                    .unwrap();
                Change::PutFrontend {
                    frontend_port: port,
                    mode: Some(mode),
                    settings,
                }
            } else if current.is_some() && self.below(3) == 0 {
                Change::DeleteServer {
                    frontend_port: port,
                    node,
                }
            } else {
                let mut spec = ServerSpec {
                    node_ip: format!(
                        "10.{}.{}.{}",
                        self.below(4),
                        self.below(256),
                        self.below(256)
                    )
                    .parse()
                    .unwrap(),
                    node_port: 30000 + self.below(2000) as u16,
                    state: match self.below(10) {
                        0 => ServerState::Drain,
                        1 => ServerState::Maint,
                        _ => ServerState::Ready,
                    },
                    service: (self.below(2) == 0).then(|| "traefik".to_string()),
                    weight: (self.below(4) == 0).then(|| self.below(257) as u16),
                    lease: true,
                };
                if current.as_ref() == Some(&spec) {
                    spec.node_port += 1;
                }
                Change::PutServer {
                    frontend_port: port,
                    node,
                    mode,
                    spec,
                    frontend: None,
                }
            };
            let effect = self
                .state
                .apply(&change)
                .expect("the workload only makes valid changes");
            assert_ne!(effect, Effect::Unchanged);
            batch.push(change);
        }
        batch
    }

    /// Replays batches up to `generation`; false if no batch ends exactly there.
    fn advance_to(&mut self, generation: u64) -> bool {
        while self.state.generation < generation {
            self.next_batch();
        }
        self.state.generation == generation
    }
}

fn options_to_env(o: StoreOptions) -> String {
    format!("{},{}", o.compact_after_records, o.compact_after_bytes)
}

fn options_from_env(s: &str) -> StoreOptions {
    let (records, bytes) = s.split_once(',').expect("records,bytes");
    StoreOptions {
        compact_after_records: records.parse().unwrap(),
        compact_after_bytes: bytes.parse().unwrap(),
    }
}

/// The child: commits batches until killed, acknowledging each on stdout. A no-op in a normal
/// test run.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let options = options_from_env(&std::env::var(OPTIONS_ENV).expect("options"));
    let (mut store, loaded) = Store::open_with(&dir, options).expect("child: open the store");
    let mut workload = Workload::new();
    assert!(
        workload.advance_to(loaded.generation),
        "child: generation {} is no batch boundary",
        loaded.generation
    );
    assert_eq!(
        workload.state, loaded,
        "child: loaded state differs from the replay"
    );
    let mut out = std::io::stdout().lock();
    for _ in 0..CHILD_MAX_BATCHES {
        let batch = workload.next_batch();
        store
            .commit(&workload.state, &batch)
            .expect("child: commit");
        // Acknowledged: the parent holds the store to this from now on.
        if writeln!(out, "ACK {}", workload.state.generation)
            .and_then(|()| out.flush())
            .is_err()
        {
            return; // the parent is gone
        }
    }
}

/// Parses an acknowledgement; libtest may have written `test crash_child ... ` before it.
fn ack(line: &str) -> Option<u64> {
    line.rsplit_once("ACK ")?.1.trim().parse().ok()
}

/// What the kill interrupted, judged from the files it left (for the log only).
fn interrupted(dir: &Path) -> &'static str {
    if dir.join("snapshot.json.tmp").exists() {
        return "snapshot write";
    }
    let snapshot_generation = std::fs::read(dir.join(SNAPSHOT_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<DesiredState>(&b).ok())
        .map_or(0, |s| s.generation);
    let journal = std::fs::read(dir.join(JOURNAL_FILE)).unwrap_or_default();
    if !journal.is_empty() && !journal.ends_with(b"\n") {
        return "journal append";
    }
    let first_generation = journal
        .split(|&b| b == b'\n')
        .next()
        .and_then(|l| l.get(9..))
        .and_then(|j| serde_json::from_slice::<serde_json::Value>(j).ok())
        .and_then(|v| v["generation"].as_u64());
    match first_generation {
        Some(g) if snapshot_generation > 0 && g <= snapshot_generation => {
            "between snapshot and journal truncation"
        }
        _ => "other",
    }
}

#[test]
fn kill_9_at_any_instant_loses_nothing_acknowledged() {
    let seed = match std::env::var(SEED_ENV) {
        Ok(s) => s.parse().expect("seed is a u64"),
        Err(_) => RandomState::new().hash_one(std::process::id()) | 1,
    };
    let mut rng = Workload {
        rng: seed,
        state: DesiredState::default(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let mut generation_before = 0;
    let mut log = Vec::new();

    for round in 0..ROUNDS {
        if started.elapsed() > BUDGET {
            break;
        }
        let context = format!("round {round} ({SEED_ENV}={seed})");
        let dir = tmp.path().join(format!("state-{}", round / ROUNDS_PER_DIR));
        if round % ROUNDS_PER_DIR == 0 {
            generation_before = 0;
        }
        let options = match round % 4 {
            0 => StoreOptions::default(),
            1 => StoreOptions {
                compact_after_records: 2 + rng.below(30),
                ..StoreOptions::default()
            },
            2 => StoreOptions {
                compact_after_bytes: 1024 + rng.below(32 * 1024),
                ..StoreOptions::default()
            },
            _ => StoreOptions {
                compact_after_records: 1 + rng.below(8),
                compact_after_bytes: 1024 + rng.below(8 * 1024),
            },
        };
        let kill_after = if rng.below(6) == 0 {
            0
        } else {
            1 + rng.below(250)
        };

        let mut child = Command::new(&exe)
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &dir)
            .env(OPTIONS_ENV, options_to_env(options))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (done, watchdog_rx) = mpsc::channel::<()>();
        let pid = child.id();
        let watchdog = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = watchdog_rx.recv_timeout(CHILD_TIMEOUT) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return true;
            }
            false
        });

        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut last_ack = None;
        let mut acks = 0;
        let mut line = String::new();
        while acks < kill_after {
            line.clear();
            if stdout.read_line(&mut line).unwrap() == 0 {
                break; // the child exited: judged below
            }
            if let Some(g) = ack(&line) {
                last_ack = Some(g);
                acks += 1;
            }
        }
        // The acknowledgement only says where the child was a moment ago; a random extra
        // delay (this is not synchronisation: any instant is as good) moves the kill off the
        // start of the next commit, into fsyncs, snapshot writes and truncations.
        let jitter = Duration::from_micros(rng.below(4000));
        let jitter_start = Instant::now();
        while jitter_start.elapsed() < jitter {
            std::hint::spin_loop();
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        done.send(()).unwrap();
        assert!(!watchdog.join().unwrap(), "{context}: child hung");
        // Everything the child printed before dying was acknowledged too.
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).unwrap();
        for l in rest.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            if let Some(g) = ack(l) {
                last_ack = Some(g);
            }
        }
        if status.signal() != Some(9) {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("{context}: the child exited by itself ({status}):\n{err}");
        }
        let what = interrupted(&dir);

        // The child acknowledged `last_ack` (or, if it acknowledged nothing, started from
        // `generation_before`), and at most one more batch can have reached the disk.
        let acknowledged = last_ack.unwrap_or(generation_before);
        let (store, loaded) = Store::open_with(&dir, options)
            .unwrap_or_else(|e| panic!("{context}: the store does not load: {e}"));
        assert!(
            loaded.generation >= acknowledged,
            "{context}: lost acknowledged commits: loaded generation {}, acknowledged {acknowledged}",
            loaded.generation
        );
        let mut workload = Workload::new();
        assert!(
            workload.advance_to(acknowledged),
            "{context}: acknowledged generation {acknowledged} is no batch boundary"
        );
        if loaded.generation > acknowledged {
            workload.next_batch();
        }
        assert_eq!(
            workload.state.generation, loaded.generation,
            "{context}: loaded generation is neither the last acknowledged batch nor the one after"
        );
        assert!(
            workload.state == loaded,
            "{context}: the loaded state differs from the replay at generation {}",
            loaded.generation
        );
        assert_eq!(store.generation(), loaded.generation);
        drop(store);
        log.push(format!(
            "round {round}: acked {acks} up to {acknowledged}, loaded {}, kill during {what}",
            loaded.generation
        ));
        generation_before = loaded.generation;
    }
    assert!(
        log.len() >= 5,
        "only {} rounds in the time budget",
        log.len()
    );
    eprintln!("{SEED_ENV}={seed}\n{}", log.join("\n"));
}
