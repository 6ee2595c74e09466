//! A real HAProxy for tests: started on temporary sockets and free loopback ports, stopped (and
//! its workers with it) when the handle drops, even when the test panics.

#![allow(dead_code)]

pub mod agent;
pub mod ca;
pub mod etcd;
pub mod flood;
pub mod netns;
pub mod proxy_backend;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable that picks the HAProxy every test, bench and script runs (a path,
/// e.g. a wrapper made by `integration/haproxy-versions.sh`); unset, the agent's own default.
pub const HAPROXY_ENV: &str = "LBAGENT_TEST_HAPROXY";

/// The haproxy binary under test: `$LBAGENT_TEST_HAPROXY`, else what the agent itself would run
/// (`haproxy` on PATH, else `/usr/sbin/haproxy`).
pub fn haproxy_bin() -> PathBuf {
    match std::env::var_os(HAPROXY_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => lbagent::haproxy::default_binary(),
    }
}

/// A HAProxy branch, as `haproxy -v` reports it (`HAProxy version 3.2.26-1 ...` is 3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Branch {
    pub major: u32,
    pub minor: u32,
}

impl Branch {
    /// Whether this branch is `major.minor` or later.
    pub fn at_least(self, major: u32, minor: u32) -> bool {
        self >= Branch { major, minor }
    }

    /// The branch of a version string such as `3.0.11-1+deb13u4`, `2.6.12` or `3.2-dev13`.
    pub fn of(version: &str) -> Option<Branch> {
        let (major, minor) = lbagent::runtime::parse::version_branch(version)?;
        Some(Branch { major, minor })
    }
}

impl std::fmt::Display for Branch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The branch of the HAProxy under test, from its own `haproxy -v` (read once per test binary):
/// tests whose assertions differ by version choose by what HAProxy says it is, never by the
/// name of the binary.
pub fn haproxy_branch() -> Branch {
    static BRANCH: std::sync::OnceLock<Branch> = std::sync::OnceLock::new();
    *BRANCH.get_or_init(|| {
        let bin = haproxy_bin();
        let out = Command::new(&bin)
            .arg("-v")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} -v: {e}", bin.display()));
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .next()
            .and_then(|l| l.strip_prefix("HAProxy version "))
            .and_then(Branch::of)
            .unwrap_or_else(|| panic!("{} -v printed no version: {text:?}", bin.display()))
    })
}

/// A port nothing listens on right now, on any address: the tests' frontends bind 127.0.0.x
/// addresses other than 127.0.0.1, and a port free on 127.0.0.1 alone may be taken there.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("0.0.0.0:0").expect("bind an ephemeral port");
    l.local_addr().unwrap().port()
}

