//! The managed config file and the HAProxy process against a real HAProxy: render, validate,
//! install and restore; start, reload through the master CLI (successful and failed), restart
//! and stop.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{free_port, haproxy_bin};
use lbagent::haproxy::{
    wait_frontend_open, ConfigFiles, HaproxyError, MainOptions, ManagedHaproxy,
};
use lbagent::model::{DesiredState, FrontendSpec, Mode, NodeName, ServerSpec, ServerState};
use lbagent::render::{render_managed, RenderOptions};
use lbagent::runtime::parse::{ProcEntry, ProxyKind};
use lbagent::runtime::{ClientOptions, Endpoint, RuntimeClient};

/// A main config; `@DIR@` is the test's directory. The stats socket is its one listener:
/// without any, `haproxy -c` says the config "will not start" and fails.
const MAIN: &str = "global
    stats socket @DIR@/admin.sock mode 600 level admin
    maxconn 200

defaults
    mode tcp
    timeout connect 1s
    timeout client 10s
    timeout server 10s
";

fn loopback() -> RenderOptions {
    RenderOptions {
        frontend_binds: vec!["127.0.0.1".parse().unwrap()],
    }
}

fn server(ip: &str, port: u16, state: ServerState, weight: Option<u16>) -> ServerSpec {
    ServerSpec {
        node_ip: ip.parse().unwrap(),
        node_port: port,
        state,
        service: None,
        weight,
        lease: true,
    }
}

/// Frontends on `ports`, each with one ready server (nothing needs to listen behind it: the
/// tests only connect to the frontend).
fn state(generation: u64, ports: &[u16]) -> DesiredState {
    let mut st = DesiredState {
        generation,
        ..DesiredState::default()
    };
    for &p in ports {
        let mut fe = FrontendSpec::default();
        fe.servers.insert(
            NodeName::new("node-a").unwrap(),
            server("127.0.0.1", free_port(), ServerState::Ready, None),
        );
        st.frontends.insert(p, fe.into());
    }
    st
}

fn client(sock: &Path) -> RuntimeClient {
    RuntimeClient::new(
        Endpoint::Unix(sock.to_path_buf()),
        ClientOptions {
            timeout: Duration::from_secs(2),
            ..ClientOptions::default()
        },
    )
}

