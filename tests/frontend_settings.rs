//! A frontend's settings against a real agent and a real HAProxy, checked on the wire and in
//! HAProxy's own sockets: the PROXY header (v1, v2) carries the real client's address and port
//! to servers added before and after the setting and after HAProxy is killed; the check's port
//! and HTTP path decide whether a server is up; the frontend's timeouts beat the `defaults`
//! section's; maxconn and the check port change live, without a reload; frontends bind IPv4
//! and IPv6; the legacy `send-proxy` becomes v1; bad values are refused naming the field, and
//! change nothing.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::agent::{
    body, eventually, legacy_agent, legacy_hook, wait_reaches, Agent, Echo, Options, LEGACY_TOKEN,
};
use common::free_port;
use common::proxy_backend::{ask, Header, ProxyBackend, ProxyClient};
use serde_json::{json, Value};

const SETTLE: Duration = Duration::from_secs(15);

/// HAProxy reloads the agent started.
const RELOADS: &str = "lbagent_haproxy_reloads_total";

/// Where test clients connect from, so the address a PROXY header carries is known (and is not
/// HAProxy's own, 127.0.0.1).
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));

/// The frontend's `settings` in `GET /v1/frontends`.
fn settings(agent: &Agent, port: u16) -> Value {
    let state = agent.state();
    common::agent::frontend_in(&state, port)
        .unwrap_or_else(|| panic!("no frontend {port} in {state}"))["settings"]
        .clone()
}

/// The server's status as HAProxy sums it up (UP, DOWN, MAINT...), from `show servers state`.
fn status(agent: &Agent, port: u16, node: &str) -> String {
    let backend = format!("be_{port}");
    agent
        .servers_state()
        .into_iter()
        .find(|s| s.backend == backend && s.server == node)
        .map_or_else(|| "missing".into(), |s| s.status_summary().to_string())
}

fn wait_status(agent: &Agent, port: u16, node: &str, want: &str) {
    eventually(
        SETTLE,
        &format!("{node} of {port} to be {want}"),
        || match status(agent, port, node) {
            s if s == want => Ok(()),
            s => Err(s),
        },
    );
}

/// The check port HAProxy uses for the server (`show servers state`).
fn check_port(agent: &Agent, port: u16, node: &str) -> Option<u16> {
    let backend = format!("be_{port}");
    agent
        .servers_state()
        .into_iter()
        .find(|s| s.backend == backend && s.server == node)
        .and_then(|s| s.check_port)
}

