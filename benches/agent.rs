//! The agent end to end, beside a baseline measured in the same run: a signed address change
//! from request to answer (HAProxy updated) against the same `set server addr` sent straight to
//! HAProxy's socket; durable changes per second with 1, 8 and 32 clients; the agent's resident
//! memory idle and holding 10,000 servers. Prints one table.
//!
//! `cargo bench --bench agent` (the figures and targets are in docs/performance.md).

#[path = "../tests/common/mod.rs"]
mod common;

use common::free_port;
mod util;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use lbagent::auth::signed_headers;
use lbagent::runtime::{ClientOptions, Command as Cmd, Endpoint, RuntimeClient, ServerRef};

struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
    secret: Vec<u8>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent() -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_lbagent"))
        .arg("--state-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--frontend-bind",
            "127.0.0.1",
            "--allow-node-ports",
            "1-65535",
        ])
        .args([
            "--max-servers-per-frontend",
            "10000",
            "--reconcile-interval",
            "5",
        ])
        // The HAProxy under test, as for the integration tests (`LBAGENT_TEST_HAPROXY`).
        .arg("--haproxy-bin")
        .arg(common::haproxy_bin())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start lbagent");
    let keys = dir.path().join("data/keys.toml");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && keys.exists();
        if up {
            break;
        }
        assert!(Instant::now() < deadline, "lbagent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&keys).unwrap();
    let table: toml::Table = text.parse().unwrap();
    let secret = table["default"].as_str().unwrap().as_bytes().to_vec();
    Agent {
        child,
        dir,
        url,
        secret,
    }
}

