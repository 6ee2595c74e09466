//! The API over TLS, black-box with the real binaries: a test CA made here with rcgen;
//! `lbctl state` with `--ca-file` works and a wrong CA exits 2 with one line; TLS 1.0 and 1.1
//! are refused (openssl, after showing that this openssl can speak them at all) while 1.2 and
//! 1.3 with ALPN http/1.1 work; plain HTTP gets no HTTP answer; a certificate replaced by a
//! Kubernetes-style symlink swap or a rename over the file is served to new connections
//! within 5 s without a restart, and a broken one leaves the old one serving and counts a
//! failure; SIGHUP re-reads them; `--tls-client-ca` refuses a client without a certificate or with one another CA
//! signed; `lbctl phone-home` over https registers and follows an IP change; managed mode's
//! `--tls-self-signed` makes its certificate once and reuses it; `lbctl health` verifies it
//! and answers 3 (no answer) for a certificate another CA signed.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::agent::{
    ip_endpoint, lbctl, phone_home, through, trusting, Agent, ApiConn, ClientTls, Echo, Options,
    Sidecar,
};
use common::ca::{write_mode, Ca, Leaf, NOT_AFTER};

/// The DER of the first certificate in `pem`.
fn leaf_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Writes `leaf` as `dir/tls.crt` and `dir/tls.key` (0600).
fn write_leaf(dir: &Path, leaf: &Leaf) {
    std::fs::create_dir_all(dir).unwrap();
    write_mode(&dir.join("tls.crt"), &leaf.cert, 0o644);
    write_mode(&dir.join("tls.key"), &leaf.key, 0o600);
}