/// A port on `ip` nothing listens on (the kernel's pick, released).
fn closed_port(ip: &str) -> u16 {
    TcpListener::bind(format!("{ip}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Connects through `port` from [`CLIENT`] until each of `backends` has answered carrying
/// `header` of the client's own address and port; then every further connection must, from
/// whichever of them answers. (Until the first right answer a reload's old worker may still
/// take one, so those are waited out, never accepted.)
fn reach_all(port: u16, backends: &[&ProxyBackend], header: impl Fn(SocketAddr) -> Header) {
    let right = |reply: &str, local: SocketAddr| {
        backends
            .iter()
            .find(|b| reply == b.reply_for(&header(local)))
            .map(|b| b.name.clone())
    };
    let mut answered = BTreeSet::new();
    eventually(SETTLE, &format!("each backend through {port}"), || {
        let (reply, local) = ask(CLIENT, port)?;
        let name = right(&reply, local)
            .ok_or_else(|| format!("answered {reply:?} to a client at {local}"))?;
        answered.insert(name);
        if answered.len() == backends.len() {
            Ok(())
        } else {
            Err(format!("only {answered:?} answered so far"))
        }
    });
    for _ in 0..2 * backends.len() {
        let (reply, local) = ask(CLIENT, port).unwrap();
        assert!(
            right(&reply, local).is_some(),
            "through {port} from {local}: {reply:?}"
        );
    }
}

fn no_header(_: SocketAddr) -> Header {
    Header::None
}

// ---------------------------------------------------------------------------------------------
// The PROXY backend itself, without HAProxy
// ---------------------------------------------------------------------------------------------

#[test]
fn proxy_backend_reads_every_kind_of_header() {
    use ppp::v2::{Addresses, Builder, Command, Protocol, Version};
    let backend = ProxyBackend::start("127.0.0.2", "X");
    let client: SocketAddr = "192.0.2.1:4000".parse().unwrap();
    let client6: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
    let v2 = |src: SocketAddr, dst: &str| {
        Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            (src, dst.parse::<SocketAddr>().unwrap()),
        )
        .build()
        .unwrap()
    };
    let cases: Vec<(Vec<u8>, Header)> = vec![
        (Vec::new(), Header::None),
        (
            b"PROXY TCP4 192.0.2.1 192.0.2.2 4000 80\r\n".to_vec(),
            Header::V1(client),
        ),
        (
            b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 80\r\n".to_vec(),
            Header::V1(client6),
        ),
        (v2(client, "192.0.2.2:80"), Header::V2(client)),
        (v2(client6, "[2001:db8::2]:80"), Header::V2(client6)),
    ];
    for (preamble, want) in &cases {
        let c = ProxyClient::connect_with(None, backend.addr, preamble).unwrap();
        assert_eq!(c.reply, backend.reply_for(want), "{preamble:?}");
    }
    // What HAProxy's checks send: a header alone, then a close. And a bare connect and close.
    let local = Builder::with_addresses(
        Version::Two | Command::Local,
        Protocol::Unspecified,
        Addresses::Unspecified,
    )
    .build()
    .unwrap();
    for (bytes, want) in [
        (b"PROXY UNKNOWN\r\n".to_vec(), Header::V1Unknown),
        (local, Header::V2Local),
        (Vec::new(), Header::None),
        (
            b"PROXY TCP4 1.2.3\r\n".to_vec(),
            Header::Invalid(String::new()),
        ),
    ] {
        let mut s = TcpStream::connect(backend.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        match want {
            Header::Invalid(_) => assert!(reply.starts_with("X proxy=invalid v1"), "{reply:?}"),
            _ => assert_eq!(reply, format!("{}\n", backend.reply_for(&want))),
        }
    }
    // A connection reset at once, as HAProxy ends a check, is still one seen.
    let s = TcpStream::connect(backend.addr).unwrap();
    let reset = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &reset).unwrap();
    drop(s);
    let seen = eventually(SETTLE, "every connection seen", || {
        let seen: Vec<Header> = backend.seen().into_iter().map(|s| s.header).collect();
        if seen.len() == cases.len() + 5 {
            Ok(seen)
        } else {
            Err(format!("{seen:?}"))
        }
    });
    assert_eq!(
        seen[cases.len()..cases.len() + 3],
        [Header::V1Unknown, Header::V2Local, Header::None]
    );
    assert_eq!(seen.last(), Some(&Header::None));
}

// ---------------------------------------------------------------------------------------------
// 1, 2. The PROXY header through HAProxy
// ---------------------------------------------------------------------------------------------

/// One frontend, plain first, then v1, then v2: a server added before the setting gets the
/// header after its reload, one added after it at runtime gets it too, and both still do once
/// HAProxy was killed with SIGKILL and the agent started a new one.
#[test]
fn proxy_header_carries_the_client_before_after_and_across_a_haproxy_kill() {
    let agent = Agent::managed();
    let a = ProxyBackend::start("127.0.0.2", "A");
    let b = ProxyBackend::start("127.0.0.3", "B");
    let fe = free_port();
    agent.put_frontend_ok(fe, &json!({}), "reload");
    agent.put_ok(fe, "a", &body(&a.ip(), a.port(), json!({})), "runtime");
    // Plain: no header, so a header later is the setting's doing.
    reach_all(fe, &[&a], no_header);

    let v = agent.put_frontend_ok(fe, &json!({"proxy_protocol": "v1"}), "reload");
    assert_eq!(v["reload_for"], "proxy_protocol", "{v}");
    reach_all(fe, &[&a], Header::V1);
    assert_eq!(settings(&agent, fe)["proxy_protocol"], "v1");

    // 2. The version changed on the live frontend: new connections get v2.
    let v = agent.put_frontend_ok(fe, &json!({"proxy_protocol": "v2"}), "reload");
    assert_eq!(v["reload_for"], "proxy_protocol", "{v}");
    reach_all(fe, &[&a], Header::V2);

    // A server added at runtime to the v2 frontend: `add server` carries send-proxy-v2, and
    // check-send-proxy (below).
    let reloads = agent.metric(RELOADS);
    let v = agent.put_ok(fe, "b", &body(&b.ip(), b.port(), json!({})), "runtime");
    assert!(v.get("reload_for").is_none(), "{v}");
    reach_all(fe, &[&a, &b], Header::V2);
    assert_eq!(agent.metric(RELOADS), reloads, "the runtime add reloaded");
    // The checks of both, to the traffic port, carry the header (LOCAL): the file's server by
    // HAProxy's default, the added one only because the agent asks (HAProxy would not).
    for backend in [&a, &b] {
        eventually(SETTLE, "a v2 health check", || {
            let seen = backend.seen();
            seen.iter()
                .find(|s| s.header == Header::V2Local)
                .map(|_| ())
                .ok_or_else(|| format!("{seen:?}"))
        });
    }

    // HAProxy killed, master and workers: the agent starts a new one from its file.
    let old = agent.haproxy_pids();
    assert!(!old.is_empty(), "no HAProxy processes found");
    for pid in &old {
        common::send_signal(*pid, "KILL");
    }
    eventually(
        SETTLE,
        "a new HAProxy master with a worker",
        || match agent.try_show_proc() {
            Some(p) => match p.master {
                Some(m) if !old.contains(&m.pid) && !p.workers.is_empty() => Ok(()),
                other => Err(format!("master {other:?}")),
            },
            None => Err("the master CLI does not answer".into()),
        },
    );
    agent.wait_in_sync(SETTLE);
    reach_all(fe, &[&a, &b], Header::V2);
}

// ---------------------------------------------------------------------------------------------
// 3. The check port
// ---------------------------------------------------------------------------------------------

#[test]
fn check_port_decides_up_and_down_and_changes_live() {
    let agent = Agent::managed();
    let traffic = Echo::start("127.0.0.2", "traffic");
    let check_target = Echo::start("127.0.0.2", "check target");
    let closed = closed_port("127.0.0.2");
    let fe = free_port();
    let check =
        |port: u16| json!({"check": {"port": port, "interval": "200ms", "rise": 1, "fall": 1}});
    agent.put_frontend_ok(fe, &check(closed), "reload");
    agent.put_ok(
        fe,
        "n",
        &body(&traffic.ip(), traffic.port(), json!({})),
        "runtime",
    );
    wait_status(&agent, fe, "n", "DOWN");
    assert_eq!(check_port(&agent, fe, "n"), Some(closed));
    // Only the check port is closed: the traffic port answers all along.
    TcpStream::connect_timeout(&traffic.addr, Duration::from_secs(1))
        .expect("the traffic port is open");

    // From one port to another is live: no reload.
    let reloads = agent.metric(RELOADS);
    let v = agent.put_frontend_ok(fe, &check(check_target.port()), "runtime");
    assert!(v.get("reload_for").is_none(), "{v}");
    // Answered "runtime": HAProxy has it already (not only once the drift check comes by).
    assert_eq!(check_port(&agent, fe, "n"), Some(check_target.port()));
    wait_status(&agent, fe, "n", "UP");
    wait_reaches(fe, "traffic", SETTLE);
    assert_eq!(settings(&agent, fe)["check"]["port"], check_target.port());

    agent.put_frontend_ok(fe, &check(closed), "runtime");
    wait_status(&agent, fe, "n", "DOWN");
    assert_eq!(
        agent.metric(RELOADS),
        reloads,
        "a check port change reloaded"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. The HTTP check
// ---------------------------------------------------------------------------------------------

/// An HTTP server answering every request with the status it is set to, recording the request
/// lines.
struct HttpStatus {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpStatus {
    fn start(ip: &str, status: u16) -> HttpStatus {
        let listener = TcpListener::bind(format!("{ip}:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(status));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (status, requests, stop) = (status.clone(), requests.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut c) = conn else { continue };
                    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head);
                    if let Some(line) = text.lines().next().filter(|l| !l.is_empty()) {
                        requests.lock().unwrap().push(line.to_string());
                    }
                    let code = status.load(Ordering::SeqCst);
                    let _ = write!(
                        c,
                        "HTTP/1.1 {code} Status\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                }
            })
        };
        HttpStatus {
            addr,
            status,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }
}

impl Drop for HttpStatus {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn http_check_path_decides_up_and_down() {
    let agent = Agent::managed();
    // Its traffic port is open: a TCP check would call it up, whatever it answers.
    let web = HttpStatus::start("127.0.0.2", 500);
    let fe = free_port();
    agent.put_frontend_ok(
        fe,
        &json!({"check": {"http_path": "/healthz", "interval": "200ms", "rise": 1, "fall": 1}}),
        "reload",
    );
    let s = settings(&agent, fe);
    assert_eq!(
        (&s["check"]["kind"], &s["check"]["http_path"]),
        (&json!("http"), &json!("/healthz")),
        "{s}"
    );
    // Added at runtime: the backend's `option httpchk` is its check too.
    agent.put_ok(
        fe,
        "web",
        &body(&web.addr.ip().to_string(), web.addr.port(), json!({})),
        "runtime",
    );
    wait_status(&agent, fe, "web", "DOWN");
    let requests = web.requests.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /healthz HTTP/1.")),
        "{requests:?}"
    );
    web.set(200);
    wait_status(&agent, fe, "web", "UP");
    web.set(500);
    wait_status(&agent, fe, "web", "DOWN");
}

// ---------------------------------------------------------------------------------------------
// 5. Timeouts
// ---------------------------------------------------------------------------------------------

/// A later `defaults` section in the operator's file: the agent's file, loaded after it, gets
/// these 1 s timeouts wherever a frontend says nothing.
const SHORT_DEFAULTS: &str = "defaults
    mode tcp
    timeout connect 1s
    timeout client 1s
    timeout server 1s
";

/// How long the clients stay silent: well past the defaults' 1 s, well within the frontend's
/// own 10 s (room for a loaded machine on both sides).
const IDLE: Duration = Duration::from_millis(5000);

#[test]
fn frontend_timeouts_beat_the_defaults_section() {
    let agent = Agent::attached_with(SHORT_DEFAULTS, Options::default());
    let backend = ProxyBackend::start("127.0.0.2", "E");
    let (long, short) = (free_port(), free_port());
    agent.put_frontend_ok(
        long,
        &json!({"timeouts": {"client": "10s", "server": "10s"}}),
        "reload",
    );
    agent.put_ok(
        long,
        "e",
        &body(&backend.ip(), backend.port(), json!({})),
        "runtime",
    );
    // The control: a frontend without timeouts of its own.
    agent.put_ok(
        short,
        "e",
        &body(&backend.ip(), backend.port(), json!({})),
        "reload",
    );
    reach_all(long, &[&backend], no_header);
    reach_all(short, &[&backend], no_header);

    let to = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    std::thread::scope(|scope| {
        let cut = scope.spawn(|| {
            let mut c = ProxyClient::connect(None, to(short)).unwrap();
            c.stream.set_read_timeout(Some(IDLE)).unwrap();
            let started = Instant::now();
            let mut buf = [0u8; 64];
            let read = c.stream.read(&mut buf);
            (read.map_err(|e| e.kind()), started.elapsed())
        });
        let kept = scope.spawn(|| {
            let mut c = ProxyClient::connect(None, to(long)).unwrap();
            c.stream.set_read_timeout(Some(IDLE)).unwrap();
            let mut buf = [0u8; 64];
            let idle = c.stream.read(&mut buf).map_err(|e| e.kind());
            c.stream
                .set_read_timeout(Some(Duration::from_secs(4)))
                .unwrap();
            (idle, c.echo("still here"))
        });
        let (read, after) = cut.join().unwrap();
        // Closed by HAProxy (0 bytes) about 1 s into the silence, long before the read's own
        // deadline (HAProxy's timers may fire a little early, a loaded machine late).
        assert_eq!(
            read,
            Ok(0),
            "the default-timeout connection after {after:?}"
        );
        assert!(
            after >= Duration::from_millis(500) && after < Duration::from_millis(4000),
            "cut after {after:?}, want about 1 s"
        );
        let (idle, echo) = kept.join().unwrap();
        assert!(
            matches!(
                idle,
                Err(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
            ),
            "the 10 s frontend's connection during the idle wait: {idle:?}"
        );
        assert_eq!(echo.as_deref(), Ok("still here"));
    });
    let text = agent.managed_text_at(agent.desired().0);
    assert!(text.contains("    timeout client 10s\n"), "{text}");
    assert!(text.contains("    timeout server 10s\n"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// 6. maxconn
// ---------------------------------------------------------------------------------------------

/// The frontend's `slim` (its maxconn) in `show stat`.
fn frontend_slim(agent: &Agent, port: u16) -> Option<u64> {
    let text = agent.admin_cmd("show stat");
    let rows = lbagent::runtime::parse::parse_show_stat(&text).unwrap();
    rows.into_iter()
        .find(|r| {
            r.proxy == format!("fe_{port}")
                && r.kind == lbagent::runtime::parse::ProxyKind::Frontend
        })
        .and_then(|r| r.sessions_limit)
}

#[test]
fn maxconn_changes_live() {
    let agent = Agent::managed();
    let fe = free_port();
    agent.put_frontend_ok(fe, &json!({"maxconn": 100}), "reload");
    assert_eq!(frontend_slim(&agent, fe), Some(100));
    let reloads = agent.metric(RELOADS);
    let v = agent.put_frontend_ok(fe, &json!({"maxconn": 250}), "runtime");
    assert!(v.get("reload_for").is_none(), "{v}");
    // Answered "runtime": HAProxy has it already.
    assert_eq!(frontend_slim(&agent, fe), Some(250));
    assert_eq!(settings(&agent, fe)["maxconn"], 250);
    agent.put_frontend_ok(fe, &json!({"maxconn": 250}), "unchanged");
    assert_eq!(agent.metric(RELOADS), reloads, "a maxconn change reloaded");
    // And the file says it, for HAProxy's next start.
    let text = agent.managed_text_at(agent.desired().0);
    assert!(text.contains("    maxconn 250\n"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// 7. IPv4 and IPv6
// ---------------------------------------------------------------------------------------------

#[test]
fn frontends_bind_ipv4_and_ipv6() {
    let agent = Agent::managed_with(Options {
        extra: vec!["--frontend-bind".into(), "127.0.0.1,::1".into()],
        ..Options::default()
    });
    let backend = ProxyBackend::start("127.0.0.2", "D");
    let fe = free_port();
    agent.put_frontend_ok(fe, &json!({"proxy_protocol": "v1"}), "reload");
    agent.put_ok(
        fe,
        "d",
        &body(&backend.ip(), backend.port(), json!({})),
        "runtime",
    );
    for to in [
        SocketAddr::from(([127, 0, 0, 1], fe)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, fe)),
    ] {
        let reply = eventually(SETTLE, &format!("an answer through {to}"), || {
            let c = ProxyClient::connect(None, to)?;
            Ok((c.reply, c.local))
        });
        assert_eq!(
            reply.0,
            backend.reply_for(&Header::V1(reply.1)),
            "through {to}"
        );
        assert_eq!(reply.1.is_ipv6(), to.is_ipv6());
    }
    let text = agent.managed_text_at(agent.desired().0);
    assert!(
        text.contains(&format!("    bind 127.0.0.1:{fe}\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!("    bind [::1]:{fe} v6only\n")),
        "{text}"
    );
}

/// An operator adds an address to `--frontend-bind` and restarts the agent: the managed
/// HAProxy starts from the file the last run wrote (the old binds), and the agent reloads it once
/// so the existing frontend binds the new address too.
#[test]
fn a_changed_frontend_bind_applies_at_restart() {
    let mut agent = Agent::managed_with(Options {
        extra: vec!["--frontend-bind".into(), "127.0.0.1".into()],
        ..Options::default()
    });
    let backend = ProxyBackend::start("127.0.0.2", "E");
    let fe = free_port();
    agent.put_ok(
        fe,
        "e",
        &body(&backend.ip(), backend.port(), json!({})),
        "reload",
    );
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, fe));
    eventually(SETTLE, "an answer over IPv4", || {
        ProxyClient::connect(None, SocketAddr::from(([127, 0, 0, 1], fe))).map(|_| ())
    });
    assert!(
        TcpStream::connect_timeout(&v6, Duration::from_secs(1)).is_err(),
        "nothing listens on [::1]:{fe} yet"
    );
    agent.set_extra(vec!["--frontend-bind".into(), "127.0.0.1,::1".into()]);
    agent.restart();
    let c = eventually(SETTLE, "an answer over IPv6 after the restart", || {
        ProxyClient::connect(None, v6)
    });
    assert!(c.local.is_ipv6(), "{:?}", c.local);
    let text = std::fs::read_to_string(&agent.managed_cfg).unwrap();
    assert!(
        text.contains(&format!("    bind [::1]:{fe} v6only\n")),
        "{text}"
    );
}

/// The restart's reload to the new binds fails (something else holds `[::1]:port`): HAProxy
/// keeps serving the old listeners, `/healthz` says why and is not in sync, and the agent tries
/// again on its timer until the address is free.
#[test]
fn a_failed_reload_to_new_binds_is_reported_and_retried() {
    let mut agent = Agent::managed_with(Options {
        extra: vec!["--frontend-bind".into(), "127.0.0.1".into()],
        ..Options::default()
    });
    let backend = ProxyBackend::start("127.0.0.2", "F");
    let fe = free_port();
    agent.put_ok(
        fe,
        "f",
        &body(&backend.ip(), backend.port(), json!({})),
        "reload",
    );
    let v4 = SocketAddr::from(([127, 0, 0, 1], fe));
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, fe));
    let squatter = TcpListener::bind(v6).expect("[::1] on the frontend's port");
    agent.set_extra(vec!["--frontend-bind".into(), "127.0.0.1,::1".into()]);
    agent.stop();
    agent.start_answering();
    let health = eventually(SETTLE, "/healthz to say why", || {
        let r = agent.get("/healthz");
        let v = r.json();
        let error = v["error"].as_str().unwrap_or_default().to_string();
        if r.status == 503 && v["in_sync"] == false && error.contains("frontends other than") {
            Ok(error)
        } else {
            Err(format!("{} {}", r.status, r.body))
        }
    });
    assert!(
        health.contains(&format!("{fe}")),
        "names the port: {health}"
    );
    // Still serving as before.
    ProxyClient::connect(None, v4).expect("IPv4 still served");
    drop(squatter);
    let c = eventually(
        Duration::from_secs(40),
        "IPv6 served once the address is free",
        || ProxyClient::connect(None, v6),
    );
    assert!(c.local.is_ipv6());
    agent.healthz_until(SETTLE, 200, "");
}

// ---------------------------------------------------------------------------------------------
// 8. The legacy endpoint's send-proxy
// ---------------------------------------------------------------------------------------------

#[test]
fn legacy_send_proxy_is_v1() {
    let (agent, _dir) = legacy_agent();
    let node = ProxyBackend::start("127.0.0.2", "L");
    let (with, without) = (free_port(), free_port());
    let add = |fe: u16, send_proxy: &str| {
        format!(
            r#"{{"name":"traefik","frontend-port":"{fe}","backend-port":"{}","dst-ip":"127.0.0.2","action":"add","send-proxy":{send_proxy}}}"#,
            node.port()
        )
    };
    for (fe, send_proxy) in [(with, "true"), (without, r#""false""#)] {
        let r = legacy_hook(&agent, Some(LEGACY_TOKEN), &add(fe, send_proxy));
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["applied"], "reload");
    }
    reach_all(with, &[&node], Header::V1);
    reach_all(without, &[&node], no_header);
    assert_eq!(settings(&agent, with)["proxy_protocol"], "v1");
    assert_eq!(settings(&agent, without)["proxy_protocol"], "none");
    // The string form means the same; the other value is a conflict, named.
    let r = legacy_hook(&agent, Some(LEGACY_TOKEN), &add(with, r#""true""#));
    assert_eq!(
        (r.status, r.json()["applied"].clone()),
        (200, json!("unchanged")),
        "{r:?}"
    );
    let r = legacy_hook(&agent, Some(LEGACY_TOKEN), &add(without, "true"));
    r.assert_error(409, "conflict", "send-proxy on a frontend without it");
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("proxy_protocol"),
        "{r:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Bad values
// ---------------------------------------------------------------------------------------------

/// What a refused request must leave as it was: the desired state and HAProxy's servers, the
/// managed file, and every frontend's settings.
fn snapshot(agent: &Agent) -> (impl PartialEq + std::fmt::Debug, Value) {
    let settings: Vec<Value> = agent.state()["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| json!([f["frontend_port"], f["mode"], f["settings"]]))
        .collect();
    (agent.fingerprint(), Value::from(settings))
}

#[test]
fn bad_values_are_refused_by_field_and_change_nothing() {
    let agent = Agent::managed();
    let echo = Echo::start("127.0.0.2", "n");
    let fe = free_port();
    let fresh = free_port();
    agent.put_frontend_ok(
        fe,
        &json!({"proxy_protocol": "v1", "check": {"port": echo.port()}}),
        "reload",
    );
    agent.put_ok(
        fe,
        "n",
        &body(&echo.ip(), echo.port(), json!({})),
        "runtime",
    );
    let before = snapshot(&agent);

    // (settings, what the message must say: the field's path, for the inline form after
    // `frontend.`)
    let cases = [
        (json!({"check": {"port": 0}}), "check.port: "),
        (json!({"check": {"rise": 0}}), "check.rise: "),
        (json!({"check": {"fall": 101}}), "check.fall: "),
        (json!({"check": {"interval": "5"}}), "check.interval: "),
        (json!({"check": {"interval": "25h"}}), "check.interval: "),
        (json!({"maxconn": 0}), "maxconn: "),
        (json!({"proxy_protocol": "v3"}), "proxy_protocol: "),
        (
            json!({"check": {"http_path": "no-slash"}}),
            "check.http_path: ",
        ),
        (json!({"timeouts": {"client": 5}}), "timeouts.client: "),
    ];
    let message = |r: &common::agent::Response| r.json()["message"].as_str().unwrap().to_string();
    for (bad, path) in &cases {
        for port in [fe, fresh] {
            let r = agent.put_frontend(port, bad);
            r.assert_error(
                400,
                "bad_request",
                &format!("PUT /v1/frontends/{port} {bad}"),
            );
            assert!(message(&r).contains(path), "{bad}: {r:?}");
            let inline = body(&echo.ip(), echo.port(), json!({"frontend": bad}));
            let r = agent.put(port, "m", &inline);
            r.assert_error(400, "bad_request", &format!("inline {inline}"));
            assert!(
                message(&r).contains(&format!("frontend.{path}")),
                "{inline}: {r:?}"
            );
        }
    }
    // An unknown field, named (and inline, where it is).
    let r = agent.put_frontend(fe, &json!({"send_proxy": "v1"}));
    r.assert_error(400, "bad_request", "unknown field");
    assert!(message(&r).contains("unknown field `send_proxy`"), "{r:?}");
    let r = agent.put(
        fe,
        "m",
        &body(
            &echo.ip(),
            echo.port(),
            json!({"frontend": {"check": {"path": "/"}}}),
        ),
    );
    r.assert_error(400, "bad_request", "unknown inline field");
    let m = message(&r);
    assert!(
        m.contains("frontend.check") && m.contains("unknown field `path`"),
        "{r:?}"
    );
    assert_eq!(snapshot(&agent), before);

    // Inline settings that differ from the frontend's: 409 naming the first such field.
    for (given, field) in [
        (json!({"proxy_protocol": "v2"}), "proxy_protocol"),
        (json!({"check": {"port": echo.port() + 1}}), "check.port"),
        (json!({"timeouts": {"tunnel": "1h"}}), "timeouts.tunnel"),
        (json!({"proxy_protocol": "v1", "maxconn": 10}), "maxconn"),
    ] {
        let r = agent.put(
            fe,
            "m",
            &body(&echo.ip(), echo.port(), json!({"frontend": given})),
        );
        r.assert_error(409, "conflict", &format!("inline {given}"));
        assert!(message(&r).contains(field), "{given}: {r:?}");
    }
    assert_eq!(snapshot(&agent), before);
    assert!(
        !agent.state()["frontends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["frontend_port"] == fresh),
        "a refused request created frontend {fresh}"
    );

    // The same values given as they are: accepted (so the refusals above were about values).
    agent.put_ok(
        fe,
        "m",
        &body(
            &echo.ip(),
            echo.port(),
            json!({"frontend": {"proxy_protocol": "v1", "check": {"port": echo.port(), "rise": 2}}}),
        ),
        "runtime",
    );
}
