//! Checks of `deploy/`: the files an operator copies must agree with each other and with the
//! code, and work with the real tools where they are installed.
//!
//! - `lbagent.toml` only uses `lbagent --help`'s flags, and its paths match the unit, the
//!   HAProxy drop-in and the `global` snippet;
//! - the systemd units pass `systemd-analyze verify` without a warning (skipped without it);
//! - the HAProxy snippets pass `haproxy -c`, and HAProxy started with the drop-in's own command
//!   line plus `lbagent --config deploy/lbagent.toml` (paths moved to a temp dir) serve a
//!   phone-home end to end: a new frontend reloaded through the master socket (the servers'
//!   state saved for it), and the file's policy enforced (skipped without haproxy);
//! - every Kubernetes YAML parses (PyYAML when python3 has it, else line rules only), and every
//!   `lbctl phone-home` sidecar, run with the manifest's own args, env and Secret, sends a signed
//!   PUT for its node to the agent URL it is given, inside the scope its key has in
//!   `keys.toml.example`; each namespace's sidecars sign with a key of their own; each checks
//!   its Service's `healthCheckNodePort` over HTTP, and sends the PROXY protocol only to a
//!   Traefik entry point that trusts the LB VM's address;
//! - `keys.toml.example` loads once its placeholders are filled in (and not before), its scopes
//!   inside `lbagent.toml`'s policy;
//! - the Dockerfiles build binaries that exist, from stages that exist.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::free_port;
use serde_json::Value;

const LBAGENT: &str = env!("CARGO_BIN_EXE_lbagent");
const LBCTL: &str = env!("CARGO_BIN_EXE_lbctl");

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(rel)
}

fn read(rel: &str) -> String {
    let p = deploy(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Says a check could not run here. Under CI (`CI=true`) that is a failure: CI installs
/// everything these checks need, so a skip there would hide a missing install step.
fn skip(what: &str, why: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "deploy: {what} cannot run under CI: {why}"
    );
    eprintln!("deploy: SKIPPED {what}: {why}");
}

/// A program on PATH (or in /usr/sbin, where Debian puts haproxy).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

/// The HAProxy under test, as the other tests pick it (`LBAGENT_TEST_HAPROXY`, else the
/// machine's), when there is one.
fn haproxy() -> Option<PathBuf> {
    match std::env::var_os("LBAGENT_TEST_HAPROXY") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => find_program("haproxy"),
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The value of `key = value` lines of a systemd unit, every occurrence.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_string())
        .collect()
}

fn settings() -> toml::Table {
    read("lbagent.toml")
        .parse()
        .unwrap_or_else(|e| panic!("deploy/lbagent.toml: {e}"))
}