/// Connects to a loopback port, retrying until `within` has passed.
fn connects(port: u16, within: Duration) -> bool {
    let end = Instant::now() + within;
    loop {
        if TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
            .is_ok()
        {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

async fn gone_within(pid: u32, within: Duration) -> bool {
    let end = Instant::now() + within;
    while process_exists(pid) {
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

async fn frontends(c: &mut RuntimeClient) -> Vec<String> {
    c.show_stat()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == ProxyKind::Frontend && r.proxy.starts_with("fe_"))
        .map(|r| r.proxy)
        .collect()
}

fn pids_of(list: &[ProcEntry]) -> Vec<u32> {
    list.iter().map(|w| w.pid).collect()
}

async fn worker_pids(master: &Path) -> Vec<u32> {
    pids_of(&client(master).show_proc().await.unwrap().workers)
}

#[tokio::test]
async fn render_install_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("haproxy.cfg");
    std::fs::write(
        &main,
        MAIN.replace("@DIR@", &dir.path().display().to_string()),
    )
    .unwrap();
    let files = ConfigFiles {
        haproxy_bin: haproxy_bin(),
        main,
        managed: dir.path().join("managed.cfg"),
    };

    // Two frontends; weights, drain, maint and an IPv6 server all pass HAProxy's check.
    let (p1, p2) = (free_port(), free_port());
    let mut st = state(1, &[p1, p2]);
    let fe = std::sync::Arc::make_mut(st.frontends.get_mut(&p1).unwrap());
    fe.mode = Mode::Http;
    for (node, spec) in [
        ("node-b", server("::1", 30443, ServerState::Drain, Some(10))),
        (
            "node-c",
            server("127.0.0.2", 30443, ServerState::Maint, Some(0)),
        ),
    ] {
        fe.servers.insert(NodeName::new(node).unwrap(), spec);
    }
    let first = render_managed(&st, &loopback());
    assert!(first.contains("disabled # drain"), "{first}");
    assert_eq!(files.install(&first).await.unwrap(), None);
    assert_eq!(std::fs::read_to_string(&files.managed).unwrap(), first);

    // A server address HAProxy cannot parse: refused with HAProxy's words, file untouched.
    let bad = format!("{first}\nbackend be_bad\n    server n1 300.1.1.1:80 check\n");
    let err = files.install(&bad).await.unwrap_err();
    match &err {
        HaproxyError::InvalidConfig { message, .. } => {
            assert!(message.contains("300.1.1.1"), "{message}")
        }
        other => panic!("expected InvalidConfig, got {other}"),
    }
    assert_eq!(std::fs::read_to_string(&files.managed).unwrap(), first);
    assert!(!dir.path().join("managed.cfg.tmp").exists());

    // A good change returns the previous text, and restore puts it back.
    let second = render_managed(&state(2, &[p2]), &loopback());
    assert_eq!(
        files.install(&second).await.unwrap().as_deref(),
        Some(first.as_str())
    );
    assert_eq!(std::fs::read_to_string(&files.managed).unwrap(), second);
    files.restore(Some(first.clone())).await.unwrap();
    assert_eq!(std::fs::read_to_string(&files.managed).unwrap(), first);

    // Nothing to restore: an empty file, which HAProxy accepts.
    files.restore(None).await.unwrap();
    assert_eq!(std::fs::read_to_string(&files.managed).unwrap(), "");
    files.validate(&files.managed).await.unwrap();
}

#[tokio::test]
async fn managed_start_reload_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let h = ManagedHaproxy::start(dir.path(), &haproxy_bin())
        .await
        .unwrap();
    let mut admin = client(&h.admin_socket());
    assert!(admin.show_info().await.unwrap().version().is_some());
    assert!(frontends(&mut admin).await.is_empty());
    let before = worker_pids(&h.master_socket()).await;
    assert_eq!(before.len(), 1);

    let port = free_port();
    let files = h.config_files();
    let previous = files
        .install(&render_managed(&state(1, &[port]), &loopback()))
        .await
        .unwrap();
    assert_eq!(previous.as_deref(), Some(""));
    let report = h.reload(Duration::from_secs(10)).await.unwrap();
    assert_eq!(report.old_worker_pids, before);
    assert_eq!(report.new_worker_pids.len(), 1);
    assert!(!before.contains(&report.new_worker_pids[0]));
    // `admin` still holds a connection from before the reload: it must find the new worker.
    wait_frontend_open(&mut admin, &format!("fe_{port}"), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(connects(port, Duration::from_secs(5)));

    // Stop: the master and its workers are gone.
    let master = h.pid();
    let worker = report.new_worker_pids[0];
    assert!(process_exists(master));
    h.stop().await.unwrap();
    assert!(gone_within(master, Duration::from_secs(5)).await);
    assert!(gone_within(worker, Duration::from_secs(5)).await);
}

/// Managed mode's main file is the agent's, rewritten at every start with its settings (also
/// over what an earlier version wrote), unless the operator put their own there; a state file
/// a stopped agent left is not loaded by the next start.
#[tokio::test]
async fn the_managed_main_file_is_rewritten_unless_it_is_the_operators() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("haproxy.cfg");
    std::fs::write(
        &main,
        "# Written by lbagent when it found no config here; lbagent's own frontends are in \
         managed.cfg.\nglobal\n    maxconn 10\n",
    )
    .unwrap();
    let leftover = dir.path().join("server-state");
    std::fs::write(
        &leftover,
        "1\n# be_id be_name srv_id srv_name\n3 be_1 1 node-a\n",
    )
    .unwrap();
    let opts = MainOptions {
        hard_stop_after: Duration::from_secs(90),
    };
    let h = ManagedHaproxy::start_with(dir.path(), &haproxy_bin(), &opts)
        .await
        .unwrap();
    let text = std::fs::read_to_string(&main).unwrap();
    assert!(text.contains("\n    hard-stop-after 90s\n"), "{text}");
    assert!(
        text.contains("\n    load-server-state-from-file global\n"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(&leftover).unwrap(),
        "1\n",
        "a leftover state file would be loaded"
    );
    assert_eq!(h.server_state_file().path(), leftover.as_path());
    h.stop().await.unwrap();

    // The operator's own file: left as it is.
    let own = MAIN.replace("@DIR@", &dir.path().display().to_string());
    std::fs::write(&main, &own).unwrap();
    let h = ManagedHaproxy::start_with(dir.path(), &haproxy_bin(), &opts)
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&main).unwrap(), own);
    h.stop().await.unwrap();
}

/// The state file puts a row's port over the config's, so a saved row that differs from the
/// desired address must not reach the new worker: the desired port wins, the row is left out.
/// (HAProxy keeps the config's address for a server with a literal one, but not its port.)
#[tokio::test]
async fn the_desired_port_wins_over_the_saved_state() {
    let dir = tempfile::tempdir().unwrap();
    let h = ManagedHaproxy::start(dir.path(), &haproxy_bin())
        .await
        .unwrap();
    let fe = free_port();
    let (old, new) = (free_port(), free_port());
    let mut st = state(1, &[fe]);
    let node = NodeName::new("node-a").unwrap();
    std::sync::Arc::make_mut(st.frontends.get_mut(&fe).unwrap())
        .servers
        .insert(
            node.clone(),
            server("127.0.0.1", old, ServerState::Ready, None),
        );
    let files = h.config_files();
    files
        .install(&render_managed(&st, &loopback()))
        .await
        .unwrap();
    h.reload(Duration::from_secs(10)).await.unwrap();
    let mut admin = client(&h.admin_socket());
    let port_of = |rows: Vec<lbagent::runtime::parse::ServerState>| {
        rows.into_iter()
            .find(|r| r.backend == format!("be_{fe}") && r.server == "node-a")
            .and_then(|r| r.port)
    };
    assert_eq!(
        port_of(admin.show_servers_state(None).await.unwrap()),
        Some(old)
    );

    // The desired port changed, and the worker still has the old one (a change not applied
    // yet): the reload for it must leave the new worker at the desired port.
    st.generation = 2;
    std::sync::Arc::make_mut(st.frontends.get_mut(&fe).unwrap())
        .servers
        .get_mut(&node)
        .unwrap()
        .node_port = new;
    files
        .install(&render_managed(&st, &loopback()))
        .await
        .unwrap();
    let state_file = h.server_state_file();
    h.reloader()
        .reload_handing_over(Duration::from_secs(10), None, Some(&state_file), &st)
        .await
        .unwrap();
    admin.disconnect();
    assert_eq!(
        port_of(admin.show_servers_state(None).await.unwrap()),
        Some(new)
    );
    assert_eq!(
        std::fs::read_to_string(state_file.path()).unwrap(),
        "1\n",
        "cleared after the reload"
    );
    h.stop().await.unwrap();
}

#[tokio::test]
async fn failed_reload_keeps_the_old_worker() {
    let dir = tempfile::tempdir().unwrap();
    let h = ManagedHaproxy::start(dir.path(), &haproxy_bin())
        .await
        .unwrap();
    let files = h.config_files();
    let (a, b) = (free_port(), free_port());
    files
        .install(&render_managed(&state(1, &[a]), &loopback()))
        .await
        .unwrap();
    let first = h.reload(Duration::from_secs(10)).await.unwrap();
    let mut admin = client(&h.admin_socket());
    wait_frontend_open(&mut admin, &format!("fe_{a}"), Duration::from_secs(10))
        .await
        .unwrap();

    // Port b is taken; `haproxy -c` does not bind, so the config installs, and the reload fails.
    let blocker = std::net::TcpListener::bind(("127.0.0.1", b)).unwrap();
    let previous = files
        .install(&render_managed(&state(2, &[a, b]), &loopback()))
        .await
        .unwrap();
    let err = h.reload(Duration::from_secs(10)).await.unwrap_err();
    match &err {
        HaproxyError::ReloadFailed { message } => {
            assert!(message.contains("[ALERT]"), "{message}");
            assert!(message.contains(&format!("127.0.0.1:{b}")), "{message}");
        }
        other => panic!("expected ReloadFailed, got {other}"),
    }
    // The worker from before still serves the previous frontend. Where `show proc` lists it
    // depends on the version: up to 3.0 it stays under `# workers`; from 3.1 (reworked
    // master-worker start) the master moved it to `# old workers` before the new worker
    // failed, and leaves it there, so `# workers` is empty until the next good reload.
    let proc = client(&h.master_socket()).show_proc().await.unwrap();
    let (current, old) = (pids_of(&proc.workers), pids_of(&proc.old_workers));
    // (`# old workers` may also still list the start's first worker, finishing its connections.)
    let serving = first.new_worker_pids[0];
    if common::haproxy_branch().at_least(3, 1) {
        assert_eq!(current, Vec::<u32>::new(), "{proc:?}");
        assert!(old.contains(&serving), "{proc:?}");
    } else {
        assert_eq!(current, first.new_worker_pids, "{proc:?}");
        assert!(!old.contains(&serving), "{proc:?}");
    }
    assert!(connects(a, Duration::from_secs(5)));
    assert_eq!(frontends(&mut admin).await, vec![format!("fe_{a}")]);

    // Roll the file back; the next reload works again.
    files.restore(previous).await.unwrap();
    let again = h.reload(Duration::from_secs(10)).await.unwrap();
    assert_eq!(again.old_worker_pids, first.new_worker_pids);
    wait_frontend_open(&mut admin, &format!("fe_{a}"), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(connects(a, Duration::from_secs(5)));
    drop(blocker);
    h.stop().await.unwrap();
}

#[tokio::test]
async fn noticed_death_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = ManagedHaproxy::start(dir.path(), &haproxy_bin())
        .await
        .unwrap();
    let port = free_port();
    h.config_files()
        .install(&render_managed(&state(1, &[port]), &loopback()))
        .await
        .unwrap();
    assert!(h.try_exited().is_none());
    let old = h.pid();
    common::send_signal(old, "KILL");
    let end = Instant::now() + Duration::from_secs(5);
    while h.try_exited().is_none() {
        assert!(Instant::now() < end, "exit of pid {old} not noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The restarted HAProxy loads the installed file: the frontend is there without a reload.
    h.restart().await.unwrap();
    assert_ne!(h.pid(), old);
    assert!(h.try_exited().is_none());
    let mut admin = client(&h.admin_socket());
    wait_frontend_open(&mut admin, &format!("fe_{port}"), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(connects(port, Duration::from_secs(5)));
    h.stop().await.unwrap();
}

/// Sends `reload` to the master CLI on a new connection and returns at once, the connection
/// left open (3.1+ answer it only once the new worker is up). Connecting is retried for 5 s:
/// a master re-executing for an earlier reload refuses connections for a moment.
fn start_raw_reload(master: &Path) -> std::os::unix::net::UnixStream {
    use std::io::Write;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(master) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => panic!("connect the master CLI: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    s.write_all(b"reload\n").unwrap();
    s
}

/// What `s` sends until it has sent `end`, closes, or 5 s pass.
fn read_until(mut s: std::os::unix::net::UnixStream, end: &str) -> String {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(end) && Instant::now() < deadline {
        s.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// The master's reload count.
async fn reloads(master: &Path) -> u32 {
    client(master)
        .show_proc()
        .await
        .unwrap()
        .master
        .and_then(|m| m.reloads)
        .expect("show proc lists the master's reloads")
}

/// Somebody else's reload (an operator's `systemctl reload`) is still starting its worker when
/// the agent reloads: from 3.1 the master refuses the second with `Another reload is still in
/// progress.`, before 3.1 it is busy re-executing. Either way the agent's reload must wait,
/// happen, and be confirmed by a worker of its own, not by the other reload's.
#[tokio::test]
async fn a_reload_during_another_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let h = ManagedHaproxy::start(dir.path(), &haproxy_bin())
        .await
        .unwrap();
    // A worker that takes a while to start: a Lua file that spins for 1.5 s when loaded.
    let lua = dir.path().join("slow.lua");
    std::fs::write(
        &lua,
        "local t0 = os.clock()\nwhile os.clock() - t0 < 1.5 do end\n",
    )
    .unwrap();
    let port = free_port();
    let managed = format!(
        "global\n    lua-load {}\n\n{}",
        lua.display(),
        render_managed(&state(1, &[port]), &loopback())
    );
    h.config_files().install(&managed).await.unwrap();
    let master = h.master_socket();
    let before = reloads(&master).await;

    let mut other = start_raw_reload(&master);
    let branch = common::haproxy_branch();
    if branch.at_least(3, 1) {
        // Pin the version's refusal: a `reload` while the other one's worker starts.
        // The probe must reach the master after the other reload's re-exec, while its worker
        // starts: a connection taken just before the re-exec is closed unanswered, so try again.
        let deadline = Instant::now() + Duration::from_secs(5);
        let refused = loop {
            let got = read_until(start_raw_reload(&master), "progress.\n");
            if got.contains("progress.") || Instant::now() >= deadline {
                break got;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(
            refused.trim_end(),
            "Success=0\n--\nAnother reload is still in progress.",
            "{branch}"
        );
    }
    let report = h.reload(Duration::from_secs(30)).await.unwrap();
    assert_eq!(report.new_worker_pids.len(), 1, "{report:?}");
    // Both reloads ran, the agent's last: its worker is the one serving now.
    assert_eq!(reloads(&master).await, before + 2);
    assert_eq!(worker_pids(&master).await, report.new_worker_pids);
    let mut admin = client(&h.admin_socket());
    wait_frontend_open(&mut admin, &format!("fe_{port}"), Duration::from_secs(10))
        .await
        .unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut sink = String::new();
    let _ = std::io::Read::read_to_string(&mut other, &mut sink);
    h.stop().await.unwrap();
}

/// A new worker that takes longer than a CLI call's usual 5 s and then fails: from 2.7 the
/// master answers `reload` only then, and the reload must be reported failed, not confirmed by
/// the starting worker `show proc` already lists.
#[tokio::test]
async fn a_slow_worker_that_fails_is_a_failed_reload() {
    let dir = tempfile::tempdir().unwrap();
    let h = ManagedHaproxy::start(dir.path(), &haproxy_bin())
        .await
        .unwrap();
    let lua = dir.path().join("slow-then-fail.lua");
    std::fs::write(
        &lua,
        "local t0 = os.clock()\nwhile os.clock() - t0 < 6 do end\nerror(\"lbagent test: refusing to load\")\n",
    )
    .unwrap();
    // Written directly: `haproxy -c` would refuse it, which is the point.
    std::fs::write(
        &h.config_files().managed,
        format!("global\n    lua-load {}\n", lua.display()),
    )
    .unwrap();
    let before = worker_pids(&h.master_socket()).await;
    let err = h.reload(Duration::from_secs(30)).await.unwrap_err();
    assert!(
        matches!(err, HaproxyError::ReloadFailed { .. }),
        "{}: {err}",
        common::haproxy_branch()
    );
    // The worker from before still serves.
    let proc = client(&h.master_socket()).show_proc().await.unwrap();
    let serving: Vec<u32> = pids_of(&proc.workers)
        .into_iter()
        .chain(pids_of(&proc.old_workers))
        .collect();
    assert_eq!(serving, before, "{proc:?}");
    h.stop().await.unwrap();
}
