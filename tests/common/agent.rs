//! A real `lbagent` for black-box tests, in managed mode (it runs its own HAProxy) or attached
//! mode (the harness runs HAProxy, the agent drives it), with a small blocking HTTP/1.1 client
//! that signs requests, echo backends on loopback aliases, and readers of HAProxy's own sockets.
//!
//! Every process started here — the agent, an attached HAProxy, and whatever HAProxy a managed
//! agent left behind after a `kill -9` — is stopped when the handle drops, also when the test
//! panics. Nothing waits with a bare sleep: every wait polls a condition until a deadline.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lbagent::runtime::parse::{parse_servers_state, parse_show_proc, ProcList, ServerState};
use serde_json::Value;

use super::{answers, free_port, haproxy_bin, send_signal};

/// How long the agent may take to answer `/healthz` with 200 after it starts.
pub const START_DEADLINE: Duration = Duration::from_secs(20);

/// Unix seconds now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// An HTTP answer.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}), status {}: {:?}", self.status, self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts a JSON error answer `{"error": code, "message": ...}` with this status.
    pub fn assert_error(&self, status: u16, code: &str, what: &str) {
        assert_eq!(self.status, status, "{what}: {self:?}");
        let v = self.json();
        assert_eq!(v["error"], code, "{what}: {self:?}");
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: no message: {self:?}"
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{what}"
        );
    }
}

/// Reads one HTTP/1.1 response (Content-Length body, or until EOF without one).
fn read_response(s: &mut impl Read) -> std::io::Result<Response> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before a full response head: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad status line {status_line:?}"),
            )
        })?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = buf[head_end + 4..].to_vec();
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    match len {
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None => {
            s.read_to_end(&mut body)?;
        }
    }
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn write_request(
    s: &mut impl Write,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
    keep_alive: bool,
) -> std::io::Result<()> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !keep_alive {
        req.push_str("Connection: close\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes)
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    with_timeouts(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?)
}

/// A connection from the loopback source address `source` (e.g. 127.0.0.2), to look like
/// another peer to the agent.
pub fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let (std::net::IpAddr::V4(src), SocketAddr::V4(dst)) = (source, addr) else {
        return Err(std::io::Error::other("connect_from: IPv4 only"));
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(std::net::SocketAddrV4::new(src, 0)),
    )?;
    // On loopback a connect is answered at once, or refused.
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(dst))?;
    with_timeouts(TcpStream::from(fd))
}