fn setting(t: &toml::Table, key: &str) -> String {
    match t.get(key) {
        Some(toml::Value::String(s)) => s.clone(),
        other => panic!("deploy/lbagent.toml: `{key}` should be a string, is {other:?}"),
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn group_exists(name: &str) -> bool {
    std::fs::read_to_string("/etc/group")
        .map(|g| g.lines().any(|l| l.split(':').next() == Some(name)))
        .unwrap_or(false)
}

fn random_hex() -> String {
    let mut b = [0u8; 24];
    getrandom::fill(&mut b).unwrap();
    hex::encode(b)
}

fn write_private(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

// ---------------------------------------------------------------------------------------------
// lbagent.toml and how the files agree
// ---------------------------------------------------------------------------------------------

#[test]
fn toml_keys_are_lbagent_flags() {
    let help = run(Command::new(LBAGENT).arg("--help"));
    assert!(help.status.success(), "lbagent --help: {help:?}");
    let help = text(&help.stdout);
    let t = settings();
    assert!(!t.is_empty(), "deploy/lbagent.toml sets nothing");
    for key in t.keys() {
        assert!(
            help.contains(&format!("--{key} ")) || help.contains(&format!("--{key}\n")),
            "deploy/lbagent.toml sets `{key}`, which is not a flag of `lbagent --help`"
        );
        assert_ne!(key, "config", "--config cannot be set from the config file");
    }
    // Attached mode needs all of these (src/daemon.rs refuses to start without them).
    for key in [
        "socket",
        "keys-file",
        "haproxy-config",
        "managed-config",
        "state-dir",
    ] {
        assert!(t.contains_key(key), "deploy/lbagent.toml lacks `{key}`");
    }
    assert!(
        t.contains_key("master-socket") || t.contains_key("reload-command"),
        "attached mode needs master-socket or reload-command"
    );
    for key in [
        "allow-frontend-ports",
        "allow-node-ports",
        "allow-node-cidrs",
    ] {
        assert!(
            t.contains_key(key),
            "the example should narrow the policy: `{key}`"
        );
    }
}

#[test]
fn files_agree_on_paths() {
    let t = settings();
    let unit = read("lbagent.service");
    let dropin = read("haproxy/haproxy.service.d/lbagent.conf");
    let global = read("haproxy/global.cfg");

    // The unit gives the file its --config, under /etc/lbagent.
    let exec = unit_values(&unit, "ExecStart");
    assert_eq!(exec.len(), 1, "one ExecStart: {exec:?}");
    assert!(
        exec[0].ends_with("--config /etc/lbagent/lbagent.toml"),
        "ExecStart should pass --config /etc/lbagent/lbagent.toml: {}",
        exec[0]
    );
    // state-dir is the unit's StateDirectory.
    let state_dir = unit_values(&unit, "StateDirectory");
    assert_eq!(
        setting(&t, "state-dir"),
        format!("/var/lib/{}", state_dir.first().expect("StateDirectory="))
    );
    // The managed file's directory is writable (the agent renames <file>.tmp into place), and
    // is not /etc/haproxy itself.
    let managed = PathBuf::from(setting(&t, "managed-config"));
    let managed_dir = managed.parent().unwrap().to_str().unwrap().to_string();
    assert_ne!(
        managed_dir, "/etc/haproxy",
        "give the managed file its own directory"
    );
    let rw: Vec<String> = unit_values(&unit, "ReadWritePaths")
        .iter()
        .flat_map(|v| {
            v.split_whitespace()
                .map(|s| s.trim_start_matches('-').to_string())
        })
        .collect();
    assert!(
        rw.contains(&managed_dir),
        "ReadWritePaths {rw:?} should hold {managed_dir}"
    );
    // HAProxy loads that very file, and opens the master socket the agent reloads through.
    let start = unit_values(&dropin, "ExecStart");
    let start = start.last().expect("drop-in ExecStart");
    let managed_arg = format!("-f {}", managed.display());
    assert!(start.contains(&managed_arg), "{start}: no `{managed_arg}`");
    let master = setting(&t, "master-socket");
    assert!(
        start.contains(&format!("-S {master},mode,660,group,haproxy")),
        "{start}: the master socket should be {master}, mode 660, group haproxy"
    );
    for reload in unit_values(&dropin, "ExecReload")
        .iter()
        .filter(|r| r.contains(" -c "))
    {
        assert!(
            reload.contains(&managed_arg),
            "{reload}: no `{managed_arg}`"
        );
    }
    // The admin socket the agent drives is the one the global snippet opens, at level admin.
    let socket = setting(&t, "socket");
    let line = global
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("stats socket "))
        .expect("a stats socket line in global.cfg");
    assert!(
        line.starts_with(&format!("stats socket {socket} ")),
        "{line}: not {socket}"
    );
    for needed in ["mode 660", "level admin", "expose-fd listeners"] {
        assert!(line.contains(needed), "{line}: lacks `{needed}`");
    }
    // The audit log is in the unit's LogsDirectory, and logrotate rotates that very file.
    let audit = PathBuf::from(setting(&t, "audit-log"));
    let logs = unit_values(&unit, "LogsDirectory");
    assert_eq!(
        audit.parent().unwrap(),
        Path::new("/var/log").join(logs.first().expect("LogsDirectory=")),
        "audit-log should be in the unit's LogsDirectory"
    );
    let rotate = read("lbagent.logrotate");
    assert!(
        rotate
            .lines()
            .any(|l| l.trim() == format!("{} {{", audit.display())),
        "deploy/lbagent.logrotate should rotate {}",
        audit.display()
    );
    assert!(
        rotate.contains("HUP"),
        "logrotate must SIGHUP the agent to reopen the file"
    );
    // The servers' state goes where HAProxy reads it, in a directory the unit may write.
    let state_file = setting(&t, "server-state-file");
    assert!(
        global
            .lines()
            .any(|l| l.trim() == format!("server-state-file {state_file}")),
        "global.cfg should name {state_file} as its server-state-file"
    );
    let state_dir = Path::new(&state_file).parent().unwrap().to_str().unwrap();
    assert!(
        rw.iter().any(|d| d == state_dir),
        "ReadWritePaths {rw:?} should hold {state_dir}"
    );
    // The unit's user may open both sockets (mode 660, group haproxy).
    assert_eq!(unit_values(&unit, "SupplementaryGroups"), ["haproxy"]);
    assert_eq!(unit_values(&unit, "User"), ["lbagent"]);
    for (key, want) in [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Restart", "on-failure"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
    ] {
        assert_eq!(unit_values(&unit, key), [want], "{key}=");
    }
    for key in ["After", "Wants"] {
        assert!(
            unit_values(&unit, key)
                .iter()
                .any(|v| v.split_whitespace().any(|u| u == "haproxy.service")),
            "{key}= should name haproxy.service"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------------

/// Debian bookworm's haproxy.service, for hosts without the package's unit.
const DEBIAN_HAPROXY_UNIT: &str = "[Unit]
Description=HAProxy Load Balancer
After=network-online.target rsyslog.service
Wants=network-online.target

[Service]
EnvironmentFile=-/etc/default/haproxy
EnvironmentFile=-/etc/sysconfig/haproxy
Environment=\"CONFIG=/etc/haproxy/haproxy.cfg\" \"PIDFILE=/run/haproxy.pid\" \"EXTRAOPTS=-S /run/haproxy-master.sock\"
ExecStart=/usr/sbin/haproxy -Ws -f $CONFIG -p $PIDFILE $EXTRAOPTS
ExecReload=/usr/sbin/haproxy -Ws -f $CONFIG -c -q $EXTRAOPTS
ExecReload=/bin/kill -USR2 $MAINPID
KillMode=mixed
Restart=always
SuccessExitStatus=143
Type=notify

[Install]
WantedBy=multi-user.target
";

#[test]
fn systemd_units_verify() {
    let Some(analyze) = find_program("systemd-analyze") else {
        return skip("systemd-analyze verify", "systemd-analyze is not installed");
    };
    if !Path::new("/usr/sbin/haproxy").is_file() {
        return skip(
            "systemd-analyze verify",
            "haproxy.service's ExecStart /usr/sbin/haproxy is not installed",
        );
    }
    let dir = tempfile::tempdir().unwrap();
    // The agent's unit, with ExecStart pointing at the binary just built (verify checks that
    // the program exists).
    let unit = read("lbagent.service").replace("/usr/local/bin/lbagent", LBAGENT);
    std::fs::write(dir.path().join("lbagent.service"), unit).unwrap();
    let haproxy_unit = std::fs::read_to_string("/lib/systemd/system/haproxy.service")
        .unwrap_or_else(|_| DEBIAN_HAPROXY_UNIT.to_string());
    std::fs::write(dir.path().join("haproxy.service"), haproxy_unit).unwrap();
    let dropins = dir.path().join("haproxy.service.d");
    std::fs::create_dir(&dropins).unwrap();
    std::fs::copy(
        deploy("haproxy/haproxy.service.d/lbagent.conf"),
        dropins.join("lbagent.conf"),
    )
    .unwrap();
    for unit in ["lbagent.service", "haproxy.service"] {
        let out = run(Command::new(&analyze)
            .arg("verify")
            .arg(dir.path().join(unit))
            .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
            .env("SYSTEMD_LOG_LEVEL", "warning"));
        let stderr = text(&out.stderr);
        // systemd-analyze exits 0 on unknown keys and bad values, and only warns: any warning
        // about these files is a failure. Warnings about other units of the host are not ours.
        let ours: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains(&*dir.path().to_string_lossy()) || l.contains(unit))
            .collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "systemd-analyze verify {unit}: {}\n{stderr}",
            out.status
        );
    }
    // The check has teeth: a misspelt key is reported.
    let bad = read("lbagent.service")
        .replace("/usr/local/bin/lbagent", LBAGENT)
        .replace("ProtectSystem=", "ProtectSystm=");
    std::fs::write(dir.path().join("bad.service"), bad).unwrap();
    let out = run(Command::new(&analyze)
        .arg("verify")
        .arg(dir.path().join("bad.service"))
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display())));
    assert!(
        text(&out.stderr).contains("ProtectSystm"),
        "systemd-analyze did not report a misspelt key: {out:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// HAProxy
// ---------------------------------------------------------------------------------------------

/// Processes killed when the test ends, also on a panic.
struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in self.0.iter_mut().rev() {
            // SIGTERM first (the agent and HAProxy's master stop cleanly), then SIGKILL.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A main config: the `global` snippet with its socket moved into `dir`, and defaults like
/// Debian's (mode http, option httplog: the agent's frontends set `mode tcp` themselves).
fn main_config(dir: &Path) -> String {
    let global = read("haproxy/global.cfg")
        .replace(
            "/run/haproxy/admin.sock",
            &dir.join("admin.sock").display().to_string(),
        )
        .replace(
            "/etc/haproxy/lbagent/server-state",
            &dir.join("server-state").display().to_string(),
        );
    format!(
        "{global}
defaults
    log global
    mode http
    option httplog
    timeout connect 5s
    timeout client 50s
    timeout server 50s
    load-server-state-from-file global
"
    )
}

#[test]
fn haproxy_snippets_pass_haproxy_c() {
    let Some(bin) = haproxy() else {
        return skip("haproxy -c", "haproxy is not installed");
    };
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("haproxy.cfg");
    std::fs::write(&main, main_config(dir.path())).unwrap();
    let out = run(Command::new(&bin)
        .arg("-c")
        .arg("-f")
        .arg(&main)
        .arg("-f")
        .arg(deploy("haproxy/lbagent.cfg")));
    assert!(
        out.status.success(),
        "haproxy -c refuses deploy/haproxy/global.cfg + lbagent.cfg:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // And it would notice a broken snippet.
    std::fs::write(
        &main,
        main_config(dir.path()).replace("level admin", "level boss"),
    )
    .unwrap();
    let out = run(Command::new(&bin).arg("-c").arg("-f").arg(&main));
    assert!(!out.status.success(), "haproxy -c accepted `level boss`");
}

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Some((status, body.to_string()))
}

fn wait_for(what: &str, within: Duration, logs: &[&Path], mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !ok() {
        if Instant::now() > end {
            let logs: String = logs
                .iter()
                .map(|p| {
                    format!(
                        "--- {}:\n{}\n",
                        p.display(),
                        std::fs::read_to_string(p).unwrap_or_default()
                    )
                })
                .collect();
            panic!("timed out after {within:?} waiting for {what}\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The drop-in's ExecStart, with Debian's variables and the fixed paths moved into `dir`.
fn dropin_command(dir: &Path, main: &Path, managed: &Path, master: &Path) -> Vec<String> {
    let dropin = read("haproxy/haproxy.service.d/lbagent.conf");
    let start = unit_values(&dropin, "ExecStart");
    let start = start.last().expect("drop-in ExecStart");
    let keep_group = is_root() && group_exists("haproxy");
    start
        .split_whitespace()
        .filter(|w| *w != "$EXTRAOPTS")
        .map(|w| {
            let w = w
                .replace("$CONFIG", &main.display().to_string())
                .replace("$PIDFILE", &dir.join("haproxy.pid").display().to_string())
                .replace(
                    "/etc/haproxy/lbagent/lbagent.cfg",
                    &managed.display().to_string(),
                )
                .replace("/run/haproxy-master.sock", &master.display().to_string());
            // Only root may hand the socket to the haproxy group.
            if keep_group {
                w
            } else {
                w.replace(",group,haproxy", "")
            }
        })
        .collect()
}

#[test]
fn attached_mode_with_the_deploy_files() {
    let Some(bin) = haproxy() else {
        return skip("attached mode end to end", "haproxy is not installed");
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let main = d.join("haproxy.cfg");
    std::fs::write(&main, main_config(d)).unwrap();
    let managed_dir = d.join("lbagent");
    std::fs::create_dir(&managed_dir).unwrap();
    let managed = managed_dir.join("lbagent.cfg");
    let master = d.join("master.sock");
    let admin = d.join("admin.sock");

    // The drop-in's ExecStartPre creates the agent's file when it is missing.
    let dropin = read("haproxy/haproxy.service.d/lbagent.conf");
    for pre in unit_values(&dropin, "ExecStartPre") {
        let pre = pre.replace(
            "/etc/haproxy/lbagent/lbagent.cfg",
            &managed.display().to_string(),
        );
        let script = pre
            .strip_prefix("/bin/sh -c '")
            .and_then(|s| s.strip_suffix('\''))
            .unwrap_or_else(|| panic!("ExecStartPre is not /bin/sh -c '...': {pre}"));
        let out = run(Command::new("/bin/sh").arg("-c").arg(script));
        assert!(out.status.success(), "ExecStartPre: {out:?}");
    }
    assert!(managed.is_file(), "ExecStartPre did not create {managed:?}");

    let argv = dropin_command(d, &main, &managed, &master);
    assert!(argv[0].ends_with("/haproxy"), "{argv:?}");
    let haproxy_log = d.join("haproxy.log");
    let mut procs = Kill(Vec::new());
    procs.0.push(
        Command::new(&bin)
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&haproxy_log).unwrap())
            .stderr(std::fs::File::create(d.join("haproxy.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    let haproxy_err = d.join("haproxy.err");
    wait_for(
        "HAProxy's sockets",
        Duration::from_secs(10),
        &[&haproxy_err],
        || admin.exists() && master.exists(),
    );

    // The agent: deploy/lbagent.toml, with the paths moved here. Policy, auth window and
    // reconcile interval come from the file; the frontend port is one a test may bind.
    let secret = random_hex();
    let keys = d.join("keys.toml");
    write_private(&keys, &format!("cluster1 = \"{secret}\"\n"));
    let port = free_port();
    let api: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let frontend = free_port();
    let agent_log = d.join("agent.log");
    let state = d.join("state");
    procs.0.push(
        Command::new(LBAGENT)
            .arg("--config")
            .arg(deploy("lbagent.toml"))
            .args(["--listen", &api.to_string()])
            .arg("--state-dir")
            .arg(&state)
            .arg("--keys-file")
            .arg(&keys)
            .arg("--socket")
            .arg(&admin)
            .arg("--master-socket")
            .arg(&master)
            .arg("--haproxy-config")
            .arg(&main)
            .arg("--managed-config")
            .arg(&managed)
            .arg("--server-state-file")
            .arg(d.join("server-state"))
            .arg("--audit-log")
            .arg(d.join("audit.log"))
            .arg("--haproxy-bin")
            .arg(&bin)
            .args(["--allow-frontend-ports", &frontend.to_string()])
            .args(["--frontend-bind", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&agent_log).unwrap())
            .stderr(std::fs::File::create(d.join("agent.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    let agent_err = d.join("agent.err");
    let logs = [
        agent_log.as_path(),
        agent_err.as_path(),
        haproxy_err.as_path(),
    ];
    wait_for("/healthz 200", Duration::from_secs(20), &logs, || {
        if let Ok(Some(status)) = procs.0[1].try_wait() {
            let err = std::fs::read_to_string(&agent_err).unwrap_or_default();
            panic!("lbagent --config deploy/lbagent.toml exited ({status}):\n{err}");
        }
        matches!(http_get(api, "/healthz"), Some((200, _)))
    });

    // The sidecar, as the manifests run it: a new frontend (validated, reloaded through the
    // master socket the drop-in opens).
    let phone_home = |node_ip: &str| {
        run(Command::new(LBCTL)
            .args(["phone-home", "--once", "--timeout", "20s"])
            .args(["--agent", &format!("http://{api}")])
            .arg("--key-file")
            .arg(&keys)
            .args(["--key-id", "cluster1"])
            .args(["--frontend-port", &frontend.to_string()])
            .args([
                "--node-port",
                "30443",
                "--node",
                "node-a",
                "--service",
                "traefik",
            ])
            .args(["--node-ip", node_ip]))
    };
    let t = settings();
    let cidrs = setting(&t, "allow-node-cidrs");
    let inside = cidrs.split(',').next().unwrap().split('/').next().unwrap();
    let out = phone_home(inside);
    assert!(
        out.status.success(),
        "phone-home {inside}: {out:?}\n{}",
        std::fs::read_to_string(&agent_err).unwrap_or_default()
    );
    assert!(
        text(&out.stderr).contains("\"applied\":\"reload\""),
        "{out:?}"
    );
    wait_for(
        "HAProxy to listen on the new frontend",
        Duration::from_secs(10),
        &logs,
        || TcpStream::connect(("127.0.0.1", frontend)).is_ok(),
    );
    let file = std::fs::read_to_string(&managed).unwrap();
    assert!(
        file.contains(&format!("frontend fe_{frontend}")),
        "{managed:?}:\n{file}"
    );
    // The servers' state was saved where the global snippet has HAProxy read it.
    let logs: String = [&agent_log, &agent_err]
        .iter()
        .map(|l| std::fs::read_to_string(l).unwrap_or_default())
        .collect();
    assert!(
        !logs.contains("could not save the servers' state")
            && logs.contains("saved the servers' state for the new worker"),
        "{logs}"
    );
    // The file's policy is in force: an address outside allow-node-cidrs is refused (403, exit 2).
    let out = phone_home("192.0.2.1");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("allow-node-cidrs"), "{out:?}");
}

// ---------------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------------

fn k8s_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![deploy("k8s")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                out.push(p);
            }
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no YAML under deploy/k8s");
    out
}

/// What can be checked without a YAML parser: no tabs, every document has apiVersion and kind.
#[test]
fn k8s_yaml_line_rules() {
    for f in k8s_files() {
        let t = std::fs::read_to_string(&f).unwrap();
        for (i, l) in t.lines().enumerate() {
            assert!(
                !l.starts_with('\t') && !l.trim_start_matches(' ').starts_with('\t'),
                "{}:{}: a tab in the indentation",
                f.display(),
                i + 1
            );
            assert!(
                !l.ends_with(' '),
                "{}:{}: trailing space",
                f.display(),
                i + 1
            );
        }
        for doc in t.split("\n---\n") {
            let top: Vec<&str> = doc
                .lines()
                .filter(|l| !l.starts_with(' ') && !l.starts_with('#') && !l.is_empty())
                .collect();
            for key in ["apiVersion:", "kind:"] {
                assert!(
                    top.iter().any(|l| l.starts_with(key)),
                    "{}: a document without `{key}`:\n{doc}",
                    f.display()
                );
            }
        }
    }
}

/// Every YAML document of a file as JSON, through PyYAML; `None` when python3 or PyYAML is
/// missing.
fn yaml_docs(path: &Path) -> Option<Vec<Value>> {
    let python = find_program("python3")?;
    let probe = Command::new(&python)
        .args(["-c", "import yaml"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    if !probe.success() {
        return None;
    }
    let out = run(Command::new(&python)
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
             with open(sys.argv[1]) as f:\n    \
                 docs = [d for d in yaml.safe_load_all(f) if d is not None]\n\
             json.dump(docs, sys.stdout)\n",
        )
        .arg(path));
    assert!(
        out.status.success(),
        "{} does not parse as YAML:\n{}",
        path.display(),
        text(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

/// A stand-in agent that records one request and answers 403, so `lbctl phone-home` exits.
fn refusing_agent() -> (SocketAddr, mpsc::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            s.set_read_timeout(Some(Duration::from_secs(10))).ok();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n");
                if let Some(end) = head_end {
                    let head = text(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body = r#"{"error":"forbidden","message":"test stand-in"}"#;
            let _ = write!(
                s,
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tx.send(text(&buf));
        }
    });
    (addr, rx)
}

/// `$(NAME)` references in a container's args, expanded as the kubelet does.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

const NODE_NAME: &str = "node-a";
const NODE_IP: &str = "10.0.0.7";

#[test]
fn k8s_manifests_parse_and_sidecars_phone_home() {
    let files = k8s_files();
    let mut docs = Vec::new();
    for f in &files {
        match yaml_docs(f) {
            Some(d) => docs.extend(d.into_iter().map(|d| (f.clone(), d))),
            None => {
                return skip(
                    "Kubernetes YAML parsing",
                    "python3 with PyYAML is not available (line rules still ran)",
                )
            }
        }
    }
    for (f, d) in &docs {
        assert!(
            d["apiVersion"].is_string(),
            "{}: no apiVersion",
            f.display()
        );
        let kind = d["kind"].as_str().expect("kind");
        if kind == "Kustomization" {
            for r in d["resources"].as_array().expect("resources") {
                let r = f.parent().unwrap().join(r.as_str().unwrap());
                assert!(r.exists(), "{}: resource {r:?} is missing", f.display());
            }
            continue;
        }
        assert!(
            d["metadata"]["name"].is_string(),
            "{}: a {kind} without metadata.name",
            f.display()
        );
    }
    // Secrets by (namespace, name): each namespace has a `lbagent-key` of its own.
    let secrets: BTreeMap<(&str, &str), &Value> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == "Secret")
        .map(|(_, d)| {
            let ns = d["metadata"]["namespace"]
                .as_str()
                .expect("a Secret's namespace");
            (
                (ns, d["metadata"]["name"].as_str().unwrap()),
                &d["stringData"],
            )
        })
        .collect();
    let keys_example = keys_example();
    let mut key_ids_by_namespace: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let services: Vec<&Value> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == "Service")
        .map(|(_, d)| d)
        .collect();
    let t = settings();
    let frontend_ports: lbagent::policy::PortList =
        setting(&t, "allow-frontend-ports").parse().unwrap();
    let node_ports: lbagent::policy::PortList = setting(&t, "allow-node-ports").parse().unwrap();

    let mut sidecars = 0;
    for (f, d) in &docs {
        let kind = d["kind"].as_str().unwrap();
        if !matches!(kind, "DaemonSet" | "Deployment" | "StatefulSet") {
            continue;
        }
        let what = format!("{}: {kind} {}", f.display(), d["metadata"]["name"]);
        let namespace = d["metadata"]["namespace"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no namespace"));
        let pod = &d["spec"]["template"];
        let labels = &pod["metadata"]["labels"];
        let spec = &pod["spec"];
        for c in spec["containers"].as_array().expect("containers") {
            let args: Vec<&str> = c["args"]
                .as_array()
                .map(|a| a.iter().map(|x| x.as_str().unwrap()).collect())
                .unwrap_or_default();
            if args.first() != Some(&"phone-home") {
                continue;
            }
            sidecars += 1;
            let what = format!("{what}, container {}", c["name"]);
            // The DELETE on SIGTERM needs time: --timeout (10 s) after the preStop pauses.
            let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
            assert!(grace >= 30, "{what}: terminationGracePeriodSeconds {grace}");

            // The env the kubelet would give it.
            let mut env = BTreeMap::new();
            let mut manifest_url = None;
            for e in c["env"].as_array().expect("env") {
                let name = e["name"].as_str().unwrap().to_string();
                let value = if let Some(v) = e["value"].as_str() {
                    v.to_string()
                } else if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    match (name.as_str(), field) {
                        ("NODE_NAME", "spec.nodeName") => NODE_NAME.to_string(),
                        ("NODE_IP", "status.hostIP") => NODE_IP.to_string(),
                        other => panic!("{what}: unexpected fieldRef {other:?}"),
                    }
                } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
                    let secret = secrets
                        .get(&(namespace, r["name"].as_str().unwrap()))
                        .unwrap_or_else(|| panic!("{what}: no Secret {r:?} in {namespace}"));
                    secret[r["key"].as_str().unwrap()]
                        .as_str()
                        .unwrap_or_else(|| panic!("{what}: no such Secret key {r:?}"))
                        .to_string()
                } else {
                    panic!("{what}: env {name} has no value this test knows")
                };
                if name == "LBAGENT_URL" {
                    manifest_url = Some(value.clone());
                }
                env.insert(name, value);
            }
            for n in ["NODE_NAME", "NODE_IP"] {
                assert!(env.contains_key(n), "{what}: no {n} from the downward API");
            }
            let url = manifest_url.unwrap_or_else(|| panic!("{what}: no LBAGENT_URL"));
            assert!(url.starts_with("http://"), "{what}: LBAGENT_URL {url}");

            // Secret volumes, written where the container would see them.
            let mounts = tempfile::tempdir().unwrap();
            let mut path_map = Vec::new();
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                let vol = spec["volumes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|v| v["name"] == m["name"])
                    .unwrap_or_else(|| panic!("{what}: no volume {}", m["name"]));
                let Some(secret) = vol["secret"]["secretName"].as_str() else {
                    continue;
                };
                let data = secrets.get(&(namespace, secret)).unwrap_or_else(|| {
                    panic!("{what}: Secret {secret} is not in namespace {namespace} of deploy/k8s")
                });
                let dir = mounts.path().join(m["name"].as_str().unwrap());
                std::fs::create_dir(&dir).unwrap();
                for (k, v) in data.as_object().unwrap() {
                    write_private(&dir.join(k), v.as_str().unwrap());
                }
                path_map.push((m["mountPath"].as_str().unwrap().to_string(), dir));
            }

            let (stand_in, request) = refusing_agent();
            let args: Vec<String> = args
                .iter()
                .map(|a| {
                    let mut a = expand(a, &env);
                    for (from, to) in &path_map {
                        a = a.replace(from.as_str(), &to.display().to_string());
                    }
                    a
                })
                .collect();
            let out = run(Command::new(LBCTL)
                .args(&args)
                .env_clear()
                .envs(&env)
                .env("LBAGENT_URL", format!("http://{stand_in}")));
            let stderr = text(&out.stderr);
            assert!(
                out.status.code() == Some(2)
                    && stderr.contains("refused it (403 forbidden): test stand-in"),
                "{what}: lbctl {args:?} did not reach the agent: {out:?}"
            );
            let req = request
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("{what}: no request"));

            // What it sent: a PUT for this node, signed with the Secret's key.
            let fp = arg_value(&args, "--frontend-port").parse::<u16>().unwrap();
            let np = arg_value(&args, "--node-port").parse::<u16>().unwrap();
            let path = format!("/v1/frontends/{fp}/servers/{NODE_NAME}");
            assert!(
                req.starts_with(&format!("PUT {path} HTTP/1.1\r\n")),
                "{what}: {req}"
            );
            let (head, body) = req.split_once("\r\n\r\n").unwrap();
            let header = |name: &str| {
                head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                })
            };
            let key_id = header("x-lbagent-key").unwrap_or_else(|| "default".into());
            let secret = secrets
                .iter()
                .filter(|((ns, _), _)| *ns == namespace)
                .map(|(_, s)| s)
                .find(|s| s["id"].as_str() == Some(key_id.as_str()))
                .and_then(|s| s["key"].as_str())
                .unwrap_or_else(|| panic!("{what}: signed with key {key_id:?}, in no Secret"));
            let keys =
                lbagent::auth::Keys::from_pairs([(key_id.clone(), secret.as_bytes().to_vec())])
                    .unwrap_or_else(|e| panic!("{what}: the Secret's key: {e}"));
            let verifier = lbagent::auth::Verifier::new(keys, Duration::from_secs(300));
            let (ts, nonce, sig) = (
                header("x-lbagent-timestamp"),
                header("x-lbagent-nonce"),
                header("x-lbagent-signature"),
            );
            let now = ts.as_deref().and_then(|t| t.parse().ok()).unwrap_or(0);
            let headers = lbagent::auth::AuthHeaders {
                key_id: Some(&key_id),
                timestamp: ts.as_deref(),
                nonce: nonce.as_deref(),
                signature: sig.as_deref(),
            };
            verifier
                .verify("PUT", &path, &headers, body.as_bytes(), now)
                .unwrap_or_else(|e| panic!("{what}: bad signature: {e:?}"));
            let body: Value = serde_json::from_str(body).unwrap();
            assert_eq!(body["node_ip"], NODE_IP, "{what}");
            assert_eq!(body["node_port"], np, "{what}");
            // Its frontend settings, read and checked as the agent reads them.
            let settings = body.get("frontend").map(|f| {
                serde_json::from_value::<lbagent::model::settings::RawSettings>(f.clone())
                    .unwrap_or_else(|e| panic!("{what}: frontend {f}: {e}"))
                    .validate("frontend.")
                    .unwrap_or_else(|e| panic!("{what}: {e}"))
            });

            // Its key is a scoped key of the keys example, and this PUT is inside its scope.
            let scope = keys_example.scope(&key_id).unwrap_or_else(|| {
                panic!("{what}: key {key_id:?} is no scoped key of deploy/keys.toml.example")
            });
            let change = lbagent::model::Change::PutServer {
                frontend_port: fp,
                node: lbagent::model::NodeName::new(NODE_NAME).unwrap(),
                mode: lbagent::model::Mode::Tcp,
                spec: lbagent::model::ServerSpec {
                    node_ip: NODE_IP.parse().unwrap(),
                    node_port: np,
                    state: lbagent::model::ServerState::Ready,
                    service: None,
                    weight: None,
                    lease: true,
                },
                frontend: settings.clone(),
            };
            scope
                .check(&change, None)
                .unwrap_or_else(|e| panic!("{what}: outside its key's scope: {}", e.message));
            key_ids_by_namespace
                .entry(namespace.to_string())
                .or_default()
                .insert(key_id.clone());

            // The agent's example policy lets it in, and a Service with
            // externalTrafficPolicy Local selects this pod on that NodePort.
            assert!(
                frontend_ports.contains(fp),
                "{what}: frontend port {fp} outside policy"
            );
            assert!(
                node_ports.contains(np),
                "{what}: node port {np} outside policy"
            );
            let service = services.iter().find(|s| {
                let sel = s["spec"]["selector"].as_object();
                sel.is_some_and(|sel| sel.iter().all(|(k, v)| &labels[k] == v))
                    && s["spec"]["ports"]
                        .as_array()
                        .is_some_and(|ps| ps.iter().any(|p| p["nodePort"] == np))
            });
            let service =
                service.unwrap_or_else(|| panic!("{what}: no Service with nodePort {np}"));
            assert_eq!(
                service["spec"]["externalTrafficPolicy"], "Local",
                "{what}: a node's NodePort must reach only the pod on that node"
            );

            // HAProxy checks what kube-proxy says of the node: GET /healthz on the Service's
            // healthCheckNodePort (200 with a ready local pod), not a bare connect.
            let hc = service["spec"]["healthCheckNodePort"]
                .as_u64()
                .unwrap_or_else(|| panic!("{what}: its Service names no healthCheckNodePort"));
            let check = settings.as_ref().map(|s| &s.check);
            assert_eq!(
                check.and_then(|c| c.port).map(u64::from),
                Some(hc),
                "{what}: --check-port must be its Service's healthCheckNodePort"
            );
            assert_eq!(
                check.and_then(|c| c.http_path.as_ref()).map(|p| p.as_str()),
                Some("/healthz"),
                "{what}: kube-proxy answers GET /healthz on the healthCheckNodePort"
            );
            // allow-node-ports bounds the check port too: the example's policy lets it through.
            assert!(
                node_ports.contains(hc as u16),
                "{what}: the example's allow-node-ports ({node_ports}) must hold the check port {hc}"
            );

            // A PROXY header is sent only to a container that reads it from the LB VM.
            if settings
                .as_ref()
                .is_some_and(|s| s.proxy() != lbagent::model::ProxyProtocol::None)
            {
                let lb_ip: std::net::IpAddr = url
                    .trim_start_matches("http://")
                    .rsplit_once(':')
                    .and_then(|(host, _)| host.parse().ok())
                    .unwrap_or_else(|| panic!("{what}: LBAGENT_URL {url} has no IP address"));
                proxy_protocol_is_read_from(spec, service, np, lb_ip, &what);
            }
        }
    }
    // kube-proxy refuses a Service whose node ports collide; the test's stand-ins would not.
    let mut node_ports_seen = BTreeSet::new();
    for svc in &services {
        let hc = svc["spec"]["healthCheckNodePort"].as_u64();
        let ports = svc["spec"]["ports"].as_array().unwrap().iter();
        for p in ports.filter_map(|p| p["nodePort"].as_u64()).chain(hc) {
            assert!(
                (30000..=32767).contains(&p),
                "{}: node port {p} outside 30000-32767",
                svc["metadata"]["name"]
            );
            assert!(
                node_ports_seen.insert(p),
                "{}: node port {p} used twice",
                svc["metadata"]["name"]
            );
        }
    }
    assert!(
        sidecars >= 2,
        "expected phone-home sidecars, found {sidecars}"
    );
    // A key per namespace: the sidecars of one namespace share one key id, and no two
    // namespaces share one, so a leaked key is the leak of one namespace only.
    assert!(
        key_ids_by_namespace.len() >= 2,
        "expected sidecars in several namespaces: {key_ids_by_namespace:?}"
    );
    let mut owners: BTreeMap<&str, &str> = BTreeMap::new();
    for (ns, ids) in &key_ids_by_namespace {
        assert_eq!(
            ids.len(),
            1,
            "namespace {ns}: sidecars sign with several keys {ids:?}"
        );
        let id = ids.first().unwrap();
        if let Some(other) = owners.insert(id, ns) {
            panic!("namespaces {other} and {ns} share the key {id:?}: give each its own");
        }
    }
}

/// Checks that the container behind `service`'s `node_port` reads the PROXY protocol from
/// `lb_ip`: for Traefik, the entry point on that container port has
/// `proxyProtocol.trustedIPs` covering it. Another server is one this test cannot vouch for.
fn proxy_protocol_is_read_from(
    pod: &Value,
    service: &Value,
    node_port: u16,
    lb_ip: std::net::IpAddr,
    what: &str,
) {
    let target = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["nodePort"] == node_port)
        .map(|p| p["targetPort"].clone())
        .unwrap();
    let (container, port) = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|c| {
            let p = c["ports"]
                .as_array()?
                .iter()
                .find(|p| p["name"] == target || p["containerPort"] == target)?;
            Some((c, p["containerPort"].as_u64()?))
        })
        .unwrap_or_else(|| panic!("{what}: no container port {target}"));
    let name = &container["name"];
    let image = container["image"].as_str().unwrap_or("");
    assert!(
        image.starts_with("traefik:"),
        "{what}: sends the PROXY protocol to container {name} ({image}), which this test cannot \
         see reading it"
    );
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let entry_point = args
        .iter()
        .find_map(|a| {
            let (ep, addr) = a.strip_prefix("--entryPoints.")?.split_once(".address=")?;
            (addr == format!(":{port}")).then_some(ep)
        })
        .unwrap_or_else(|| panic!("{what}: no Traefik entry point on :{port}"));
    let flag = format!("--entryPoints.{entry_point}.proxyProtocol.trustedIPs=");
    let trusted = args
        .iter()
        .find_map(|a| a.strip_prefix(flag.as_str()))
        .unwrap_or_else(|| panic!("{what}: {name} has no {flag}, so it would not read the header"));
    let prefixes: lbagent::policy::CidrList = trusted
        .split(',')
        .map(|t| match (t.contains('/'), t.contains(':')) {
            (true, _) => t.to_string(),
            (false, false) => format!("{t}/32"),
            (false, true) => format!("{t}/128"),
        })
        .collect::<Vec<_>>()
        .join(",")
        .parse()
        .unwrap_or_else(|e| panic!("{what}: {flag}{trusted}: {e}"));
    assert!(
        !prefixes.is_any() && prefixes.contains(&lb_ip),
        "{what}: {flag}{trusted} does not hold the LB VM's address {lb_ip}"
    );
}

/// deploy/keys.toml.example with its placeholders replaced by secrets (as the operator would),
/// loaded by the agent's own parser.
fn keys_example() -> lbagent::auth::Keys {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let mut text = read("keys.toml.example");
    while text.contains("\"CHANGE-ME\"") {
        text = text.replacen("\"CHANGE-ME\"", &format!("\"{}\"", random_hex()), 1);
    }
    write_private(&path, &text);
    lbagent::auth::Keys::load(&path).unwrap_or_else(|e| panic!("deploy/keys.toml.example: {e}"))
}

#[test]
fn keys_example_has_scoped_keys_inside_the_policy_and_is_refused_until_filled_in() {
    // As shipped, its placeholders are refused: copied unchanged, it cannot open the API.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    write_private(&path, &read("keys.toml.example"));
    let err = lbagent::auth::Keys::load(&path).expect_err("placeholder secrets must be refused");
    assert!(err.to_string().contains("at least 16"), "{err}");

    let keys = keys_example();
    let t = settings();
    let policy: lbagent::policy::PortList = setting(&t, "allow-frontend-ports").parse().unwrap();
    let scoped: Vec<&str> = keys.ids().filter(|id| keys.scope(id).is_some()).collect();
    assert!(
        scoped.len() >= 2,
        "the example should show scoped keys: {scoped:?}"
    );
    assert!(
        keys.ids().any(|id| keys.scope(id).is_none()),
        "the example should keep an unscoped operator key"
    );
    // A scope's port outside the global policy would be refused anyway: the example's scopes
    // lie inside lbagent.toml's, and no two scopes share a port.
    let mut owner = BTreeMap::new();
    for id in &scoped {
        let scope = keys.scope(id).unwrap();
        assert!(
            !scope.may_delete_frontend,
            "{id}: sidecars need no frontend removal"
        );
        for port in 1..=u16::MAX {
            if scope.frontend_ports.contains(port) {
                assert!(
                    policy.contains(port),
                    "{id}: port {port} is outside allow-frontend-ports"
                );
                if let Some(other) = owner.insert(port, id) {
                    panic!("{other} and {id} share frontend port {port}");
                }
            }
        }
    }
}

fn arg_value<'a>(args: &'a [String], flag: &str) -> &'a str {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("{flag}=")))
        .or_else(|| {
            args.iter()
                .position(|a| a == flag)
                .map(|i| args[i + 1].as_str())
        })
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"))
}

// ---------------------------------------------------------------------------------------------
// Dockerfiles
// ---------------------------------------------------------------------------------------------

#[test]
fn dockerfiles_build_what_exists() {
    let cargo =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let cargo: toml::Table = cargo.parse().unwrap();
    let bins: BTreeSet<&str> = cargo["bin"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    for (file, needs) in [
        (
            "Dockerfile.lbctl",
            &["-unknown-linux-musl", "--bin lbctl", "--locked"][..],
        ),
        (
            "Dockerfile.lbagent",
            &[
                "install -y --no-install-recommends haproxy",
                "--bin lbagent",
                "--locked",
            ][..],
        ),
    ] {
        let t = read(file);
        for n in needs {
            assert!(t.contains(n), "{file}: lacks `{n}`");
        }
        let mut stages = BTreeSet::new();
        let mut froms = 0;
        for l in t.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
            let words: Vec<&str> = l.split_whitespace().collect();
            match words.as_slice() {
                ["FROM", _image, "AS", name] | ["FROM", _image, "as", name] => {
                    froms += 1;
                    stages.insert(name.to_string());
                }
                ["FROM", _image] => froms += 1,
                ["COPY", from, ..] if from.starts_with("--from=") => {
                    let stage = &from["--from=".len()..];
                    assert!(stages.contains(stage), "{file}: no stage {stage}");
                }
                _ => {}
            }
            for w in &words {
                if let Some(b) = w.strip_prefix("--bin=") {
                    assert!(bins.contains(b), "{file}: no binary {b}");
                }
            }
            for pair in words.windows(2) {
                if pair[0] == "--bin" {
                    assert!(bins.contains(pair[1]), "{file}: no binary {}", pair[1]);
                }
            }
        }
        assert!(froms >= 2, "{file}: expected a multi-stage build");
        assert!(
            Path::new(&format!("{}.dockerignore", deploy(file).display())).is_file(),
            "{file}: no {file}.dockerignore (the build context would hold target/)"
        );
    }
}
