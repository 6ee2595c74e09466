//! Floods of slow connections, for the limits tests and the flood bench: many connections to
//! the agent, from chosen loopback source addresses, each sending an unfinished body or
//! unfinished headers and then holding on, as an attacker's tool would. The agent's memory is
//! read from `/proc/<pid>/status`.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// What each connection of a flood sends, and then holds.
#[derive(Clone, Debug)]
pub enum Hold {
    /// A PUT announcing `content_length` body bytes of which `sent` are sent. `auth`: with
    /// well-formed auth headers for key `default` (a fresh timestamp, a unique nonce, a wrong
    /// signature), so the head passes every check made before the body; else none.
    Body {
        content_length: usize,
        sent: usize,
        auth: bool,
    },
    /// A request line and `bytes` of header lines, never ended by the blank line.
    Headers { bytes: usize },
}

/// A flood, held open until dropped.
pub struct Flood {
    runtime: Option<tokio::runtime::Runtime>,
    stop: CancellationToken,
    /// Connections still open from the flood's side (not closed nor answered by the agent).
    pub open: Arc<AtomicUsize>,
    /// How the agent ended the others: `"status 503"`, `"closed"`, `"connect failed"`, ...
    pub outcomes: Arc<Mutex<std::collections::BTreeMap<String, usize>>>,
    /// Connections made.
    pub connected: usize,
}

fn head(i: usize, hold: &Hold, now_unix: u64) -> Vec<u8> {
    let path = format!("/v1/frontends/10000/servers/flood-{i}");
    match hold {
        Hold::Body {
            content_length,
            sent,
            auth,
        } => {
            let mut h = format!(
                "PUT {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\n"
            );
            if *auth {
                h.push_str(&format!(
                    "X-Lbagent-Key: default\r\nX-Lbagent-Timestamp: {now_unix}\r\nX-Lbagent-Nonce: flood{i:0>27}\r\nX-Lbagent-Signature: sha256={}\r\n",
                    "0".repeat(64)
                ));
            }
            h.push_str("\r\n");
            let mut bytes = h.into_bytes();
            bytes.resize(bytes.len() + sent, b' ');
            bytes
        }
        Hold::Headers { bytes } => {
            let mut h = format!("PUT {path} HTTP/1.1\r\nHost: agent\r\n").into_bytes();
            let mut n = 0;
            while h.len() < *bytes {
                h.extend_from_slice(format!("X-Pad-{n}: {}\r\n", "a".repeat(1000)).as_bytes());
                n += 1;
            }
            h
        }
    }
}

