//! Ports the agent does not own, black box against a real attached HAProxy: a new frontend on a
//! port the operator's configuration binds (the main file, another `-f` file), HAProxy's TCP
//! stats socket or the agent's own API port is refused with 409 `port_owned` naming the owner,
//! before any file is written or reload started, and the operator's traffic stays the
//! operator's. HAProxy binds with SO_REUSEPORT: had the reload gone through, the kernel would
//! split the port's connections between the operator's listener and the agent's.

mod common;

use std::path::Path;
use std::time::Duration;

use common::agent::{body, eventually, through, wait_reaches, Agent, Echo, Options, Response};
use common::free_port;
use serde_json::json;

const SETTLE: Duration = Duration::from_secs(15);

/// What a refusal must leave as it was: HAProxy's reload count and worker, the agent's file.
struct Untouched {
    reloads: u32,
    workers: Vec<u32>,
    managed: String,
    reloads_metric: f64,
}

impl Untouched {
    fn of(agent: &Agent) -> Untouched {
        let proc = agent.show_proc();
        Untouched {
            reloads: proc.master.unwrap().reloads.unwrap(),
            workers: proc.workers.iter().map(|w| w.pid).collect(),
            managed: std::fs::read_to_string(&agent.managed_cfg).unwrap(),
            reloads_metric: agent.metric("lbagent_haproxy_reloads_total"),
        }
    }

    fn assert_same(&self, agent: &Agent, what: &str) {
        let now = Untouched::of(agent);
        assert_eq!(now.reloads, self.reloads, "{what}: HAProxy was reloaded");
        assert_eq!(
            now.workers, self.workers,
            "{what}: HAProxy's worker changed"
        );
        assert_eq!(
            now.managed, self.managed,
            "{what}: the agent's file changed"
        );
        assert_eq!(
            now.reloads_metric, self.reloads_metric,
            "{what}: the agent counted a reload"
        );
        assert!(
            !Path::new(&format!("{}.tmp", agent.managed_cfg.display())).exists(),
            "{what}: a candidate file was written"
        );
    }
}

/// Asserts a 409 `port_owned` whose message has every one of `names`.
fn assert_owned(r: &Response, names: &[&str], what: &str) {
    r.assert_error(409, "port_owned", what);
    let message = r.json()["message"].as_str().unwrap().to_string();
    for n in names {
        assert!(message.contains(n), "{what}: {n:?} not in {message:?}");
    }
}

/// An attached agent whose HAProxy main file ends with `proxies`, without host checks (as with
/// HAProxy in another namespace: only the config tells the agent what HAProxy binds), and the
/// path of that file.
fn attached_without_host_checks(proxies: &str) -> (Agent, std::path::PathBuf) {
    let agent = Agent::attached_with(
        proxies,
        Options {
            extra: vec!["--no-host-checks".into()],
            ..Options::default()
        },
    );
    let main = agent.root.join("haproxy/main.cfg");
    (agent, main)
}

/// The 1-based number of the first line of `file` holding `needle`.
fn line_of(file: &Path, needle: &str) -> usize {
    let text = std::fs::read_to_string(file).unwrap();
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in {}", file.display()))
        + 1
}

/// A signed PUT for `p`, which `frontend operator_web` binds on the line of `main` holding
/// `needle`, is refused naming it, with nothing written or reloaded, and 40 connections to `p`
/// all reach the operator's server. Returns the node's server and what was left untouched.
fn operator_web_keeps_its_port(
    agent: &Agent,
    main: &Path,
    p: u16,
    needle: &str,
    what: &str,
) -> (Echo, Untouched) {
    let line = line_of(main, needle);
    wait_reaches(p, "OPERATOR", SETTLE);
    let a = Echo::start("127.0.0.2", "A");
    let before = Untouched::of(agent);
    let r = agent.put(p, "node-a", &body(&a.ip(), a.port(), json!({})));
    let owner = format!(
        "port {p} is bound by frontend operator_web in {} line {line}",
        main.display()
    );
    assert_owned(&r, &[&owner], what);
    before.assert_same(agent, what);
    all_reach(p, "OPERATOR", 40);
    (a, before)
}