impl Agent {
    fn signer(&self) -> Signer {
        Signer {
            url: self.url.clone(),
            secret: self.secret.clone(),
        }
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn admin_socket(dir: &Path) -> PathBuf {
    dir.join("data/haproxy/admin.sock")
}

fn main() {
    // `cargo test --benches` runs benches with `--bench` absent: keep that quick.
    let quick = !util::measuring();
    let samples = if quick { 50 } else { 2000 };
    let window = Duration::from_millis(if quick { 300 } else { 3000 });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let agent = start_agent();
    let idle_rss = rss_kib(agent.child.id());
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let fe = free_port();
    let rows = rt.block_on(async {
        // A frontend with one node (a reload), then only runtime changes.
        let path = format!("/v1/frontends/{fe}/servers/node-a");
        assert_eq!(
            put(
                &client,
                &agent.signer(),
                &path,
                r#"{"node_ip":"127.0.0.2","node_port":30001,"state":"maint"}"#.into()
            )
            .await,
            200
        );

        // Baseline: the same address change straight to HAProxy's socket.
        let mut rc = RuntimeClient::new(
            Endpoint::Unix(admin_socket(agent.dir.path())),
            ClientOptions::default(),
        );
        let server = ServerRef::new(&format!("be_{fe}"), "node-a").unwrap();
        let mut direct = Vec::with_capacity(samples);
        for i in 0..samples {
            let cmd = Cmd::SetServerAddr {
                server: server.clone(),
                addr: format!("127.0.0.{}", 2 + i % 2).parse().unwrap(),
                port: Some(30001),
            };
            let t = Instant::now();
            rc.execute(&cmd).await.unwrap();
            direct.push(t.elapsed());
        }
        direct.sort();

        // The agent: signed PUT, stored (fsync) and applied, over one keep-alive connection.
        let mut via_agent = Vec::with_capacity(samples);
        for i in 0..samples {
            let body = format!(
                r#"{{"node_ip":"127.0.0.{}","node_port":30001,"state":"maint"}}"#,
                2 + i % 2
            );
            let t = Instant::now();
            assert_eq!(put(&client, &agent.signer(), &path, body).await, 200);
            via_agent.push(t.elapsed());
        }
        via_agent.sort();

        // What the disk alone gives: the same size of append and fdatasync the store does.
        let mut fsyncs = Vec::with_capacity(samples);
        {
            use std::io::Write;
            let mut f = std::fs::File::create(agent.dir.path().join("fsync-probe")).unwrap();
            let line = [b'x'; 200];
            for _ in 0..samples {
                f.write_all(&line).unwrap();
                let t = Instant::now();
                f.sync_data().unwrap();
                fsyncs.push(t.elapsed());
            }
        }
        fsyncs.sort();

        // Throughput with 1, 8, 32 clients, each moving its own node back and forth.
        let mut throughput = Vec::new();
        for clients in [1usize, 8, 32] {
            let done = Arc::new(AtomicU64::new(0));
            let deadline = Instant::now() + window;
            let mut tasks = Vec::new();
            for c in 0..clients {
                let client = client.clone();
                let done = done.clone();
                let path = format!("/v1/frontends/{fe}/servers/n{clients}-{c}");
                let agent_url = agent.url.clone();
                let secret = agent.secret.clone();
                tasks.push(tokio::spawn(async move {
                    let a = Signer {
                        url: agent_url,
                        secret,
                    };
                    let mut i = 0u32;
                    while Instant::now() < deadline {
                        let body = format!(
                            r#"{{"node_ip":"127.0.0.{}","node_port":30001,"state":"maint"}}"#,
                            2 + i % 2
                        );
                        let status = put(&client, &a, &path, body).await;
                        assert!(status == 200, "status {status}");
                        done.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                }));
            }
            let t = Instant::now();
            for task in tasks {
                task.await.unwrap();
            }
            let n = done.load(Ordering::Relaxed);
            throughput.push((clients, n as f64 / t.elapsed().as_secs_f64()));
        }

        // Memory with 10,000 servers (in maintenance: no health checks to run).
        let target = if quick { 200 } else { 10_000 };
        let have = 1 + throughput.iter().map(|(c, _)| *c).sum::<usize>();
        let fill = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..32 {
            let client = client.clone();
            let a = Signer {
                url: agent.url.clone(),
                secret: agent.secret.clone(),
            };
            let fill = fill.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = c;
                while i < target - have {
                    let path = format!("/v1/frontends/{fe}/servers/fill-{i}");
                    let body = format!(
                        r#"{{"node_ip":"127.1.{}.{}","node_port":30001,"state":"maint"}}"#,
                        i / 250,
                        1 + i % 250
                    );
                    assert_eq!(put(&client, &a, &path, body).await, 200);
                    fill.fetch_add(1, Ordering::Relaxed);
                    i += 32;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let servers = have as u64 + fill.load(Ordering::Relaxed);
        (direct, via_agent, fsyncs, throughput, servers)
    });
    let (direct, via_agent, fsyncs, throughput, servers) = rows;
    let full_rss = rss_kib(agent.child.id());

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("\nlbagent end to end ({samples} sequential changes; throughput over {window:?})");
    println!("| measure | lbagent | baseline | ratio | target |");
    println!("| --- | ---: | ---: | ---: | --- |");
    for (name, p) in [
        ("p50 address change (ms)", 0.50),
        ("p99 address change (ms)", 0.99),
    ] {
        let a = ms(percentile(&via_agent, p));
        let b = ms(percentile(&direct, p));
        println!(
            "| {name} | {a:.3} | {b:.3} (set server addr on the socket) | {:.1}× | {} |",
            a / b,
            if p > 0.9 { "≤ 2 ms" } else { "" }
        );
    }
    for (name, p) in [
        ("p50 bare fdatasync (ms)", 0.50),
        ("p99 bare fdatasync (ms)", 0.99),
    ] {
        println!(
            "| {name} | | {:.3} (200-byte append + fdatasync, same disk) | | |",
            ms(percentile(&fsyncs, p))
        );
    }
    let direct_rate =
        1.0 / direct.iter().map(|d| d.as_secs_f64()).sum::<f64>() * direct.len() as f64;
    for (clients, rate) in &throughput {
        println!(
            "| durable changes/s, {clients} client{} | {rate:.0} | {direct_rate:.0} (socket, 1 client) | {:.2}× | {} |",
            if *clients == 1 { "" } else { "s" },
            rate / direct_rate,
            if *clients == 32 { "≥ 5,000/s" } else { "" }
        );
    }
    println!(
        "| RSS idle (MiB) | {:.1} | | | ≤ 15 MB |",
        idle_rss as f64 / 1024.0
    );
    println!(
        "| RSS with {servers} servers (MiB) | {:.1} | | | ≤ 30 MB at 10,000 |",
        full_rss as f64 / 1024.0
    );
}

/// What signing a request needs; `Send`, so client tasks can own one.
struct Signer {
    url: String,
    secret: Vec<u8>,
}

async fn put(client: &HttpClient, a: &Signer, path: &str, body: String) -> u16 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut req = Request::builder()
        .method(Method::PUT)
        .uri(format!("{}{path}", a.url));
    for (k, v) in signed_headers("default", &a.secret, "PUT", path, body.as_bytes(), now) {
        req = req.header(k, v);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}