/// Polls `check` every 20 ms until it is true or `within` has passed.
pub fn wait_until(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls (10 s at most) until the admin socket answers `show info` and the master CLI lists a
/// worker; panics with what `exited` says if HAProxy is gone, or with `log()` on timeout.
pub fn wait_haproxy_ready(
    admin: &Path,
    master: &Path,
    mut exited: impl FnMut() -> Option<String>,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if answers(admin, "show info\n").is_some_and(|a| a.contains("Version:"))
            && answers(master, "show proc\n").is_some_and(|a| a.contains("worker"))
        {
            return;
        }
        if let Some(why) = exited() {
            panic!("{why}");
        }
        assert!(
            Instant::now() < deadline,
            "haproxy sockets did not answer within 10 s:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running HAProxy in master-worker mode.
pub struct Haproxy {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// `stats socket ... level admin`
    pub admin: PathBuf,
    /// `stats socket ... level operator`
    pub operator: PathBuf,
    /// The master CLI (`-S`).
    pub master: PathBuf,
    /// `stats socket ipv4@127.0.0.1:PORT level admin`
    pub admin_tcp: String,
    pub config: PathBuf,
}

/// The global and defaults sections every test config starts with. `@DIR@` and `@TCP@` are
/// filled in by [`Haproxy::start`].
pub const GLOBAL: &str = "global
    stats socket @DIR@/admin.sock mode 600 level admin
    stats socket @DIR@/operator.sock mode 600 level operator
    stats socket ipv4@127.0.0.1:@TCP@ level admin
    stats timeout 30s
    maxconn 2000

defaults
    mode tcp
    timeout connect 1s
    timeout client 10s
    timeout server 10s
";

impl Haproxy {
    /// Starts HAProxy with [`GLOBAL`] followed by `proxies` (frontends and backends), and waits
    /// until both the admin socket and the master CLI answer.
    pub fn start(proxies: &str) -> Haproxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path().display().to_string();
        let tcp = free_port();
        let text = format!("{GLOBAL}\n{proxies}")
            .replace("@DIR@", &d)
            .replace("@TCP@", &tcp.to_string());
        let config = dir.path().join("haproxy.cfg");
        std::fs::write(&config, text).unwrap();
        let master = dir.path().join("master.sock");
        let check = Command::new(haproxy_bin())
            .arg("-c")
            .arg("-q")
            .arg("-f")
            .arg(&config)
            .output()
            .expect("run haproxy -c (is haproxy installed? apt-get install haproxy)");
        assert!(
            check.status.success(),
            "test config invalid: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new(haproxy_bin())
            .arg("-W")
            .arg("-S")
            .arg(format!("{},mode,600", master.display()))
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("haproxy.log")).unwrap())
            .spawn()
            .expect("start haproxy");
        let mut h = Haproxy {
            admin: dir.path().join("admin.sock"),
            operator: dir.path().join("operator.sock"),
            master,
            admin_tcp: format!("ipv4@127.0.0.1:{tcp}"),
            config,
            dir,
            child: Some(child),
        };
        let log_path = h.dir.path().join("haproxy.log");
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let child = h.child.as_mut().unwrap();
        wait_haproxy_ready(
            &h.admin,
            &h.master,
            || {
                let st = child.try_wait().ok().flatten()?;
                Some(format!("haproxy exited ({st}) at start:\n{}", log()))
            },
            log,
        );
        h
    }

    /// What HAProxy printed on stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }

    pub fn master_pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

/// Sends one non-interactive command straight to a socket with std, for checking effects
/// independently of the client under test. `None` when nothing answers.
pub fn answers(sock: &Path, line: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(line.as_bytes()).ok()?;
    let mut out = Vec::new();
    // The master CLI keeps the connection open: stop at the terminating empty line.
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.ends_with(b"\n\n") && sock.ends_with("master.sock") {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM lets the master stop its workers; SIGKILL if it does not within 5 s.
            send_signal(child.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

/// Sends the signal named `signal` (`"TERM"`, `"KILL"`...) to `pid`; a process already gone is
/// fine.
pub fn send_signal(pid: u32, signal: &str) {
    use std::str::FromStr;
    let sig = nix::sys::signal::Signal::from_str(&format!("SIG{signal}"))
        .unwrap_or_else(|_| panic!("no signal SIG{signal}"));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid"));
    let _ = nix::sys::signal::kill(pid, sig);
}

/// A backend/frontend layout most tests use: one frontend, a dynamic-algorithm backend with a
/// checked server (target: the `up` listener), an unchecked one and a static backend.
pub fn basic_proxies() -> String {
    let fe = free_port();
    let up = free_port();
    format!(
        "frontend fe_main
    bind 127.0.0.1:{fe}
    default_backend be_app

listen up_target
    mode http
    bind 127.0.0.1:{up}
    http-request return status 200

backend be_app
    balance roundrobin
    server web1 127.0.0.1:{up} check inter 200ms
    server web2 127.0.0.1:{up}

backend be_static
    balance static-rr
    server s1 127.0.0.1:{up}
"
    )
}