/// `n` connections to `port`, each answered by the operator's server alone.
fn all_reach(port: u16, reply: &str, n: usize) {
    let answers: Vec<String> = (0..n)
        .map(|_| through(port).unwrap_or_else(|e| format!("error: {e}")))
        .collect();
    let others: Vec<&String> = answers.iter().filter(|a| *a != reply).collect();
    assert!(
        others.is_empty(),
        "{} of {n} connections to {port} were not answered {reply:?}: {others:?}",
        others.len()
    );
}

/// The attack: `frontend operator_web` binds P in the main file; a signed PUT for P is
/// refused naming it, with no file written and no reload, and 40 connections to P all reach the
/// operator's server. Without host checks (HAProxy in another namespace), so the agent's own
/// bind test cannot catch it: only the config does. The same for a TCP stats socket of the
/// main file. Afterwards an operator's section added on a port the agent already serves is
/// reported in `/healthz`, and the agent's frontend keeps serving.
#[test]
fn a_port_the_main_config_binds_is_refused_and_keeps_its_traffic() {
    let operator = Echo::start("127.0.0.1", "OPERATOR");
    let (p, stats) = (free_port(), free_port());
    let proxies = format!(
        "global\n    stats socket ipv4@127.0.0.1:{stats} level user\n\n\
         frontend operator_web\n    bind 127.0.0.1:{p}\n    default_backend operator_be\n\n\
         backend operator_be\n    server op {}\n",
        operator.addr
    );
    let (agent, main) = attached_without_host_checks(&proxies);
    let (a, before) = operator_web_keeps_its_port(
        &agent,
        &main,
        p,
        &format!("bind 127.0.0.1:{p}"),
        "the operator's frontend",
    );

    let r = agent.put(stats, "node-a", &body(&a.ip(), a.port(), json!({})));
    assert_owned(
        &r,
        &["stats socket", &format!("port {stats}")],
        "the TCP stats socket",
    );
    before.assert_same(&agent, "PUT for the stats socket's port");
    assert!(agent.state()["frontends"].as_array().unwrap().is_empty());

    // A port nobody has still gets its frontend, and serves.
    let q = free_port();
    agent.put_ok(q, "node-a", &body(&a.ip(), a.port(), json!({})), "reload");
    wait_reaches(q, "A", SETTLE);
    all_reach(p, "OPERATOR", 10);

    // The operator adds a section on the agent's port and reloads: HAProxy takes it (both
    // listeners with SO_REUSEPORT); the agent says so.
    let mut text = std::fs::read_to_string(&main).unwrap();
    text.push_str(&format!(
        "\nlisten late_web\n    bind 127.0.0.1:{q}\n    server op {}\n",
        operator.addr
    ));
    std::fs::write(&main, text).unwrap();
    let reloads = agent.show_proc().master.unwrap().reloads.unwrap();
    agent.master_cmd("reload");
    eventually(SETTLE, "HAProxy reloaded", || {
        match agent.try_show_proc().and_then(|p| p.master?.reloads) {
            Some(n) if n > reloads => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    // `/healthz` (unauthenticated) names the port only; the log names both owners.
    eventually(SETTLE, "/healthz reports the shared port", || {
        let h = agent.get("/healthz").json();
        match h["port_conflicts"] == json!([q]) {
            true => Ok(()),
            false => Err(h.to_string()),
        }
    });
    let log = agent.log();
    let logged = log
        .lines()
        .find(|l| l.contains("also bound outside its file") && l.contains(&format!("port {q}")))
        .unwrap_or_else(|| panic!("no conflict logged:\n{log}"));
    assert!(
        logged.contains(&format!("fe_{q}")) && logged.contains("listen late_web"),
        "{logged}"
    );
    assert!(
        !agent.get("/healthz").body.contains("main.cfg"),
        "/healthz names the operator's file"
    );
}

/// The reviewer's attack: `global setenv OPPORT <p>` and `bind "127.0.0.1:${OPPORT}"`. The
/// agent expands the variable as HAProxy does, so a PUT for p is refused naming the frontend,
/// without host checks (HAProxy's own environment not readable), and p keeps its traffic; a
/// port nobody binds still gets its frontend.
#[test]
fn a_port_set_by_setenv_in_the_global_section_is_refused() {
    let operator = Echo::start("127.0.0.1", "OPERATOR");
    let p = free_port();
    let proxies = format!(
        "global\n    setenv OPPORT {p}\n\n\
         frontend operator_web\n    bind \"127.0.0.1:${{OPPORT}}\"\n    default_backend operator_be\n\n\
         backend operator_be\n    server op {}\n",
        operator.addr
    );
    let (agent, main) = attached_without_host_checks(&proxies);
    let (a, _) = operator_web_keeps_its_port(&agent, &main, p, "${OPPORT}", "a port from setenv");
    let q = free_port();
    agent.put_ok(q, "node-a", &body(&a.ip(), a.port(), json!({})), "reload");
    wait_reaches(q, "A", SETTLE);
}

/// A listener whose port the agent cannot know: `"${LBAGENT_TEST_UNSET_PORT-<d>}"` without
/// host checks (HAProxy's environment may set it, the agent cannot read it) and an inherited
/// `fd@` socket. Any port may be theirs, so every new frontend is refused, 409 `port_owned`
/// naming the file, the line and why, before any file is written.
#[test]
fn a_listener_whose_port_cannot_be_told_refuses_every_new_frontend() {
    let d = free_port();
    let a = Echo::start("127.0.0.2", "A");
    for (bind, why) in [
        (
            format!("bind \":${{LBAGENT_TEST_UNSET_PORT-{d}}}\""),
            "cannot resolve",
        ),
        ("bind fd@${LBAGENT_TEST_FD}".to_string(), "fd@"),
    ] {
        let proxies = format!(
            "frontend operator_web\n    {bind}\n    default_backend operator_be\n\n\
             backend operator_be\n    server op 127.0.0.1:9\n"
        );
        // Only the agent's scan reads this file: HAProxy is given none of it (an `fd@` it
        // does not have would stop it), as a file HAProxy loads but the agent cannot see
        // through would be.
        let extra_dir = tempfile::tempdir().unwrap();
        let extra = extra_dir.path().join("operator.cfg");
        std::fs::write(&extra, &proxies).unwrap();
        let agent = Agent::attached_with(
            "",
            Options {
                extra: vec![
                    "--no-host-checks".into(),
                    "--haproxy-extra-config".into(),
                    extra.display().to_string(),
                ],
                ..Options::default()
            },
        );
        let before = Untouched::of(&agent);
        let fresh = free_port();
        let r = agent.put(fresh, "node-a", &body(&a.ip(), a.port(), json!({})));
        assert_owned(
            &r,
            &[
                &format!("{} line 2", extra.display()),
                "frontend operator_web",
                why,
                "refuses new frontends",
            ],
            &bind,
        );
        before.assert_same(&agent, &bind);
    }
}

/// A port bound in another `-f` file is refused: found on HAProxy's command line (a `conf.d`
/// directory, host checks on), or given with `--haproxy-extra-config` (host checks off). The
/// agent's own API port is refused even when `--allow-frontend-ports` allows it.
#[test]
fn ports_of_other_files_and_the_agents_own_are_refused() {
    let conf_d = tempfile::tempdir().unwrap();
    let conf_d_path = conf_d.path().canonicalize().unwrap();
    let operator = Echo::start("127.0.0.1", "OPERATOR");
    let s = free_port();
    // A symlink into the directory, as configuration management often lays them out: HAProxy
    // follows it (stat), so the agent must too.
    let elsewhere = tempfile::tempdir().unwrap();
    let target = elsewhere.path().join("stats-page.conf");
    std::fs::write(
        &target,
        format!(
            "listen stats_page\n    bind 127.0.0.1:{s}\n    server op {}\n",
            operator.addr
        ),
    )
    .unwrap();
    std::os::unix::fs::symlink(&target, conf_d_path.join("stats.cfg")).unwrap();
    // Not loaded by HAProxy (no `.cfg`): its port is free.
    let free = free_port();
    std::fs::write(
        conf_d_path.join("notes.txt"),
        format!("frontend nobody\n    bind :{free}\n"),
    )
    .unwrap();
    let a = Echo::start("127.0.0.2", "A");
    for (flags, how) in [
        (vec![], "HAProxy's command line"),
        (
            vec![
                "--no-host-checks".to_string(),
                "--haproxy-extra-config".into(),
                conf_d_path.display().to_string(),
            ],
            "--haproxy-extra-config",
        ),
    ] {
        let mut extra = flags;
        extra.extend(["--allow-frontend-ports".into(), "1-65535".into()]);
        let agent = Agent::attached_with(
            "",
            Options {
                extra,
                haproxy_configs: vec![conf_d_path.clone()],
                ..Options::default()
            },
        );
        wait_reaches(s, "OPERATOR", SETTLE);
        let before = Untouched::of(&agent);
        let r = agent.put(s, "node-a", &body(&a.ip(), a.port(), json!({})));
        let owner = format!(
            "port {s} is bound by listen stats_page in {} line 2",
            conf_d_path.join("stats.cfg").display()
        );
        assert_owned(&r, &[&owner], how);
        before.assert_same(&agent, how);
        all_reach(s, "OPERATOR", 40);

        let api = agent.addr.port();
        let r = agent.put(api, "node-a", &body(&a.ip(), a.port(), json!({})));
        assert_owned(
            &r,
            &[&format!("port {api} is the agent's own API port")],
            "the API's port",
        );
        before.assert_same(&agent, "PUT for the API's port");
        assert_eq!(agent.get("/healthz").status, 200, "the API still answers");

        agent.put_ok(
            free,
            "node-a",
            &body(&a.ip(), a.port(), json!({})),
            "reload",
        );
        wait_reaches(free, "A", SETTLE);

        // A dangling `.cfg` symlink: what HAProxy would load cannot be read, so every new
        // frontend is refused, naming it, until it is fixed.
        let dangling = conf_d_path.join("zz-gone.cfg");
        std::os::unix::fs::symlink(elsewhere.path().join("gone.conf"), &dangling).unwrap();
        let fresh = free_port();
        let before = Untouched::of(&agent);
        let r = agent.put(fresh, "node-a", &body(&a.ip(), a.port(), json!({})));
        assert_owned(
            &r,
            &[&dangling.display().to_string(), "cannot read"],
            "a dangling symlink",
        );
        before.assert_same(&agent, "PUT with a dangling symlink");
        std::fs::remove_file(&dangling).unwrap();
    }
}

/// Managed mode: the main file is the agent's own (sockets are UNIX sockets, nothing binds a
/// TCP port), so any free port gets its frontend, and the API's port is still refused when
/// `--allow-frontend-ports` allows it.
#[test]
fn managed_mode_refuses_only_its_api_port() {
    let agent = Agent::managed_with(Options {
        extra: vec!["--allow-frontend-ports".into(), "1-65535".into()],
        ..Options::default()
    });
    let a = Echo::start("127.0.0.2", "A");
    let api = agent.addr.port();
    let before = Untouched::of(&agent);
    let r = agent.put(api, "node-a", &body(&a.ip(), a.port(), json!({})));
    assert_owned(
        &r,
        &[&format!(
            "port {api} is the agent's own API port (--listen 127.0.0.1:{api})"
        )],
        "the API's port",
    );
    before.assert_same(&agent, "PUT for the API's port");
    let fe = free_port();
    agent.put_ok(fe, "node-a", &body(&a.ip(), a.port(), json!({})), "reload");
    wait_reaches(fe, "A", SETTLE);
    let health = agent.get("/healthz").json();
    assert!(health.get("port_conflicts").is_none(), "{health}");
}