/// An agent serving TLS with `cert`/`key`, trusted by the harness through `client`.
fn tls_agent(cert: &Path, key: &Path, client: Arc<rustls::ClientConfig>, more: &[&str]) -> Agent {
    let mut extra = vec![
        "--tls-cert".to_string(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ];
    extra.extend(more.iter().map(|s| s.to_string()));
    Agent::managed_with(Options {
        extra,
        tls: Some(ClientTls::Config(client)),
        ..Options::default()
    })
}

/// The leaf certificate the agent presents to a new connection.
fn served_leaf(addr: SocketAddr, client: &Arc<rustls::ClientConfig>) -> Result<Vec<u8>, String> {
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut conn =
        rustls::ClientConnection::new(client.clone(), name).map_err(|e| e.to_string())?;
    let mut tcp =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    let certs = conn.peer_certificates().ok_or("no peer certificate")?;
    Ok(certs[0].to_vec())
}

/// Polls until new connections get `want`; returns how long it took (≤ `within`).
fn wait_served(
    agent: &Agent,
    client: &Arc<rustls::ClientConfig>,
    want: &[u8],
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        if served_leaf(agent.addr, client).is_ok_and(|d| d == want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "the new certificate was not served within {within:?}:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `lbctl state` against `agent` over https with `flags`.
fn lbctl_state(agent: &Agent, flags: &[&str]) -> Output {
    run(lbctl()
        .args(["state", "--agent", &format!("https://{}", agent.addr)])
        .arg("--key-file")
        .arg(&agent.keys_path)
        .args(flags))
}

/// Asserts a configuration error: exit 2 and exactly one line on stderr containing `what`.
fn assert_config_error(out: &Output, what: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    assert!(err.contains(what), "{what:?} in {err:?}");
}

/// `openssl s_client` limited to `version` (`tls1`, `tls1_1`, `tls1_2`, `tls1_3`) against
/// `port`: the protocol it negotiated, if any.
fn openssl_version(port: u16, version: &str) -> Option<String> {
    let out = run(Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg(format!("-{version}"))
        .args(["-cipher", "DEFAULT@SECLEVEL=0", "-alpn", "http/1.1"]));
    let all = text(&out.stdout) + &text(&out.stderr);
    // "New, TLSv1.3, Cipher is ...": the handshake finished ("(NONE)" when it did not). The
    // session's "Protocol  :" line, when printed, is the exact version (the "New" line names
    // the cipher's, TLSv1.0 for a TLS 1.1 session).
    let new = all.lines().find(|l| l.starts_with("New, "))?;
    if new.contains("(NONE)") {
        return None;
    }
    let protocol = match all
        .lines()
        .find(|l| l.trim_start().starts_with("Protocol  :"))
    {
        Some(l) => l.split(':').nth(1)?.trim().to_string(),
        None => new.split(',').nth(1)?.trim().to_string(),
    };
    let alpn = all.contains("ALPN protocol: http/1.1");
    Some(format!("{protocol}{}", if alpn { " alpn" } else { "" }))
}

/// An `openssl s_server` that speaks only `version`: shows this openssl can offer it.
struct OpensslServer(std::process::Child, u16);

impl OpensslServer {
    fn start(dir: &Path, version: &str) -> OpensslServer {
        let port = common::free_port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(dir.join("tls.crt"))
            .arg("-key")
            .arg(dir.join("tls.key"))
            .arg(format!("-{version}"))
            .args(["-cipher", "DEFAULT@SECLEVEL=0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        common::wait_until(
            Duration::from_secs(10),
            "openssl s_server listening",
            || TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        OpensslServer(child, port)
    }
}

impl Drop for OpensslServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn https_with_the_given_ca_works_old_tls_and_plain_http_get_nothing() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let leaf = ca.leaf(&["127.0.0.1", "localhost"], true);
    let dir = pki.path().join("tls");
    write_leaf(&dir, &leaf);
    let ca_file = pki.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let other_ca = pki.path().join("other-ca.pem");
    std::fs::write(&other_ca, Ca::new("another CA").pem()).unwrap();
    // Started and /healthz polled over TLS by the harness.
    let agent = tls_agent(
        &dir.join("tls.crt"),
        &dir.join("tls.key"),
        trusting(&ca.pem(), None),
        &[],
    );
    assert!(
        agent
            .log()
            .contains(&format!("listening on https://{}", agent.addr)),
        "{}",
        agent.log()
    );

    let out = lbctl_state(&agent, &["--ca-file", ca_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("generation"),
        "{}",
        text(&out.stdout)
    );
    // The CA from the environment, as a sidecar's manifest would set it.
    let out = run(lbctl()
        .args([
            "state",
            "--agent",
            &format!("https://localhost:{}", agent.addr.port()),
        ])
        .arg("--key-file")
        .arg(&agent.keys_path)
        .env("LBAGENT_CA_FILE", &ca_file));
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A CA that did not sign it: a configuration error, not a retry.
    let out = lbctl_state(&agent, &["--ca-file", other_ca.to_str().unwrap()]);
    assert_config_error(&out, "does not verify");
    // http:// to the TLS port: no answer is HTTP, and lbctl says what to do.
    let out = run(lbctl()
        .args(["state", "--agent", &format!("http://{}", agent.addr)])
        .arg("--key-file")
        .arg(&agent.keys_path));
    assert_config_error(&out, "https://");

    // Plain HTTP on the port gets no HTTP answer: at most a TLS alert, then the close.
    let mut s = TcpStream::connect(agent.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "not a TLS alert: {:?}",
        text(&answer)
    );
    assert!(!text(&answer).contains("HTTP/"), "{:?}", text(&answer));

    // Old versions: first shown possible for this openssl (against its own server), then
    // refused by the agent. 1.2 and 1.3 work, with ALPN http/1.1.
    for (flag, name) in [("tls1", "TLSv1"), ("tls1_1", "TLSv1.1")] {
        let control = OpensslServer::start(&dir, flag);
        assert_eq!(
            openssl_version(control.1, flag)
                .as_deref()
                .map(|p| p.trim_end_matches(" alpn")),
            Some(name),
            "this openssl cannot speak {name} at all, so refusing it would prove nothing"
        );
        assert_eq!(
            openssl_version(agent.addr.port(), flag),
            None,
            "{name} accepted"
        );
    }
    assert_eq!(
        openssl_version(agent.addr.port(), "tls1_2").as_deref(),
        Some("TLSv1.2 alpn")
    );
    assert_eq!(
        openssl_version(agent.addr.port(), "tls1_3").as_deref(),
        Some("TLSv1.3 alpn")
    );

    let m = agent.metrics();
    assert_eq!(
        m.get("lbagent_tls_cert_expiry_timestamp_seconds"),
        Some(&(NOT_AFTER as f64))
    );
    assert_eq!(m.get("lbagent_tls_cert_reload_ok"), Some(&1.0));
}

/// Silent connections that never send a ClientHello hold handshake turns: one address holds at
/// most a few, so another client's handshake is not stuck behind them.
#[test]
fn one_address_cannot_take_every_handshake_turn() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let client = trusting(&ca.pem(), None);
    let leaf = ca.leaf(&["127.0.0.1"], false);
    write_leaf(pki.path(), &leaf);
    let agent = tls_agent(
        &pki.path().join("tls.crt"),
        &pki.path().join("tls.key"),
        client.clone(),
        &[],
    );
    // More silent connections from 127.0.0.2 than there are turns for all addresses.
    let mut silent: Vec<TcpStream> = (0..200)
        .map(|_| common::agent::connect_from("127.0.0.2".parse().unwrap(), agent.addr).unwrap())
        .collect();
    // The address keeps a few turns; the agent closes the rest at once: within half the
    // handshake deadline, so it is the cap that closes them, not their timeout.
    common::wait_until(
        lbagent::tls::server::HANDSHAKE_TIMEOUT / 2,
        "the silent connections over the cap closed",
        || {
            let closed = silent
                .iter_mut()
                .filter(|c| {
                    use std::io::Read;
                    c.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
                    matches!((&**c).read(&mut [0u8; 1]), Ok(0))
                })
                .count();
            closed >= 200 - 8
        },
    );
    // So a handshake from another address finds a turn.
    assert_eq!(
        served_leaf(agent.addr, &client).unwrap(),
        leaf_der(&leaf.cert)
    );
    drop(silent);
}

#[test]
fn a_replaced_certificate_is_served_within_5s_and_a_broken_one_keeps_the_old() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let client = trusting(&ca.pem(), None);
    // Kubernetes' layout: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>/.
    let mount = pki.path().join("secret");
    let first = ca.leaf(&["127.0.0.1"], false);
    write_leaf(&mount.join("..v1"), &first);
    std::os::unix::fs::symlink("..v1", mount.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), mount.join(f)).unwrap();
    }
    let agent = tls_agent(
        &mount.join("tls.crt"),
        &mount.join("tls.key"),
        client.clone(),
        &[],
    );
    assert_eq!(
        served_leaf(agent.addr, &client).unwrap(),
        leaf_der(&first.cert)
    );

    // The kubelet's swap: a new directory, a new link renamed over ..data.
    let swap = |version: &str, leaf: &Leaf| {
        write_leaf(&mount.join(format!("..{version}")), leaf);
        let tmp = mount.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
        std::fs::rename(&tmp, mount.join("..data")).unwrap();
    };
    let second = ca.leaf(&["127.0.0.1"], true);
    swap("v2", &second);
    let took = wait_served(
        &agent,
        &client,
        &leaf_der(&second.cert),
        Duration::from_secs(5),
    );
    eprintln!("symlink swap served after {took:?}");
    let before = agent.state();

    // A certificate that does not parse: the old one keeps serving, a failure is counted.
    swap(
        "v3",
        &Leaf {
            cert: "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".into(),
            key: second.key.clone(),
        },
    );
    common::wait_until(Duration::from_secs(5), "a counted reload failure", || {
        agent.metric("lbagent_tls_cert_reload_failures_total") >= 1.0
    });
    assert_eq!(agent.metric("lbagent_tls_cert_reload_ok"), 0.0);
    assert_eq!(
        served_leaf(agent.addr, &client).unwrap(),
        leaf_der(&second.cert)
    );
    // A key that is not the certificate's: refused the same way.
    let third = ca.leaf(&["127.0.0.1"], false);
    swap(
        "v4",
        &Leaf {
            cert: third.cert.clone(),
            key: second.key.clone(),
        },
    );
    common::wait_until(Duration::from_secs(5), "a second reload failure", || {
        agent.metric("lbagent_tls_cert_reload_failures_total") >= 2.0
    });
    assert_eq!(
        served_leaf(agent.addr, &client).unwrap(),
        leaf_der(&second.cert)
    );
    assert!(
        agent.log().contains("not the certificate's"),
        "{}",
        agent.log()
    );
    assert_eq!(agent.state()["generation"], before["generation"]);
    // An expired certificate (a renewal gone wrong): clients would stop at it, so the one
    // they accept keeps serving.
    let expired = ca.leaf_valid(&["127.0.0.1"], false, (2020, 2021));
    swap("v4x", &expired);
    common::wait_until(Duration::from_secs(5), "a third reload failure", || {
        agent.metric("lbagent_tls_cert_reload_failures_total") >= 3.0
    });
    assert_eq!(
        served_leaf(agent.addr, &client).unwrap(),
        leaf_der(&second.cert)
    );
    assert!(
        agent.log().contains("expired or not valid yet"),
        "{}",
        agent.log()
    );

    // Fixed: served again, and the metric says so.
    swap("v5", &third);
    wait_served(
        &agent,
        &client,
        &leaf_der(&third.cert),
        Duration::from_secs(5),
    );
    assert_eq!(agent.metric("lbagent_tls_cert_reload_ok"), 1.0);
    assert!(
        agent.log().contains("TLS certificate not reloaded"),
        "{}",
        agent.log()
    );
    // SIGHUP re-reads too: files rewritten in place in ..v5, a directory the watch does not
    // cover (it watches the mount and, at start, ..v1), are served after the signal.
    let fourth = ca.leaf(&["127.0.0.1"], false);
    write_leaf(&mount.join("..v5"), &fourth);
    agent.signal("HUP");
    wait_served(
        &agent,
        &client,
        &leaf_der(&fourth.cert),
        Duration::from_secs(5),
    );
    assert!(agent.log().contains("cause=\"SIGHUP\""), "{}", agent.log());
}

#[test]
fn client_ca_refuses_clients_without_its_certificate_and_files_renamed_over_reload() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let dir = pki.path().join("tls");
    let leaf = ca.leaf(&["127.0.0.1"], false);
    write_leaf(&dir, &leaf);
    let ca_file = pki.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let client_ca = pki.path().join("client-ca.pem");
    std::fs::write(&client_ca, clients.pem()).unwrap();
    let good = clients.leaf(&["sidecar"], false);
    let stranger = Ca::new("another CA").leaf(&["sidecar"], false);
    for (name, l) in [("good", &good), ("stranger", &stranger)] {
        write_mode(&pki.path().join(format!("{name}.crt")), &l.cert, 0o644);
        write_mode(&pki.path().join(format!("{name}.key")), &l.key, 0o600);
    }
    let with_cert = trusting(&ca.pem(), Some((&good.cert, &good.key)));
    let agent = tls_agent(
        &dir.join("tls.crt"),
        &dir.join("tls.key"),
        with_cert.clone(),
        &["--tls-client-ca", client_ca.to_str().unwrap()],
    );

    // No certificate, or one another CA signed: refused, before any HTTP.
    let no_cert = trusting(&ca.pem(), None);
    let wrong_cert = trusting(&ca.pem(), Some((&stranger.cert, &stranger.key)));
    for (what, config) in [("no certificate", &no_cert), ("another CA's", &wrong_cert)] {
        let answer = ApiConn::connect(agent.addr, Some(config))
            .and_then(|c| c.request("GET", "/healthz", &[], b""));
        assert!(answer.is_err(), "{what}: {answer:?}");
    }
    let ca_arg = ["--ca-file", ca_file.to_str().unwrap()];
    assert_config_error(&lbctl_state(&agent, &ca_arg), "client");
    let path = |f: &str| pki.path().join(f).display().to_string();
    let (sc, sk) = (path("stranger.crt"), path("stranger.key"));
    let out = lbctl_state(
        &agent,
        &[
            ca_arg[0],
            ca_arg[1],
            "--client-cert",
            &sc,
            "--client-key",
            &sk,
        ],
    );
    assert_config_error(&out, "client");
    // The CA's own: served (the signature is still checked: lbctl signs).
    let (gc, gk) = (path("good.crt"), path("good.key"));
    let out = lbctl_state(
        &agent,
        &[
            ca_arg[0],
            ca_arg[1],
            "--client-cert",
            &gc,
            "--client-key",
            &gk,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let unsigned = ApiConn::connect(agent.addr, Some(&with_cert))
        .unwrap()
        .request("GET", "/v1/frontends", &[], b"")
        .unwrap();
    assert_eq!(unsigned.status, 401, "{unsigned:?}");

    // Renewed the way a deploy hook copies files: each renamed over the old one.
    let renewed = ca.leaf(&["127.0.0.1"], true);
    for (name, body, mode) in [
        ("tls.key", &renewed.key, 0o600),
        ("tls.crt", &renewed.cert, 0o644),
    ] {
        let tmp = dir.join(format!("{name}.new"));
        write_mode(&tmp, body, mode);
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
    let took = wait_served(
        &agent,
        &with_cert,
        &leaf_der(&renewed.cert),
        Duration::from_secs(5),
    );
    eprintln!("rename over served after {took:?}");
}

#[test]
fn phone_home_over_https_registers_follows_an_ip_change_and_a_wrong_ca_exits_2() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let dir = pki.path().join("tls");
    write_leaf(&dir, &ca.leaf(&["127.0.0.1"], false));
    let ca_file = pki.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let agent = tls_agent(
        &dir.join("tls.crt"),
        &dir.join("tls.key"),
        trusting(&ca.pem(), None),
        &[],
    );
    let (a, b) = Echo::pair("127.0.0.2", "node at .2", "127.0.0.3", "node at .3");
    let ip = Arc::new(Mutex::new("127.0.0.2".to_string()));
    let url = ip_endpoint(ip.clone());
    let fe = common::free_port();
    let agent_url = format!("https://{}", agent.addr);
    let sidecar = |ca: &Path| {
        let mut c = phone_home(&agent_url, &agent.keys_path, fe, a.port(), &url);
        c.arg("--ca-file")
            .arg(ca)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };

    let _running = Sidecar(sidecar(&ca_file).spawn().unwrap());
    common::wait_until(Duration::from_secs(20), "traffic to .2", || {
        through(fe).is_ok_and(|r| r.contains("node at .2"))
    });
    *ip.lock().unwrap() = "127.0.0.3".into();
    common::wait_until(Duration::from_secs(10), "traffic to .3", || {
        through(fe).is_ok_and(|r| r.contains("node at .3"))
    });
    let (_, desired) = agent.desired();
    let ips: Vec<&str> = desired
        .iter()
        .filter(|((port, _), _)| *port == fe)
        .map(|(_, server)| server.ip.as_str())
        .collect();
    assert_eq!(ips, ["127.0.0.3"], "{desired:?}");

    // A CA that did not sign the agent's certificate: exit 2 at once, no retry loop (without
    // --once the sidecar would otherwise retry for ever).
    let other = pki.path().join("other-ca.pem");
    std::fs::write(&other, Ca::new("another CA").pem()).unwrap();
    let mut child = sidecar(&other).spawn().unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("phone-home with a wrong CA still running after 10 s: it retries");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    assert!(err.contains("does not verify"), "{err}");
    drop(b);
}

#[test]
fn self_signed_is_made_once_reused_and_trusted_through_its_file() {
    let mut agent = Agent::managed_with(Options {
        extra: vec!["--tls-self-signed".into()],
        tls: Some(ClientTls::SelfSigned),
        ..Options::default()
    });
    let cert: PathBuf = agent.state_dir.join("tls/cert.pem");
    let pem = std::fs::read_to_string(&cert).unwrap();
    let fingerprint = |pem: &str| {
        use sha2::Digest;
        let d = sha2::Sha256::digest(leaf_der(pem));
        d.iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let log = agent.log();
    assert!(
        log.contains(&format!("SHA-256 {}", fingerprint(&pem))),
        "{log}"
    );
    assert!(
        log.contains(&format!("--ca-file {}", cert.display())),
        "{log}"
    );
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(agent.state_dir.join("tls/key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let out = lbctl_state(&agent, &["--ca-file", cert.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // `lbctl health` takes the same TLS flags, and a handshake that fails is no answer (3),
    // as keepalived must see a local agent it cannot verify as down.
    let health = |url: &str, ca: &Path| {
        run(lbctl()
            .args(["health", "--agent", url, "--ca-file"])
            .arg(ca))
    };
    let https = format!("https://{}", agent.addr);
    let out = health(&https, &cert);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).starts_with("healthy: generation "));
    let other_ca = agent.dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, Ca::new("another CA").pem()).unwrap();
    let out = health(&https, &other_ca);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).starts_with(&format!(
            "no answer from {https}: the agent's TLS certificate does not verify"
        )),
        "{}",
        text(&out.stdout)
    );
    let out = health(&format!("http://{}", agent.addr), &cert);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("not HTTP"),
        "{}",
        text(&out.stdout)
    );

    agent.restart();
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), pem, "made again");
    assert!(
        agent.log().contains("reusing the self-signed"),
        "{}",
        agent.log()
    );
    let out = lbctl_state(&agent, &["--ca-file", cert.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}