fn with_timeouts(s: TcpStream) -> std::io::Result<TcpStream> {
    // A reload is confirmed within the agent's 15 s deadline; leave room above it.
    s.set_read_timeout(Some(Duration::from_secs(40)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One request on a fresh connection (`Connection: close`).
pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<Response> {
    exchange(connect(addr)?, method, path, headers, body)
}

/// [`try_http`] from the loopback source address `source`.
pub fn try_http_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<Response> {
    exchange(connect_from(source, addr)?, method, path, headers, body)
}

fn exchange(
    mut s: TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<Response> {
    write_request(&mut s, method, path, headers, body, false)?;
    read_response(&mut s)
}

/// `bytes` sent as they are on a fresh connection, and the answer: for requests the other
/// helpers cannot write (a chunked body, say).
pub fn raw_http(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<Response> {
    let mut s = connect(addr)?;
    s.write_all(bytes)?;
    read_response(&mut s)
}

/// [`try_http`] that panics on a transport error.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Response {
    try_http(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path} to {addr}: {e}"))
}

/// Sends only the request head, announcing `content_length` bytes, and reads the answer without
/// sending the body: for limits the server must enforce from the head alone. Not sending the
/// body keeps the server from closing on unread data, which would reset the connection.
pub fn http_head_only(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    content_length: usize,
) -> Response {
    let mut s = connect(addr).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {content_length}\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    read_response(&mut s).unwrap()
}

/// A keep-alive connection to the agent.
pub struct KeepAlive {
    stream: TcpStream,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> std::io::Result<KeepAlive> {
        Ok(KeepAlive {
            stream: connect(addr)?,
        })
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        write_request(&mut self.stream, method, path, headers, body, true)?;
        read_response(&mut self.stream)
    }
}

// ---------------------------------------------------------------------------------------------
// lbctl and the sidecar's helpers
// ---------------------------------------------------------------------------------------------

/// Answers every HTTP request with the IP in `ip`, as a "what is my IP" endpoint would.
pub fn ip_endpoint(ip: Arc<Mutex<String>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let body = ip.lock().unwrap().clone();
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

/// `lbctl phone-home` for `node-1`: frontend `fe` → `node_port`, its IP read from `ip_url`
/// (an [`ip_endpoint`]), every second, signed with the keys file `keys`.
pub fn phone_home(agent_url: &str, keys: &Path, fe: u16, node_port: u16, ip_url: &str) -> Command {
    let mut c = lbctl();
    c.args(["phone-home", "--agent", agent_url])
        .args(["--frontend-port", &fe.to_string()])
        .args(["--node-port", &node_port.to_string()])
        .args([
            "--node",
            "node-1",
            "--node-ip-from",
            &format!("url:{ip_url}"),
        ])
        .arg("--key-file")
        .arg(keys)
        .args(["--interval", "1s"]);
    c
}

/// A running `lbctl phone-home`, killed when dropped.
pub struct Sidecar(pub Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `lbctl`, without the environment variables that would stand in for its flags.
pub fn lbctl() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lbctl"));
    c.env_remove("LBAGENT_KEY")
        .env_remove("NODE_NAME")
        .env_remove("NODE_IP")
        .env_remove("LBAGENT_CA_FILE");
    c
}

/// The old webhook's shared token, as [`legacy_agent`] configures it.
pub const LEGACY_TOKEN: &str = "old-shared-token-1234";

/// A managed agent with the legacy endpoint on (`--legacy-token-file`, 0600, holding
/// [`LEGACY_TOKEN`]); keep the directory for as long as the agent runs.
pub fn legacy_agent() -> (Agent, tempfile::TempDir) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, format!("{LEGACY_TOKEN}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent = Agent::managed_with(Options {
        extra: vec!["--legacy-token-file".into(), path.display().to_string()],
        ..Options::default()
    });
    (agent, dir)
}

/// `POST /hooks/update-haproxy` with `body`, as the old sidecars send it (`token` in their
/// header when given).
pub fn legacy_hook(agent: &Agent, token: Option<&str>, body: &str) -> Response {
    let mut headers = vec![("Content-Type", "application/json".to_string())];
    if let Some(t) = token {
        headers.push(("X-Funkypenguin-Token", t.to_string()));
    }
    http(
        agent.addr,
        "POST",
        "/hooks/update-haproxy",
        &headers,
        body.as_bytes(),
    )
}

// ---------------------------------------------------------------------------------------------
// Echo backends and connections through HAProxy
// ---------------------------------------------------------------------------------------------

/// A TCP listener that answers every connection with one line (`<reply>\n`) and closes it.
pub struct Echo {
    pub addr: SocketAddr,
    pub reply: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    /// Listens on `ip` (a loopback address such as 127.0.0.2) on a port the kernel picks.
    pub fn start(ip: &str, reply: &str) -> Echo {
        Echo::bind(&format!("{ip}:0"), reply).unwrap_or_else(|e| panic!("bind {ip}:0: {e}"))
    }

    /// Listens on exactly `addr`.
    pub fn bind(addr: &str, reply: &str) -> std::io::Result<Echo> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let line = format!("{reply}\n");
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(mut c) = conn {
                        // Health checks close at once: a failed write is fine.
                        let _ = c.write_all(line.as_bytes());
                        let _ = c.shutdown(Shutdown::Write);
                    }
                }
            })
        };
        Ok(Echo {
            addr,
            reply: reply.to_string(),
            stop,
            thread: Some(thread),
        })
    }

    /// Two echoes on one port of two loopback addresses (a node whose IP changes, its port
    /// kept): a port free on `ip_a` may be taken on `ip_b` by another test running beside this
    /// one, so another port is tried then (20 at most).
    pub fn pair(ip_a: &str, reply_a: &str, ip_b: &str, reply_b: &str) -> (Echo, Echo) {
        let mut last = None;
        for _ in 0..20 {
            let a = Echo::start(ip_a, reply_a);
            match Echo::bind(&format!("{ip_b}:{}", a.port()), reply_b) {
                Ok(b) => return (a, b),
                Err(e) => last = Some(e),
            }
        }
        panic!("no port free on both {ip_a} and {ip_b} in 20 tries: {last:?}");
    }

    pub fn ip(&self) -> String {
        self.addr.ip().to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects to 127.0.0.1:`port` and reads the one line the backend behind it sends.
pub fn through(port: u16) -> Result<String, String> {
    through_addr(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Connects to `addr` and reads the one line the backend behind it sends.
pub fn through_addr(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.contains(&b'\n') {
                    break;
                }
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    match text.split_once('\n') {
        Some((line, _)) => Ok(line.to_string()),
        None => Err(format!("no reply line (got {text:?})")),
    }
}

/// Polls until a connection through `port` answers `reply`.
pub fn wait_reaches(port: u16, reply: &str, within: Duration) {
    wait_reaches_at(SocketAddr::from(([127, 0, 0, 1], port)), reply, within)
}

/// Polls until a connection to `addr` answers `reply`.
pub fn wait_reaches_at(addr: SocketAddr, reply: &str, within: Duration) {
    let mut last;
    let deadline = Instant::now() + within;
    loop {
        match through_addr(addr) {
            Ok(l) if l == reply => return,
            Ok(l) => last = format!("answered {l:?}"),
            Err(e) => last = e,
        }
        assert!(
            Instant::now() < deadline,
            "{addr} did not reach {reply:?} within {within:?}: last {last}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether something accepts connections on 127.0.0.1:`port`.
pub fn accepts(port: u16) -> bool {
    accepts_at(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Whether something accepts connections on `addr`.
pub fn accepts_at(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// `lbctl health --agent URL` with `extra` flags, `LBAGENT_URL` unset.
pub fn lbctl_health(url: &str, extra: &[&str]) -> std::process::Output {
    lbctl()
        .env_remove("LBAGENT_URL")
        .args(["health", "--agent", url])
        .args(extra)
        .output()
        .expect("run lbctl health")
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// Pids of live HAProxy processes whose command line contains `needle` (a unique temp path),
/// read from /proc: the HAProxy processes of one test, whoever started them.
pub fn pids_with(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        // Zombies have an empty command line; they are gone for our purposes. The program is
        // told by its own name (argv[0], `/usr/sbin/haproxy` also behind a version wrapper),
        // not by the word anywhere: the agent's `--haproxy-bin` names it too.
        let cmd = String::from_utf8_lossy(&cmd).into_owned();
        let program = cmd.split('\0').next().unwrap_or_default();
        let is_haproxy = Path::new(program)
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("haproxy"));
        if is_haproxy && cmd.contains(needle) {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

pub fn stop_child(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    send_signal(child.id(), "TERM");
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------------------------

/// HAProxy run by the harness for an attached agent.
struct AttachedHaproxy {
    child: Child,
}

/// How an agent is started.
#[derive(Clone, Debug)]
pub struct Options {
    pub allow_node_ports: String,
    /// More flags, appended.
    pub extra: Vec<String>,
    /// Attached mode: more `-f` paths (files or directories) for HAProxy, between the main file
    /// and the agent's, as an operator's `conf.d` would be.
    pub haproxy_configs: Vec<PathBuf>,
    /// The agent serves TLS (its flags are in `extra`): how the harness's own requests trust it.
    pub tls: Option<ClientTls>,
    /// `--frontend-bind` (default 127.0.0.1).
    pub frontend_bind: String,
    /// Run the agent (and so its managed HAProxy) inside this network namespace; the harness's
    /// requests are made from inside it too (see `netns.rs`).
    pub netns: Option<String>,
}

/// How the harness trusts an agent serving TLS.
#[derive(Clone, Debug)]
pub enum ClientTls {
    /// This client configuration.
    Config(Arc<rustls::ClientConfig>),
    /// The certificate the agent made in its state dir (`--tls-self-signed`), read at each
    /// connection (it does not exist before the first start).
    SelfSigned,
}

/// A client configuration trusting the CA certificates in `ca_pem`, presenting `client`
/// (certificate chain and key, PEM) when given.
pub fn trusting(ca_pem: &str, client: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.expect("CA PEM")).expect("a CA certificate");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("client certificate PEM"),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("client key PEM"),
            )
            .expect("client certificate and key"),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

impl Default for Options {
    fn default() -> Self {
        Options {
            allow_node_ports: "1-65535".into(),
            extra: Vec::new(),
            haproxy_configs: Vec::new(),
            tls: None,
            frontend_bind: "127.0.0.1".into(),
            netns: None,
        }
    }
}

/// A connection to the agent's API, plain or TLS.
pub enum ApiConn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl ApiConn {
    /// Connects to `addr`, with TLS when `tls` is given (the server name is 127.0.0.1).
    pub fn connect(
        addr: SocketAddr,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> std::io::Result<ApiConn> {
        let tcp = connect(addr)?;
        let Some(config) = tls else {
            return Ok(ApiConn::Plain(tcp));
        };
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let mut conn =
            rustls::ClientConnection::new(config.clone(), name).map_err(std::io::Error::other)?;
        let mut tcp = tcp;
        // The handshake now, so a refused one is this call's error.
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        Ok(ApiConn::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
    }

    /// One request, `Connection: close`.
    pub fn request(
        mut self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        write_request(&mut self, method, path, headers, body, false)?;
        read_response(&mut self)
    }
}

impl Read for ApiConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            ApiConn::Plain(s) => s.read(buf),
            // A close without close_notify after the whole answer is the server's business.
            ApiConn::Tls(s) => match s.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
                other => other,
            },
        }
    }
}

impl Write for ApiConn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ApiConn::Plain(s) => s.write(buf),
            ApiConn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ApiConn::Plain(s) => s.flush(),
            ApiConn::Tls(s) => s.flush(),
        }
    }
}

/// A running `lbagent`.
pub struct Agent {
    /// Holds everything: state dir, keys, (attached) HAProxy's files, logs.
    pub dir: tempfile::TempDir,
    /// Canonical path of `dir`, as HAProxy's command lines show it.
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub addr: SocketAddr,
    pub key_id: String,
    pub secret: Vec<u8>,
    pub keys_path: PathBuf,
    /// HAProxy's admin stats socket, master CLI, managed config and log.
    pub admin: PathBuf,
    pub master: PathBuf,
    pub managed_cfg: PathBuf,
    pub haproxy_log: PathBuf,
    pub attached: bool,
    options: Options,
    child: Option<Child>,
    haproxy: Option<AttachedHaproxy>,
    starts: u32,
}

/// Attached mode's main config: `@DIR@` is the HAProxy directory.
const ATTACHED_MAIN: &str = "global
    stats socket @DIR@/admin.sock mode 600 level admin expose-fd listeners
    stats timeout 1m
    maxconn 2000

defaults
    mode tcp
    timeout connect 1s
    timeout client 10s
    timeout server 10s
";

impl Agent {
    /// A managed agent with the default options.
    pub fn managed() -> Agent {
        Agent::managed_with(Options::default())
    }

    pub fn managed_with(options: Options) -> Agent {
        let mut a = Agent::managed_unstarted(options);
        a.start();
        a
    }

    /// [`Agent::managed_with`], started without waiting for `/healthz` to be 200 (an agent
    /// expected to start unhealthy).
    pub fn managed_with_answering(options: Options) -> Agent {
        let mut a = Agent::managed_unstarted(options);
        a.start_answering();
        a
    }

    fn managed_unstarted(options: Options) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().canonicalize().unwrap();
        let state_dir = root.join("state");
        let hdir = state_dir.join("haproxy");
        Agent {
            keys_path: state_dir.join("keys.toml"),
            admin: hdir.join("admin.sock"),
            master: hdir.join("master.sock"),
            managed_cfg: hdir.join("managed.cfg"),
            haproxy_log: hdir.join("haproxy.log"),
            state_dir,
            root,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            key_id: "default".into(),
            secret: Vec::new(),
            attached: false,
            options,
            child: None,
            haproxy: None,
            starts: 0,
        }
    }

    /// An attached agent: the harness starts HAProxy (`-W -S master.sock -f main.cfg -f
    /// managed.cfg`) and writes a 0600 keys file.
    pub fn attached() -> Agent {
        Agent::attached_with("", Options::default())
    }

    /// [`Agent::attached`] with `proxies` (the operator's own frontends and backends) at the
    /// end of the main file, and `options`.
    pub fn attached_with(proxies: &str, options: Options) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().canonicalize().unwrap();
        let hdir = root.join("haproxy");
        std::fs::create_dir_all(&hdir).unwrap();
        let main = hdir.join("main.cfg");
        std::fs::write(
            &main,
            ATTACHED_MAIN.replace("@DIR@", &hdir.display().to_string()) + "\n" + proxies,
        )
        .unwrap();
        let managed_cfg = hdir.join("managed.cfg");
        std::fs::write(&managed_cfg, "").unwrap();
        let keys_path = root.join("keys.toml");
        let secret = "attached-test-secret-0123456789abcdef";
        write_keys(&keys_path, &[("default", secret)]);
        let mut a = Agent {
            keys_path,
            admin: hdir.join("admin.sock"),
            master: hdir.join("master.sock"),
            managed_cfg,
            haproxy_log: hdir.join("haproxy.log"),
            state_dir: root.join("state"),
            root,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            key_id: "default".into(),
            secret: secret.as_bytes().to_vec(),
            attached: true,
            options,
            child: None,
            haproxy: None,
            starts: 0,
        };
        a.start_attached_haproxy();
        a.start();
        a
    }

    fn hdir(&self) -> PathBuf {
        self.admin.parent().unwrap().to_path_buf()
    }

    /// Attached mode: stops the HAProxy the harness runs (SIGTERM; its sockets go away).
    pub fn stop_attached_haproxy(&mut self) {
        if let Some(mut h) = self.haproxy.take() {
            stop_child(&mut h.child, Duration::from_secs(5));
        }
    }

    /// Attached mode: starts HAProxy (again) with the same files and waits for its sockets.
    pub fn start_attached_haproxy(&mut self) {
        self.start_attached_haproxy_loading(true);
    }

    /// [`Self::start_attached_haproxy`]; `with_managed: false` leaves the agent's file off
    /// HAProxy's command line, as a drop-in that went missing would.
    pub fn start_attached_haproxy_loading(&mut self, with_managed: bool) {
        assert!(self.attached && self.haproxy.is_none());
        let hdir = self.hdir();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.haproxy_log)
            .unwrap();
        let child = Command::new(haproxy_bin())
            .arg("-W")
            .arg("-S")
            .arg(format!("{},mode,600", self.master.display()))
            .arg("-f")
            .arg(hdir.join("main.cfg"))
            .args(
                self.options
                    .haproxy_configs
                    .iter()
                    .flat_map(|p| [std::ffi::OsString::from("-f"), p.clone().into()]),
            )
            .args(
                with_managed
                    .then(|| {
                        [
                            std::ffi::OsString::from("-f"),
                            self.managed_cfg.clone().into(),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .current_dir(&hdir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start haproxy");
        self.haproxy = Some(AttachedHaproxy { child });
        let mut attached = self.haproxy.take();
        let log = || self.haproxy_log_text();
        super::wait_haproxy_ready(
            &self.admin,
            &self.master,
            || {
                let st = attached.as_mut()?.child.try_wait().ok().flatten()?;
                Some(format!("haproxy exited ({st}):\n{}", log()))
            },
            log,
        );
        self.haproxy = attached;
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            "--listen".into(),
            self.addr.to_string(),
            "--frontend-bind".into(),
            self.options.frontend_bind.clone(),
            "--allow-node-ports".into(),
            self.options.allow_node_ports.clone(),
            "--reconcile-interval".into(),
            "0.5".into(),
            // Drift is repaired within a second in tests; the default (15 s) is for big states.
            "--drift-check-interval".into(),
            "1s".into(),
            "--haproxy-bin".into(),
            haproxy_bin().display().to_string(),
        ];
        if self.attached {
            for (flag, v) in [
                ("--socket", &self.admin),
                ("--master-socket", &self.master),
                ("--haproxy-config", &self.hdir().join("main.cfg")),
                ("--managed-config", &self.managed_cfg),
                ("--keys-file", &self.keys_path),
            ] {
                args.push(flag.into());
                args.push(v.display().to_string());
            }
        }
        args.extend(self.options.extra.iter().cloned());
        args
    }

    /// Starts the agent (again, on the same state dir, on a fresh API port) and waits for
    /// `/healthz` to answer 200.
    pub fn start(&mut self) {
        self.start_until(|status| status == 200);
    }

    /// [`Self::start`], waiting only for `/healthz` to answer, whatever it says (an agent
    /// expected to start unhealthy).
    pub fn start_answering(&mut self) {
        self.start_until(|_| true);
    }

    fn start_until(&mut self, ready: fn(u16) -> bool) {
        assert!(self.child.is_none(), "the agent is already running");
        self.addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        self.starts += 1;
        let log_path = self.root.join(format!("agent-{}.log", self.starts));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = match &self.options.netns {
            Some(ns) => super::netns::command_in(ns, env!("CARGO_BIN_EXE_lbagent")),
            None => Command::new(env!("CARGO_BIN_EXE_lbagent")),
        };
        let child = cmd
            .args(self.args())
            .env(
                "PATH",
                format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default()),
            )
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start lbagent");
        self.child = Some(child);
        let deadline = Instant::now() + START_DEADLINE;
        let mut last;
        loop {
            if let Ok(Some(st)) = self.child.as_mut().unwrap().try_wait() {
                self.child = None;
                panic!("lbagent exited at start ({st}):\n{}", self.log());
            }
            match self.try_request("GET", "/healthz", &[], b"") {
                Ok(r) if ready(r.status) => break,
                Ok(r) => last = format!("{} {}", r.status, r.body),
                Err(e) => last = e.to_string(),
            }
            assert!(
                Instant::now() < deadline,
                "/healthz not 200 within {START_DEADLINE:?} (last: {last}):\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.attached {
            let keys = lbagent::auth::Keys::load(&self.keys_path).expect("generated keys file");
            self.secret = keys.secret(&self.key_id).expect("default key").to_vec();
        }
    }

    /// SIGTERM, waiting for an orderly stop.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, Duration::from_secs(20));
        }
    }

    /// `kill -9` the agent (its managed HAProxy, if any, stays).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts on the same state dir after a stop or a kill.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// The flags appended at the next [`Self::start`] / [`Self::restart`] (an operator changing
    /// the agent's settings between runs).
    pub fn set_extra(&mut self, extra: Vec<String>) {
        self.options.extra = extra;
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// `kill -<signal>` the agent.
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid(), signal);
    }

    /// Everything the agent printed, over all its starts.
    pub fn log(&self) -> String {
        let mut out = String::new();
        for i in 1..=self.starts {
            let p = self.root.join(format!("agent-{i}.log"));
            out.push_str(&format!("--- agent start {i} ---\n"));
            out.push_str(&std::fs::read_to_string(p).unwrap_or_default());
        }
        out.push_str("--- haproxy log ---\n");
        out.push_str(&self.haproxy_log_text());
        out
    }

    pub fn haproxy_log_text(&self) -> String {
        std::fs::read_to_string(&self.haproxy_log).unwrap_or_default()
    }

    // --- requests ---

    /// One request to the API on a fresh connection, over TLS when the agent serves it.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let tls = match &self.options.tls {
            None => None,
            Some(ClientTls::Config(c)) => Some(c.clone()),
            Some(ClientTls::SelfSigned) => {
                let pem = std::fs::read_to_string(self.state_dir.join("tls/cert.pem"))?;
                Some(trusting(&pem, None))
            }
        };
        let connect = || ApiConn::connect(self.addr, tls.as_ref());
        let conn = match &self.options.netns {
            Some(ns) => super::netns::in_netns(ns, connect)?,
            None => connect()?,
        };
        conn.request(method, path, headers, body)
    }

    pub fn get(&self, path: &str) -> Response {
        self.try_request("GET", path, &[], b"")
            .unwrap_or_else(|e| panic!("GET {path} to {}: {e}", self.addr))
    }

    /// The four auth headers for a request signed with this agent's key.
    pub fn auth_headers(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Vec<(&'static str, String)> {
        lbagent::auth::signed_headers(&self.key_id, &self.secret, method, path, body, now_unix())
    }

    pub fn try_signed(&self, method: &str, path: &str, body: &str) -> std::io::Result<Response> {
        let h = self.auth_headers(method, path, body.as_bytes());
        self.try_request(method, path, &h, body.as_bytes())
    }

    pub fn signed(&self, method: &str, path: &str, body: &str) -> Response {
        self.try_signed(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()))
    }

    /// A request signed with another key of the keys file than the agent's own.
    pub fn signed_as(
        &self,
        key_id: &str,
        secret: &str,
        method: &str,
        path: &str,
        body: &str,
    ) -> Response {
        let h = lbagent::auth::signed_headers(
            key_id,
            secret.as_bytes(),
            method,
            path,
            body.as_bytes(),
            now_unix(),
        );
        try_http(self.addr, method, path, &h, body.as_bytes())
            .unwrap_or_else(|e| panic!("{method} {path} as {key_id}: {e}\n{}", self.log()))
    }

    /// Makes this agent take `other`'s key (its keys file rewritten, then SIGHUP), as agents
    /// behind one sidecar's `--agent` list share theirs; returns once a request signed with it
    /// is accepted.
    pub fn share_key_of(&mut self, other: &Agent) {
        let secret = String::from_utf8(other.secret.clone()).expect("a text secret");
        write_keys(&self.keys_path, &[(&other.key_id, &secret)]);
        self.signal("HUP");
        self.key_id = other.key_id.clone();
        self.secret = other.secret.clone();
        eventually(
            Duration::from_secs(10),
            "the shared key to be accepted",
            || match self.try_signed("GET", "/v1/frontends", "") {
                Ok(r) if r.status == 200 => Ok(()),
                Ok(r) => Err(format!("{r:?}")),
                Err(e) => Err(e.to_string()),
            },
        );
    }

    /// `PUT /v1/frontends/{port}/servers/{node}` with `body`.
    pub fn put(&self, port: u16, node: &str, body: &Value) -> Response {
        self.signed(
            "PUT",
            &format!("/v1/frontends/{port}/servers/{node}"),
            &body.to_string(),
        )
    }

    /// A PUT that must answer 200 with `applied`; returns the answer's JSON.
    pub fn put_ok(&self, port: u16, node: &str, body: &Value, applied: &str) -> Value {
        let r = self.put(port, node, body);
        assert_eq!(
            r.status,
            200,
            "PUT {port}/{node} {body}: {r:?}\n{}",
            self.log()
        );
        let v = r.json();
        assert_eq!(v["applied"], applied, "PUT {port}/{node} {body}: {v}");
        assert_eq!(v["frontend_port"], port);
        assert_eq!(v["backend"], format!("be_{port}"));
        assert_eq!(v["server"], node);
        v
    }

    /// `PUT /v1/frontends/{port}` with `body` (the frontend's settings, and `mode`).
    pub fn put_frontend(&self, port: u16, body: &Value) -> Response {
        self.signed("PUT", &format!("/v1/frontends/{port}"), &body.to_string())
    }

    /// A frontend PUT that must answer 200 with `applied`; returns the answer's JSON.
    pub fn put_frontend_ok(&self, port: u16, body: &Value, applied: &str) -> Value {
        let r = self.put_frontend(port, body);
        assert_eq!(r.status, 200, "PUT {port} {body}: {r:?}\n{}", self.log());
        let v = r.json();
        assert_eq!(v["applied"], applied, "PUT {port} {body}: {v}");
        assert_eq!(v["frontend_port"], port);
        v
    }

    /// Polls `/healthz` until it answers `status` with a body containing `needle` ("" for any),
    /// `within` at most.
    pub fn healthz_until(&self, within: Duration, status: u16, needle: &str) {
        eventually(within, &format!("/healthz {status} {needle:?}"), || {
            let h = self.get("/healthz");
            match h.status == status && h.body.contains(needle) {
                true => Ok(()),
                false => Err(format!("{h:?}")),
            }
        });
    }

    /// `GET /v1/frontends`.
    pub fn state(&self) -> Value {
        let r = self.signed("GET", "/v1/frontends", "");
        assert_eq!(r.status, 200, "{r:?}");
        r.json()
    }

    /// The desired part of `GET /v1/frontends`: (port, mode, node → (ip, port, state, weight)).
    pub fn desired(&self) -> Desired {
        desired_of(&self.state())
    }

    /// `/metrics` as (series → value).
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "{r:?}");
        r.body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.rsplit_once(' '))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse::<f64>().ok()?)))
            .collect()
    }

    pub fn metric(&self, series: &str) -> f64 {
        self.metrics().get(series).copied().unwrap_or(0.0)
    }

    // --- HAProxy, read independently of the agent ---

    /// `show servers state`, parsed.
    pub fn servers_state(&self) -> Vec<ServerState> {
        let text = answers(&self.admin, "show servers state\n").expect("admin socket answers");
        parse_servers_state(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// `show servers state` of the agent's backends as (backend, server) → [`Observed`].
    pub fn observed(&self) -> BTreeMap<(String, String), Observed> {
        observed_of(self.servers_state())
    }

    /// [`Self::observed`] as (addr, port, weight, state): what the agent promises, without the
    /// exact flags (a server HAProxy loaded `disabled` from the file keeps CMAINT, one added at
    /// runtime does not; both are the same state).
    pub fn summary(&self) -> BTreeMap<(String, String), (String, u16, u32, &'static str)> {
        self.observed()
            .into_iter()
            .map(|(k, o)| {
                let state = o.state();
                (k, (o.addr, o.port, o.weight, state))
            })
            .collect()
    }

    /// Like [`Self::observed`], `None` while the admin socket does not answer.
    pub fn try_observed(&self) -> Option<BTreeMap<(String, String), Observed>> {
        let text = answers(&self.admin, "show servers state\n")?;
        Some(observed_of(parse_servers_state(&text).ok()?))
    }

    /// The master CLI's `show proc`.
    pub fn show_proc(&self) -> ProcList {
        self.try_show_proc().expect("master CLI answers show proc")
    }

    pub fn try_show_proc(&self) -> Option<ProcList> {
        let text = answers(&self.master, "show proc\n")?;
        parse_show_proc(&text).ok()
    }

    /// Sends a command to the master CLI and returns the answer (empty for a `reload` on 2.6).
    pub fn master_cmd(&self, line: &str) -> String {
        answers(&self.master, &format!("{line}\n")).expect("master CLI answers")
    }

    /// Sends a command to the admin socket and returns the answer.
    pub fn admin_cmd(&self, line: &str) -> String {
        answers(&self.admin, &format!("{line}\n")).expect("admin socket answers")
    }

    /// HAProxy processes of this test (by the unique temp path in their command line).
    pub fn haproxy_pids(&self) -> Vec<u32> {
        pids_with(&self.root.display().to_string())
    }

    /// Everything that must not change when a request is refused: the desired state, HAProxy's
    /// servers and the managed file (once the background writer caught up).
    pub fn fingerprint(&self) -> (Desired, BTreeMap<(String, String), Observed>, String) {
        let desired = self.desired();
        let text = self.managed_text_at(desired.0);
        (desired, self.observed(), text)
    }

    /// The managed file once the agent's background writer has caught up with `generation`
    /// (its header names the generation it was rendered from).
    pub fn managed_text_at(&self, generation: u64) -> String {
        let header = format!("generation {generation}\n");
        eventually(
            Duration::from_secs(15),
            "the managed file to catch up",
            || {
                let t = std::fs::read_to_string(&self.managed_cfg).unwrap_or_default();
                let first = t.lines().next().unwrap_or_default().to_string() + "\n";
                if first.ends_with(&header) {
                    Ok(t)
                } else {
                    Err(format!("want {header:?}, file starts {first:?}"))
                }
            },
        )
    }

    /// Polls until HAProxy's servers match the desired state exactly (addresses, weights,
    /// states, nothing extra), returning the last mismatch on timeout.
    pub fn wait_in_sync(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let desired = self.desired();
            let mismatch = match self.try_observed() {
                Some(obs) => compare(&desired, &obs),
                None => Some("admin socket does not answer".into()),
            };
            let Some(m) = mismatch else { return };
            assert!(
                Instant::now() < deadline,
                "HAProxy did not match the desired state within {within:?}: {m}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The agent's backends (`be_*`) of a `show servers state`, keyed by (backend, server).
fn observed_of(rows: Vec<ServerState>) -> BTreeMap<(String, String), Observed> {
    rows.into_iter()
        .filter(|s| s.backend.starts_with("be_"))
        .map(|s| {
            (
                (s.backend, s.server),
                Observed {
                    addr: s.addr.unwrap_or_default(),
                    port: s.port.unwrap_or(0),
                    admin: s.admin.0,
                    weight: s.user_weight.unwrap_or(0),
                },
            )
        })
        .collect()
}

/// One server as `show servers state` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub addr: String,
    pub port: u16,
    /// `srv_admin_state` flags.
    pub admin: u32,
    /// `srv_uweight`.
    pub weight: u32,
}

impl Observed {
    /// The agent's name for the admin flags: maint, drain or ready. HAProxy's maintenance
    /// flags are FMAINT 0x01, IMAINT 0x02 and RMAINT 0x20; CMAINT 0x04 alone only marks a
    /// server the config file started `disabled` (`show stat` says UP or DRAIN).
    pub fn state(&self) -> &'static str {
        if self.admin & 0x23 != 0 {
            "maint"
        } else if self.admin & 0x18 != 0 {
            "drain"
        } else {
            "ready"
        }
    }
}

/// A desired server: ip, port, state, weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredServer {
    pub ip: String,
    pub port: u16,
    pub state: String,
    pub weight: Option<u32>,
}

/// (frontend port, node) → desired server, plus the generation.
pub type Desired = (u64, BTreeMap<(u16, String), DesiredServer>);

pub fn desired_of(v: &Value) -> Desired {
    let mut out = BTreeMap::new();
    for fe in v["frontends"].as_array().expect("frontends array") {
        let port = fe["frontend_port"].as_u64().unwrap() as u16;
        for s in fe["servers"].as_array().unwrap() {
            out.insert(
                (port, s["node"].as_str().unwrap().to_string()),
                DesiredServer {
                    ip: s["node_ip"].as_str().unwrap().to_string(),
                    port: s["node_port"].as_u64().unwrap() as u16,
                    state: s["state"].as_str().unwrap().to_string(),
                    weight: s["weight"].as_u64().map(|w| w as u32),
                },
            );
        }
    }
    (v["generation"].as_u64().unwrap(), out)
}

/// `None` when HAProxy's servers of `be_*` backends are exactly the desired ones.
pub fn compare(
    desired: &Desired,
    observed: &BTreeMap<(String, String), Observed>,
) -> Option<String> {
    let mut problems = Vec::new();
    for ((port, node), d) in &desired.1 {
        let key = (format!("be_{port}"), node.clone());
        match observed.get(&key) {
            None => problems.push(format!("{key:?} missing")),
            Some(o) => {
                if o.addr != d.ip || o.port != d.port {
                    problems.push(format!(
                        "{key:?} at {}:{}, want {}:{}",
                        o.addr, o.port, d.ip, d.port
                    ));
                }
                if o.state() != d.state {
                    problems.push(format!(
                        "{key:?} is {} (flags {}), want {}",
                        o.state(),
                        o.admin,
                        d.state
                    ));
                }
                if o.weight != d.weight.unwrap_or(1) {
                    problems.push(format!("{key:?} weight {}, want {:?}", o.weight, d.weight));
                }
            }
        }
    }
    for key in observed.keys() {
        let port: Option<u16> = key.0.strip_prefix("be_").and_then(|p| p.parse().ok());
        if let Some(port) = port {
            if !desired.1.contains_key(&(port, key.1.clone())) {
                problems.push(format!("{key:?} is not desired"));
            }
        }
    }
    if problems.is_empty() {
        None
    } else {
        Some(problems.join("; "))
    }
}

/// Writes a keys file with mode 0600 (created with that mode, then rewritten in place).
pub fn write_keys(path: &Path, keys: &[(&str, &str)]) {
    let mut text = String::new();
    for (id, secret) in keys {
        text.push_str(&format!("{id} = \"{secret}\"\n"));
    }
    write_keys_text(path, &text);
}

/// Writes `text` as a keys file with mode 0600 (scoped keys' tables, say), replacing it whole
/// by a rename, as an operator's editor would.
pub fn write_keys_text(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Frontend `port`'s entry in a `GET /v1/frontends` answer, if it has one.
pub fn frontend_in(state: &Value, port: u16) -> Option<Value> {
    state["frontends"]
        .as_array()?
        .iter()
        .find(|f| f["frontend_port"] == port)
        .cloned()
}

/// `{"node_ip": ip, "node_port": port}` plus `extra` fields.
pub fn body(ip: &str, port: u16, extra: Value) -> Value {
    let mut v = serde_json::json!({"node_ip": ip, "node_port": port});
    if let Value::Object(m) = extra {
        for (k, x) in m {
            v[k] = x;
        }
    }
    v
}

/// Polls `check` (which returns `Err(why)` while not yet true) until `within`.
pub fn eventually<T>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check() {
            Ok(v) => return v,
            Err(why) => assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting for {what}: {why}"
            ),
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// How much of its logs a failing test's agent prints.
const LOG_TAIL_ON_FAILURE: usize = 80;

impl Drop for Agent {
    fn drop(&mut self) {
        // A failing test shows what the agent and its HAProxy said last: CI keeps nothing else.
        if std::thread::panicking() {
            let agent_log = self.root.join(format!("agent-{}.log", self.starts));
            for (what, text) in [
                (
                    "agent",
                    std::fs::read_to_string(agent_log).unwrap_or_default(),
                ),
                ("haproxy", self.haproxy_log_text()),
            ] {
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(LOG_TAIL_ON_FAILURE)..];
                eprintln!("--- the {what} log's last {} lines ---", tail.len());
                eprintln!("{}", tail.join("\n"));
            }
        }
        // The agent first (in managed mode it stops its HAProxy), then an attached HAProxy,
        // then anything HAProxy left behind (a managed one orphaned by `kill -9`).
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, Duration::from_secs(15));
        }
        if let Some(mut h) = self.haproxy.take() {
            stop_child(&mut h.child, Duration::from_secs(5));
        }
        let needle = self.root.display().to_string();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = pids_with(&needle);
            if left.is_empty() {
                break;
            }
            for pid in &left {
                send_signal(*pid, "KILL");
            }
            if Instant::now() >= deadline {
                eprintln!("processes of {needle} still alive after SIGKILL: {left:?}");
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