impl Flood {
    /// Opens `per_source` connections from each of `sources` to `addr`, each sending `hold`,
    /// and returns once every one has connected and sent what it could within `within`.
    pub fn open(
        addr: SocketAddr,
        sources: &[IpAddr],
        per_source: usize,
        hold: Hold,
        within: Duration,
    ) -> Flood {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let stop = CancellationToken::new();
        let open = Arc::new(AtomicUsize::new(0));
        let outcomes = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
        let sent = Arc::new(AtomicUsize::new(0));
        let connected = Arc::new(AtomicUsize::new(0));
        let total = sources.len() * per_source;
        let now = super::agent::now_unix();
        let count = |outcomes: &Mutex<std::collections::BTreeMap<String, usize>>, what: String| {
            *outcomes.lock().unwrap().entry(what).or_insert(0) += 1;
        };
        for (s, source) in sources.iter().enumerate() {
            for k in 0..per_source {
                let i = s * per_source + k;
                let bytes = head(i, &hold, now);
                let (stop, open, outcomes, sent, connected) = (
                    stop.clone(),
                    open.clone(),
                    outcomes.clone(),
                    sent.clone(),
                    connected.clone(),
                );
                let source = *source;
                runtime.spawn(async move {
                    let socket = match source {
                        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
                    };
                    let connect = async {
                        let socket = socket?;
                        socket.bind(SocketAddr::new(source, 0))?;
                        socket.connect(addr).await
                    };
                    let mut stream =
                        match tokio::time::timeout(Duration::from_secs(10), connect).await {
                            Ok(Ok(s)) => s,
                            _ => {
                                sent.fetch_add(1, Ordering::SeqCst);
                                count(&outcomes, "connect failed".into());
                                return;
                            }
                        };
                    connected.fetch_add(1, Ordering::SeqCst);
                    open.fetch_add(1, Ordering::SeqCst);
                    let write = tokio::time::timeout(within, stream.write_all(&bytes)).await;
                    sent.fetch_add(1, Ordering::SeqCst);
                    let mut answer = Vec::new();
                    let outcome = match write {
                        Ok(Err(_)) => "closed while sending".to_string(),
                        _ => loop {
                            let mut buf = [0u8; 512];
                            tokio::select! {
                                r = stream.read(&mut buf) => match r {
                                    Ok(0) | Err(_) => break if answer.is_empty() {
                                        "closed".to_string()
                                    } else {
                                        status_of(&answer)
                                    },
                                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                                },
                                _ = stop.cancelled() => return,
                            }
                        },
                    };
                    open.fetch_sub(1, Ordering::SeqCst);
                    count(&outcomes, outcome);
                });
            }
        }
        let deadline = Instant::now() + within + Duration::from_secs(10);
        while sent.load(Ordering::SeqCst) < total {
            assert!(
                Instant::now() < deadline,
                "the flood did not finish sending: {} of {total}",
                sent.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Flood {
            runtime: Some(runtime),
            stop,
            open,
            outcomes,
            connected: connected.load(Ordering::SeqCst),
        }
    }

    /// Connections the agent has neither answered nor closed.
    pub fn held(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    pub fn outcomes(&self) -> std::collections::BTreeMap<String, usize> {
        self.outcomes.lock().unwrap().clone()
    }
}

fn status_of(answer: &[u8]) -> String {
    let text = String::from_utf8_lossy(answer);
    match text.split(' ').nth(1) {
        Some(code) if text.starts_with("HTTP/1.1 ") => format!("status {code}"),
        _ => "closed after garbage".into(),
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// `n` loopback source addresses from 127.0.0.`first` on: distinct peers to the agent.
pub fn loopback_sources(first: u8, n: u8) -> Vec<IpAddr> {
    (0..n)
        .map(|i| IpAddr::from([127, 0, 0, first + i]))
        .collect()
}

/// Raises this process's open-file limit to its hard limit, for floods of thousands of
/// connections; returns the limit now in force.
pub fn raise_file_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    getrlimit(Resource::RLIMIT_NOFILE).unwrap().0
}

/// A managed agent with one frontend whose server (`node-a`) the legitimate client renews,
/// and the frontend's port.
pub fn agent_with_a_frontend() -> (super::agent::Agent, u16) {
    assert!(raise_file_limit() >= 6000, "a flood needs 6000 open files");
    let agent = super::agent::Agent::managed();
    let port = super::free_port();
    agent.put_ok(port, "node-a", &renewal_body(), "reload");
    (agent, port)
}

fn renewal_body() -> serde_json::Value {
    super::agent::body("127.0.0.1", 30080, serde_json::json!({}))
}

/// The legitimate client's signed change (a renewal of `node-a`, as a sidecar's heartbeat),
/// from `source`, on a fresh connection; the answer and how long it took.
pub fn signed_change(
    agent: &super::agent::Agent,
    source: IpAddr,
    port: u16,
) -> std::io::Result<(super::agent::Response, Duration)> {
    let path = format!("/v1/frontends/{port}/servers/node-a");
    let b = renewal_body().to_string();
    let h = agent.auth_headers("PUT", &path, b.as_bytes());
    let started = Instant::now();
    let r = super::agent::try_http_from(source, agent.addr, "PUT", &path, &h, b.as_bytes())?;
    Ok((r, started.elapsed()))
}

/// Waits until the agent has closed what a dropped flood left.
pub fn wait_flood_gone(agent: &super::agent::Agent) {
    super::agent::eventually(Duration::from_secs(30), "flood connections closed", || {
        let open = agent.metric("lbagent_http_connections");
        (open <= 2.0).then_some(()).ok_or(format!("{open} open"))
    });
}
