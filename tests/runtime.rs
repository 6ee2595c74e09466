//! The runtime client against a real HAProxy: every typed command, with its effect checked
//! through `show servers state` / `show stat`, the error outcomes, batching, and the master CLI.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{answers, basic_proxies, wait_until, Haproxy};
use lbagent::runtime::parse::{parse_servers_state, OperState, ServerState, StatusState};
use lbagent::runtime::{
    AddServerOptions, ClientOptions, Command, Endpoint, Error, Name, OutcomeKind, RuntimeClient,
    SendProxy, ServerAdminState, ServerRef,
};

fn client(path: &std::path::Path) -> RuntimeClient {
    RuntimeClient::new(Endpoint::Unix(path.to_path_buf()), ClientOptions::default())
}

fn srv(b: &str, s: &str) -> ServerRef {
    ServerRef::new(b, s).unwrap()
}

async fn state_of(c: &mut RuntimeClient, b: &str, s: &str) -> Option<ServerState> {
    let be = Name::new("backend", b).unwrap();
    c.show_servers_state(Some(&be))
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.server == s)
}

#[tokio::test]
async fn dynamic_server_lifecycle() {
    let h = Haproxy::start(&basic_proxies());
    let mut c = client(&h.admin);
    let node = srv("be_app", "node-a");
    let ip: IpAddr = "127.0.0.1".parse().unwrap();

    c.add_server(
        &node,
        ip,
        30443,
        AddServerOptions {
            check: true,
            weight: Some(50),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let st = state_of(&mut c, "be_app", "node-a").await.expect("added");
    assert!(
        st.admin.in_maintenance(),
        "a dynamic server starts in maintenance"
    );
    assert_eq!(st.port, Some(30443));
    assert_eq!(st.user_weight, Some(50));

    c.enable_health(&node).await.unwrap();
    c.set_server_state(&node, ServerAdminState::Ready)
        .await
        .unwrap();
    let st = state_of(&mut c, "be_app", "node-a").await.unwrap();
    assert!(!st.admin.in_maintenance() && !st.admin.draining());

    c.set_server_addr(&node, "127.0.0.2".parse().unwrap(), Some(30444))
        .await
        .unwrap();
    let st = state_of(&mut c, "be_app", "node-a").await.unwrap();
    assert_eq!(
        (st.addr.as_deref(), st.port),
        (Some("127.0.0.2"), Some(30444))
    );

    c.set_server_weight(&node, 7).await.unwrap();
    assert_eq!(
        state_of(&mut c, "be_app", "node-a")
            .await
            .unwrap()
            .user_weight,
        Some(7)
    );

    c.set_server_state(&node, ServerAdminState::Drain)
        .await
        .unwrap();
    assert!(state_of(&mut c, "be_app", "node-a")
        .await
        .unwrap()
        .admin
        .draining());

    // Deleting needs maintenance first; HAProxy's refusal is classified and its text kept.
    let err = c.del_server(&node).await.unwrap_err();
    let Error::Command { outcome, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(outcome.kind, OutcomeKind::Refused, "{}", outcome.text);
    assert!(outcome.text.contains("maintenance"), "{}", outcome.text);

    c.disable_health(&node).await.unwrap();
    c.set_server_state(&node, ServerAdminState::Maint)
        .await
        .unwrap();
    assert!(state_of(&mut c, "be_app", "node-a")
        .await
        .unwrap()
        .admin
        .in_maintenance());
    c.del_server(&node).await.unwrap();
    assert!(state_of(&mut c, "be_app", "node-a").await.is_none());
}

/// Polls `show servers state` (10 s at most) until the server's operational state is `want`.
async fn wait_oper(c: &mut RuntimeClient, b: &str, s: &str, want: OperState, what: &str) {
    for _ in 0..500 {
        if state_of(c, b, s).await.and_then(|st| st.oper_state) == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "timed out waiting for {what}: {:?}",
        state_of(c, b, s).await
    );
}

/// Every keyword a frontend's settings put on a dynamic server is taken by `add server` (2.6 to
/// 3.2), the check goes where `port` says, and `set server check-port` moves it live.
#[tokio::test]
async fn dynamic_servers_take_the_frontends_settings() {
    let h = Haproxy::start(&basic_proxies());
    let mut c = client(&h.admin);
    // web1's port is the HTTP listener `up_target`: something that accepts connections.
    let up = state_of(&mut c, "be_app", "web1")
        .await
        .unwrap()
        .port
        .unwrap();
    let closed = common::free_port();
    let node = srv("be_app", "node-p");
    let options = AddServerOptions {
        check: true,
        check_port: Some(up),
        check_interval_ms: Some(100),
        rise: Some(1),
        fall: Some(1),
        send_proxy: SendProxy::V2,
        ..Default::default()
    };
    // The traffic port is closed: only a check on `port` can bring the server up.
    c.add_server(&node, "127.0.0.1".parse().unwrap(), closed, options)
        .await
        .unwrap();
    c.enable_health(&node).await.unwrap();
    c.set_server_state(&node, ServerAdminState::Ready)
        .await
        .unwrap();
    let st = state_of(&mut c, "be_app", "node-p").await.unwrap();
    assert_eq!((st.port, st.check_port), (Some(closed), Some(up)));
    wait_oper(
        &mut c,
        "be_app",
        "node-p",
        OperState::Running,
        "UP by its check port",
    )
    .await;
    let moved = c
        .execute(&Command::set_check_port(node.clone(), closed).unwrap())
        .await
        .unwrap();
    assert!(moved.outcome.is_success(), "{:?}", moved.outcome);
    assert_eq!(
        state_of(&mut c, "be_app", "node-p")
            .await
            .unwrap()
            .check_port,
        Some(closed)
    );
    wait_oper(
        &mut c,
        "be_app",
        "node-p",
        OperState::Stopped,
        "DOWN once checks go to a closed port",
    )
    .await;
    // v1 too.
    let v1 = srv("be_app", "node-v1");
    c.add_server(
        &v1,
        "127.0.0.1".parse().unwrap(),
        up,
        AddServerOptions {
            check: true,
            send_proxy: SendProxy::V1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn checked_server_comes_up() {
    let h = Haproxy::start(&basic_proxies());
    let mut c = client(&h.admin);
    // web1 is checked against a listener of the same HAProxy: it must turn UP.
    let mut up = false;
    for _ in 0..250 {
        let st = state_of(&mut c, "be_app", "web1").await.unwrap();
        if st.oper_state == Some(OperState::Running) {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "web1 never came up");
    let rows = c.show_stat().await.unwrap();
    let web1 = rows
        .iter()
        .find(|r| r.proxy == "be_app" && r.name == "web1")
        .unwrap();
    assert_eq!(web1.status.as_ref().unwrap().state, StatusState::Up);
    let web2 = rows
        .iter()
        .find(|r| r.proxy == "be_app" && r.name == "web2")
        .unwrap();
    assert_eq!(web2.status.as_ref().unwrap().state, StatusState::NoCheck);
}

#[tokio::test]
async fn refusals_are_classified_with_haproxy_text() {
    let h = Haproxy::start(&basic_proxies());
    let mut c = client(&h.admin);
    let ip: IpAddr = "127.0.0.1".parse().unwrap();

    let cases: Vec<(Command, OutcomeKind, &str)> = vec![
        (
            Command::SetServerState(srv("be_app", "ghost"), ServerAdminState::Ready),
            OutcomeKind::NotFound,
            "No such server",
        ),
        (
            Command::add_server(srv("be_app", "web2"), ip, 1, AddServerOptions::default()).unwrap(),
            OutcomeKind::AlreadyExists,
            "Already exists",
        ),
        (
            Command::add_server(srv("be_nope", "x"), ip, 1, AddServerOptions::default()).unwrap(),
            OutcomeKind::NotFound,
            "",
        ),
        (
            Command::add_server(srv("be_static", "x"), ip, 1, AddServerOptions::default()).unwrap(),
            OutcomeKind::Refused,
            "dynamic",
        ),
        (
            Command::EnableHealth(srv("be_app", "web2")),
            OutcomeKind::Refused,
            "Health check",
        ),
        (
            Command::DelServer(srv("be_app", "web2")),
            OutcomeKind::Refused,
            "maintenance",
        ),
        (
            Command::set_weight(srv("be_static", "s1"), 50).unwrap(),
            OutcomeKind::Refused,
            "static",
        ),
        (
            Command::DisableFrontend(Name::new("f", "fe_nope").unwrap()),
            OutcomeKind::NotFound,
            "",
        ),
    ];
    for (cmd, kind, phrase) in cases {
        let reply = c.execute(&cmd).await.unwrap();
        assert_eq!(reply.outcome.kind, kind, "{cmd}: {:?}", reply.outcome.text);
        assert!(
            reply.outcome.text.contains(phrase),
            "{cmd}: {:?}",
            reply.outcome.text
        );
        assert_eq!(reply.command, cmd.to_string());
    }
    // Nothing above changed anything.
    let states = c.show_servers_state(None).await.unwrap();
    assert_eq!(states.len(), 3);
}

#[tokio::test]
async fn frontend_commands() {
    let h = Haproxy::start(&basic_proxies());
    let mut c = client(&h.admin);
    let fe = Name::new("frontend", "fe_main").unwrap();
    let status = |rows: &[lbagent::runtime::parse::StatRow]| {
        rows.iter()
            .find(|r| r.proxy == "fe_main" && r.name == "FRONTEND")
            .map(|r| (r.status.clone().unwrap().state, r.sessions_limit))
            .unwrap()
    };
    c.set_maxconn_frontend(&fe, 123).await.unwrap();
    assert_eq!(status(&c.show_stat().await.unwrap()).1, Some(123));
    c.disable_frontend(&fe).await.unwrap();
    assert_eq!(status(&c.show_stat().await.unwrap()).0, StatusState::Paused);
    c.enable_frontend(&fe).await.unwrap();
    assert_eq!(status(&c.show_stat().await.unwrap()).0, StatusState::Open);
}

#[tokio::test]
async fn queries_agree_with_the_socket() {
    let h = Haproxy::start(&basic_proxies());
    let mut c = client(&h.admin);
    let info = c.show_info().await.unwrap();
    let raw = answers(&h.admin, "show info\n").unwrap();
    assert!(raw.contains(&format!("Version: {}", info.version().unwrap())));
    assert!(info.pid().is_some());
    let mut backends = c.show_backends().await.unwrap();
    backends.sort();
    assert_eq!(backends, ["be_app", "be_static", "up_target"]);
}

#[tokio::test]
async fn batch_keeps_order_and_outcomes() {
    let h = Haproxy::start(&basic_proxies());
    let mut c = client(&h.admin);
    let cmds = vec![
        Command::SetServerState(srv("be_app", "web2"), ServerAdminState::Drain),
        Command::SetServerState(srv("be_app", "ghost"), ServerAdminState::Drain),
        Command::ShowBackend,
        Command::set_weight(srv("be_app", "web2"), 3).unwrap(),
    ];
    let replies = c.batch(&cmds).await.unwrap();
    let kinds: Vec<_> = replies.iter().map(|r| r.outcome.kind).collect();
    assert_eq!(
        kinds,
        [
            OutcomeKind::Success,
            OutcomeKind::NotFound,
            OutcomeKind::Success,
            OutcomeKind::Success
        ]
    );
    assert!(replies[2].outcome.text.contains("be_static"));
    let st = state_of(&mut c, "be_app", "web2").await.unwrap();
    assert!(st.admin.draining());
    assert_eq!(st.user_weight, Some(3));
}

/// `set server addr` from 3.0 is applied by a task after the answer: a `show servers state` in
/// the same batch still lists the old address (2.6 the new one), a later read the new one. And
/// an address set again is `nothing changed` from 3.0, `no need to change the addr...` on 2.6:
/// both are a success. The agent never reads back in the batch that changes.
#[tokio::test]
async fn set_server_addr_is_seen_after_its_batch_from_3_0() {
    let h = Haproxy::start(&basic_proxies());
    let mut c = client(&h.admin);
    let branch = common::haproxy_branch();
    let be = Name::new("backend", "be_app").unwrap();
    let addr_of = |text: &str| {
        parse_servers_state(text)
            .unwrap()
            .into_iter()
            .find(|r| r.server == "web2")
            .and_then(|r| r.addr)
    };
    let move_to = |ip: &str| Command::SetServerAddr {
        server: srv("be_app", "web2"),
        addr: ip.parse().unwrap(),
        port: None,
    };
    let replies = c
        .batch(&[move_to("127.0.0.9"), Command::ShowServersState(Some(be))])
        .await
        .unwrap();
    assert!(
        replies[0]
            .outcome
            .text
            .starts_with("IP changed from '127.0.0.1' to '127.0.0.9'"),
        "{:?}",
        replies[0]
    );
    let in_batch = addr_of(&replies[1].outcome.text);
    let expected = if branch.at_least(3, 0) {
        "127.0.0.1"
    } else {
        "127.0.0.9"
    };
    assert_eq!(in_batch.as_deref(), Some(expected), "{branch}");
    wait_until(
        Duration::from_secs(2),
        "the new address to be listed",
        || {
            answers(&h.admin, "show servers state be_app\n")
                .is_some_and(|t| addr_of(&t).as_deref() == Some("127.0.0.9"))
        },
    );

    let again = c.execute(&move_to("127.0.0.9")).await.unwrap();
    assert_eq!(again.outcome.kind, OutcomeKind::Success, "{again:?}");
    let text = again.outcome.text.trim_end();
    if branch.at_least(3, 0) {
        assert_eq!(text, "nothing changed", "{branch}");
    } else {
        assert!(
            text.starts_with("no need to change the addr"),
            "{branch}: {text}"
        );
    }
}

/// Two things lbagent never does, because 3.0 changed them: `add server ... enabled` is refused
/// from 3.0 (so a dynamic server is added in maintenance and then set ready), and without
/// `prompt` only the first of several newline-separated commands runs from 3.0 (so the client
/// always talks in interactive mode).
#[tokio::test]
async fn what_3_0_refuses_that_2_6_took() {
    let h = Haproxy::start(&basic_proxies());
    let branch = common::haproxy_branch();
    let enabled = answers(&h.admin, "add server be_app/n1 127.0.0.1:80 enabled\n").unwrap();
    let outcome = lbagent::runtime::Outcome::of_action(&enabled);
    if branch.at_least(3, 0) {
        assert_eq!(
            enabled.trim_end(),
            "'enabled' option is not accepted for dynamic server",
            "{branch}"
        );
        assert_ne!(outcome.kind, OutcomeKind::Success, "{outcome:?}");
    } else {
        assert_eq!(enabled.trim_end(), "New server registered.", "{branch}");
        assert_eq!(outcome.kind, OutcomeKind::Success, "{outcome:?}");
    }

    let two = answers(&h.admin, "show version\nshow version\n").unwrap();
    let ran = two
        .lines()
        .filter(|l| l.starts_with(&branch.to_string()))
        .count();
    let expected = if branch.at_least(3, 0) { 1 } else { 2 };
    assert_eq!(ran, expected, "{branch}: {two:?}");
}

#[tokio::test]
async fn batch_larger_than_one_write_is_split() {
    let h = Haproxy::start(&basic_proxies());
    let mut c = RuntimeClient::new(
        Endpoint::Unix(h.admin.clone()),
        ClientOptions {
            max_batch_bytes: 1024,
            ..ClientOptions::default()
        },
    );
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let adds: Vec<Command> = (0..300)
        .map(|i| {
            Command::add_server(
                srv("be_app", &format!("n{i}")),
                ip,
                10000 + i,
                AddServerOptions::default(),
            )
            .unwrap()
        })
        .collect();
    let replies = c.batch(&adds).await.unwrap();
    assert_eq!(replies.len(), 300);
    assert!(replies.iter().all(|r| r.outcome.is_success()));
    let states = c.show_servers_state(None).await.unwrap();
    assert_eq!(
        states.iter().filter(|s| s.server.starts_with('n')).count(),
        300
    );
    let n299 = states.iter().find(|s| s.server == "n299").unwrap();
    assert_eq!(n299.port, Some(10299));
}

#[tokio::test]
async fn operator_socket_is_denied_writes() {
    let h = Haproxy::start(&basic_proxies());
    let mut c = client(&h.operator);
    let reply = c
        .execute(&Command::SetServerAddr {
            server: srv("be_app", "web2"),
            addr: "127.0.0.9".parse().unwrap(),
            port: None,
        })
        .await;
    let kind = match reply {
        Ok(r) => r.outcome.kind,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(kind, OutcomeKind::PermissionDenied);
    // Reading still works at operator level.
    assert!(c.show_stat().await.is_ok());
}

#[tokio::test]
async fn tcp_stats_socket() {
    let h = Haproxy::start(&basic_proxies());
    let mut c = RuntimeClient::new(Endpoint::parse(&h.admin_tcp), ClientOptions::default());
    assert!(c.show_info().await.unwrap().version().is_some());
    assert_eq!(c.show_stat().await.unwrap().len(), 8);
}

#[tokio::test]
async fn master_cli_show_proc_and_reload() {
    let h = Haproxy::start(&basic_proxies());
    let mut m = client(&h.master);
    let before = m.show_proc().await.unwrap();
    assert_eq!(before.master.as_ref().unwrap().pid, h.master_pid());
    assert_eq!(before.workers.len(), 1);
    let old_worker = before.workers[0].pid;

    m.reload().await.unwrap();
    // The master re-executes; confirm through show proc, polling with a deadline.
    let mut new_worker = None;
    for _ in 0..250 {
        if let Ok(p) = m.show_proc().await {
            if let Some(w) = p.workers.first() {
                if w.pid != old_worker {
                    assert_eq!(p.master.unwrap().failed_reloads, Some(0));
                    new_worker = Some(w.pid);
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(new_worker.is_some(), "no new worker after reload");

    // `reload` on a worker's socket is refused before anything is sent.
    let mut w = client(&h.admin);
    let err = w.reload().await.unwrap_err();
    assert!(err.to_string().contains("master CLI"), "{err}");
}

#[tokio::test]
async fn connection_survives_haproxy_closing_it() {
    let h = Haproxy::start(&basic_proxies());
    let mut c = client(&h.admin);
    c.show_info().await.unwrap();
    // A reload replaces the worker; the old one closes our CLI connection.
    let mut m = client(&h.master);
    let old = m.show_proc().await.unwrap().workers[0].pid;
    m.reload().await.unwrap();
    wait_until(Duration::from_secs(10), "new worker", || {
        answers(&h.master, "show proc\n").is_some_and(|p| {
            p.contains("worker")
                && !p.lines().any(|l| {
                    l.starts_with(&format!("{old} "))
                        && l.contains("worker")
                        && !p.contains("# old workers\n")
                })
        })
    });
    // Whatever happened to the old connection, the next calls work.
    for _ in 0..3 {
        c.show_info().await.unwrap();
    }
}
