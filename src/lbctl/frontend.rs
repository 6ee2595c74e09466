//! `lbctl frontend set|delete`, for operators: a frontend's whole settings (signed `PUT
//! /v1/frontends/{port}`) and its removal (signed `DELETE /v1/frontends/{port}`), each answered
//! with one line. Also the home of [`FrontendFlags`], the settings flags `lbctl phone-home`
//! shares, each checked at parse time by the agent's own rules ([`crate::model::settings`]).
//!
//! Exit codes: 0 the agent took it (`pending` too: it is stored); 2 a usage or configuration
//! error, or the agent refused it (a 4xx but 429: the same request fails again until the
//! frontend, the request or the key changes); 1 the agent could not be reached or failed (a
//! 5xx, 429: worth retrying).

use std::process::ExitCode;

use clap::Subcommand;
use hyper::Method;

use super::agent_client::{agent_said, AgentError};
use super::{port_flag, AgentArgs};
use crate::model::settings::{
    FrontendSettings, HealthCheck, HttpPath, Millis, ProxyProtocol, RawCheck, RawSettings,
    RawTimeouts, Timeouts,
};
use crate::model::Mode;

#[derive(Subcommand, Debug)]
pub enum FrontendCommand {
    /// Give a frontend its whole settings (signed PUT /v1/frontends/PORT): a settings flag left
    /// out is the default, not the frontend's current value (unlike phone-home, where it is not
    /// compared). Creates the frontend, with no servers, when there is none.
    Set(Box<SetArgs>),
    /// Remove a whole frontend and its servers (signed DELETE /v1/frontends/PORT; a reload).
    Delete(DeleteArgs),
}

#[derive(clap::Args, Debug)]
pub struct SetArgs {
    /// The frontend port.
    #[arg(value_parser = port_flag)]
    pub port: u16,
    /// The frontend's mode; left out: an existing frontend's, tcp for a new one. It does not
    /// change: another mode than an existing frontend's is refused (delete it first).
    #[arg(long, value_name = "tcp|http", value_parser = mode_flag)]
    pub mode: Option<Mode>,
    #[command(flatten)]
    pub agent: AgentArgs,
    #[command(
        flatten,
        next_help_heading = "Frontend settings (the whole settings: a flag left out is the default)"
    )]
    pub settings: FrontendFlags,
}

#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    /// The frontend port.
    #[arg(value_parser = port_flag)]
    pub port: u16,
    #[command(flatten)]
    pub agent: AgentArgs,
}

fn mode_flag(text: &str) -> Result<Mode, String> {
    match text {
        "tcp" => Ok(Mode::Tcp),
        "http" => Ok(Mode::Http),
        _ => Err(format!("{text:?} must be tcp or http")),
    }
}

/// The PUT's body: the settings as the flags give them, every one left out absent (the agent
/// takes it as the default), and `mode` only when given.
fn set_body(mode: Option<Mode>, settings: &FrontendSettings) -> serde_json::Value {
    let mut body = serde_json::to_value(settings).expect("settings serialize");
    if let Some(m) = mode {
        body["mode"] = serde_json::json!(m.as_str());
    }
    body
}

/// How a command ended: the line to print and the exit code.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Printed on stdout; exit 0.
    Done(String),
    /// Printed on stderr after `lbctl: `; the exit code.
    Failed(u8, String),
}

/// The line for the agent's answer to a change of frontend `port`.
fn outcome(port: u16, status: u16, body: &str) -> Outcome {
    if !(200..300).contains(&status) {
        let (head, message) = agent_said(status, body);
        return if (400..500).contains(&status) && status != 429 {
            Outcome::Failed(
                2,
                format!("frontend {port}: the agent refused it ({head}): {message}"),
            )
        } else {
            Outcome::Failed(
                1,
                format!("frontend {port}: the agent answered {head}: {message}"),
            )
        };
    }
    let answer: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let (Some(applied), Some(generation)) =
        (answer["applied"].as_str(), answer["generation"].as_u64())
    else {
        return Outcome::Failed(
            1,
            format!(
                "frontend {port}: the agent answered {status} without applied and generation: {}",
                body.trim()
            ),
        );
    };
    let line = match applied {
        "unchanged" => format!("frontend {port}: unchanged, generation {generation}"),
        // Stored, so done: the agent applies it on its own.
        "pending" => {
            let why = match answer["haproxy_refused"].as_str() {
                Some(refused) => format!("stored; HAProxy refused: {refused}; the agent retries"),
                None => "stored; HAProxy did not answer, applied when it is back".to_string(),
            };
            format!("frontend {port}: pending ({why}), generation {generation}")
        }
        _ => match answer["reload_for"].as_str() {
            Some(why) => {
                format!("frontend {port}: applied {applied} ({why}), generation {generation}")
            }
            None => format!("frontend {port}: applied {applied}, generation {generation}"),
        },
    };
    Outcome::Done(line)
}

/// Runs `lbctl frontend ...`, printing its one line.
pub async fn run(command: FrontendCommand) -> ExitCode {
    let (agent, port, method, body) = match &command {
        FrontendCommand::Set(a) => {
            let body = set_body(a.mode, &a.settings.settings());
            (&a.agent, a.port, Method::PUT, body.to_string().into_bytes())
        }
        FrontendCommand::Delete(a) => (&a.agent, a.port, Method::DELETE, Vec::new()),
    };
    let path = format!("/v1/frontends/{port}");
    let result = async {
        let c = agent.connect()?;
        let (status, text) = c
            .client
            .signed_request(&c.key, method, &path, body, c.timeout)
            .await?;
        Ok(outcome(port, status, &text))
    }
    .await;
    let outcome = result.unwrap_or_else(|e| match e {
        AgentError::Config(e) => Outcome::Failed(2, e),
        AgentError::Transport(e) => Outcome::Failed(1, e),
    });
    match outcome {
        Outcome::Done(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Outcome::Failed(code, line) => {
            eprintln!("lbctl: {line}");
            ExitCode::from(code)
        }
    }
}

/// A frontend's settings as flags, shared by `lbctl phone-home` and `lbctl frontend set`. What a
/// flag left out means is the command's: phone-home leaves it out of the comparison, `frontend
/// set` sends the default. Each command names that in the help heading it flattens these under
/// (a heading here would override theirs).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct FrontendFlags {
    /// The PROXY protocol header HAProxy sends the node before each connection's bytes.
    #[arg(long, value_name = "none|v1|v2", value_parser = proxy_protocol_flag)]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Health-check this port instead of the server's own (phone-home's --node-port): a
    /// Service's healthCheckNodePort; checks on it carry no PROXY header.
    #[arg(long, value_name = "PORT", value_parser = check_port_flag)]
    pub check_port: Option<u16>,
    /// An HTTP health check, `GET PATH` (2xx or 3xx is up), instead of a TCP connect.
    #[arg(long, value_name = "PATH", value_parser = check_http_flag)]
    pub check_http: Option<HttpPath>,
    /// Time between health checks (HAProxy's default 2s): `500ms`, `2s`, `1m`.
    #[arg(long, value_name = "DURATION", value_parser = check_interval_flag)]
    pub check_interval: Option<Millis>,
    /// Passed checks that bring a server up, 1–100 (default 2).
    #[arg(long, value_name = "N", value_parser = check_rise_flag)]
    pub check_rise: Option<u8>,
    /// Failed checks that take a server down, 1–100 (default 3).
    #[arg(long, value_name = "N", value_parser = check_fall_flag)]
    pub check_fall: Option<u8>,
    /// Longest a client may stay silent: `1m`, `30s` (1ms to 24h).
    #[arg(long, value_name = "DURATION", value_parser = timeout_client_flag)]
    pub timeout_client: Option<Millis>,
    /// Longest the node may stay silent.
    #[arg(long, value_name = "DURATION", value_parser = timeout_server_flag)]
    pub timeout_server: Option<Millis>,
    /// Idle limit of an established connection in both directions, replacing the client and
    /// server timeouts: in tcp mode every connection, in http mode a WebSocket. `1h` for MQTT.
    #[arg(long, value_name = "DURATION", value_parser = timeout_tunnel_flag)]
    pub timeout_tunnel: Option<Millis>,
    /// Longest a connection to the node may take to open.
    #[arg(long, value_name = "DURATION", value_parser = timeout_connect_flag)]
    pub timeout_connect: Option<Millis>,
    /// Most connections the frontend takes at once, 1–1000000.
    #[arg(long, value_name = "N", value_parser = maxconn_flag)]
    pub maxconn: Option<u32>,
}

impl FrontendFlags {
    /// The settings given, nothing normalized (nothing given: default).
    pub fn settings(&self) -> FrontendSettings {
        FrontendSettings {
            proxy_protocol: self.proxy_protocol,
            check: HealthCheck {
                port: self.check_port,
                http_path: self.check_http.clone(),
                interval: self.check_interval,
                rise: self.check_rise,
                fall: self.check_fall,
            },
            timeouts: Timeouts {
                client: self.timeout_client,
                server: self.timeout_server,
                tunnel: self.timeout_tunnel,
                connect: self.timeout_connect,
            },
            maxconn: self.maxconn,
        }
    }
}

/// One flag's value through the agent's own check: put into a [`RawSettings`], validated as
/// the agent validates a request, and taken back out.
fn checked<T>(
    raw: RawSettings,
    take: impl FnOnce(FrontendSettings) -> Option<T>,
) -> Result<T, String> {
    let settings = raw.validate("").map_err(|e| e.message)?;
    Ok(take(settings).expect("a value given is a value validated"))
}

fn number(text: &str) -> Result<i64, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number"))
}

fn with_check(check: RawCheck) -> RawSettings {
    RawSettings {
        check: Some(check),
        ..RawSettings::default()
    }
}

fn with_timeouts(timeouts: RawTimeouts) -> RawSettings {
    RawSettings {
        timeouts: Some(timeouts),
        ..RawSettings::default()
    }
}

fn proxy_protocol_flag(text: &str) -> Result<ProxyProtocol, String> {
    let raw = RawSettings {
        proxy_protocol: Some(text.to_string()),
        ..RawSettings::default()
    };
    checked(raw, |s| s.proxy_protocol)
}

fn check_port_flag(text: &str) -> Result<u16, String> {
    let port = Some(number(text)?);
    checked(
        with_check(RawCheck {
            port,
            ..RawCheck::default()
        }),
        |s| s.check.port,
    )
}

fn check_http_flag(text: &str) -> Result<HttpPath, String> {
    let http_path = Some(text.to_string());
    checked(
        with_check(RawCheck {
            http_path,
            ..RawCheck::default()
        }),
        |s| s.check.http_path,
    )
}

fn check_interval_flag(text: &str) -> Result<Millis, String> {
    let interval = Some(text.to_string());
    checked(
        with_check(RawCheck {
            interval,
            ..RawCheck::default()
        }),
        |s| s.check.interval,
    )
}

fn check_rise_flag(text: &str) -> Result<u8, String> {
    let rise = Some(number(text)?);
    checked(
        with_check(RawCheck {
            rise,
            ..RawCheck::default()
        }),
        |s| s.check.rise,
    )
}

fn check_fall_flag(text: &str) -> Result<u8, String> {
    let fall = Some(number(text)?);
    checked(
        with_check(RawCheck {
            fall,
            ..RawCheck::default()
        }),
        |s| s.check.fall,
    )
}

fn timeout_client_flag(text: &str) -> Result<Millis, String> {
    let client = Some(text.to_string());
    checked(
        with_timeouts(RawTimeouts {
            client,
            ..RawTimeouts::default()
        }),
        |s| s.timeouts.client,
    )
}

fn timeout_server_flag(text: &str) -> Result<Millis, String> {
    let server = Some(text.to_string());
    checked(
        with_timeouts(RawTimeouts {
            server,
            ..RawTimeouts::default()
        }),
        |s| s.timeouts.server,
    )
}

fn timeout_tunnel_flag(text: &str) -> Result<Millis, String> {
    let tunnel = Some(text.to_string());
    checked(
        with_timeouts(RawTimeouts {
            tunnel,
            ..RawTimeouts::default()
        }),
        |s| s.timeouts.tunnel,
    )
}

fn timeout_connect_flag(text: &str) -> Result<Millis, String> {
    let connect = Some(text.to_string());
    checked(
        with_timeouts(RawTimeouts {
            connect,
            ..RawTimeouts::default()
        }),
        |s| s.timeouts.connect,
    )
}

fn maxconn_flag(text: &str) -> Result<u32, String> {
    let raw = RawSettings {
        maxconn: Some(number(text)?),
        ..RawSettings::default()
    };
    checked(raw, |s| s.maxconn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lbctl::{Cli, Commands};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<FrontendCommand, String> {
        match Cli::try_parse_from(["lbctl", "frontend"].iter().chain(args)) {
            Ok(Cli {
                command: Commands::Frontend(c),
            }) => Ok(c),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        }
    }

    fn set(extra: &[&str]) -> Result<SetArgs, String> {
        let base = ["set", "443", "--key-file", "k"];
        match parse(&[&base[..], extra].concat())? {
            FrontendCommand::Set(a) => Ok(*a),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn set_sends_the_whole_settings_and_a_flag_left_out_is_absent() {
        let a = set(&[]).unwrap();
        assert_eq!((a.port, a.mode), (443, None));
        // No flag: every setting back to its default, the mode left as it is.
        assert_eq!(
            set_body(a.mode, &a.settings.settings()),
            serde_json::json!({})
        );
        assert_eq!(a.agent.key_file, std::path::PathBuf::from("k"));

        let a = set(&[
            "--mode",
            "http",
            "--proxy-protocol",
            "v2",
            "--check-port",
            "32100",
            "--check-http",
            "/healthz",
            "--check-rise",
            "2",
            "--timeout-tunnel",
            "1h",
            "--maxconn",
            "500",
        ])
        .unwrap();
        let body = set_body(a.mode, &a.settings.settings());
        assert_eq!(
            body,
            serde_json::json!({
                "mode": "http",
                "proxy_protocol": "v2",
                "check": {"port": 32100, "http_path": "/healthz", "rise": 2},
                "timeouts": {"tunnel": "1h"},
                "maxconn": 500,
            })
        );
        // The agent reads back what was given.
        let mut settings = body.clone();
        settings.as_object_mut().unwrap().remove("mode");
        let raw: RawSettings = serde_json::from_value(settings).unwrap();
        assert_eq!(raw.validate("").unwrap(), a.settings.settings());

        let e = set(&["--mode", "udp"]).unwrap_err();
        assert!(
            e.contains("invalid value 'udp' for '--mode <tcp|http>'")
                && e.contains("\"udp\" must be tcp or http"),
            "{e}"
        );
    }

    #[test]
    fn ports_and_the_agents_flags_are_those_of_lbctl_state() {
        for bad in ["0", "65536", "https"] {
            let e = parse(&["delete", bad, "--key-file", "k"]).unwrap_err();
            assert!(
                e.contains(&format!("invalid value '{bad}' for '<PORT>'")),
                "{e}"
            );
        }
        let e = parse(&["set", "443"]).unwrap_err();
        assert!(e.contains("--key-file <FILE>"), "{e}");
        let e = parse(&["delete"]).unwrap_err();
        assert!(e.contains("<PORT>"), "{e}");
        match parse(&[
            "delete",
            "1883",
            "--agent",
            "https://lb:9900",
            "--key-file",
            "keys.toml",
            "--key-id",
            "ops",
            "--timeout",
            "30s",
            "--ca-file",
            "ca.pem",
            "--client-cert",
            "c.pem",
            "--client-key",
            "c.key",
        ])
        .unwrap()
        {
            FrontendCommand::Delete(a) => {
                assert_eq!(a.port, 1883);
                assert_eq!(a.agent.agent, "https://lb:9900");
                assert_eq!(a.agent.key_id.as_deref(), Some("ops"));
                assert_eq!(a.agent.timeout.0, std::time::Duration::from_secs(30));
                assert_eq!(
                    a.agent.tls.ca_file,
                    Some(std::path::PathBuf::from("ca.pem"))
                );
            }
            other => panic!("{other:?}"),
        }
        // Settings are not flags of a removal.
        let e = parse(&["delete", "443", "--key-file", "k", "--maxconn", "5"]).unwrap_err();
        assert!(e.contains("unexpected argument '--maxconn'"), "{e}");
    }

    /// The flags' checks, shared by `lbctl frontend set` and `lbctl phone-home`.
    #[test]
    fn a_bad_setting_is_refused_naming_its_flag() {
        let phone_home = |flag: &str| {
            Cli::try_parse_from([
                "lbctl",
                "phone-home",
                "--frontend-port",
                "443",
                "--node-port",
                "30443",
                "--node",
                "n",
                flag,
            ])
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        for (flag, value, says) in [
            ("--proxy-protocol", "v3", "must be none, v1 or v2"),
            ("--check-port", "0", "must be from 1 to 65535"),
            ("--check-port", "65536", "must be from 1 to 65535"),
            ("--check-port", "http", "is not a whole number"),
            ("--check-http", "healthz", "must start with '/'"),
            ("--check-http", "/a b", "contains ' '"),
            ("--check-interval", "5", "has no unit"),
            ("--check-interval", "0ms", "from 1ms to 24h"),
            ("--check-rise", "0", "must be from 1 to 100"),
            ("--check-fall", "101", "must be from 1 to 100"),
            ("--timeout-client", "25h", "from 1ms to 24h"),
            ("--timeout-server", "soon", "not a duration"),
            ("--timeout-tunnel", "1", "has no unit"),
            ("--timeout-connect", "1us", ""),
            ("--maxconn", "0", "must be from 1 to 1000000"),
            ("--maxconn", "-5", "must be from 1 to 1000000"),
        ] {
            let arg = format!("{flag}={value}");
            for e in [set(&[&arg]).unwrap_err(), phone_home(&arg).unwrap_err()] {
                assert!(
                    e.contains(&format!("invalid value '{value}' for '{flag} <"))
                        && e.contains(says),
                    "{flag} {value}: {e}"
                );
            }
        }
    }

    #[test]
    fn each_answer_is_one_line() {
        let done = |status, body| match outcome(443, status, body) {
            Outcome::Done(line) => line,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            done(
                200,
                r#"{"frontend_port":443,"backend":"be_443","applied":"reload","reload_for":"proxy_protocol","generation":12}"#
            ),
            "frontend 443: applied reload (proxy_protocol), generation 12"
        );
        assert_eq!(
            done(200, r#"{"applied":"runtime","generation":13}"#),
            "frontend 443: applied runtime, generation 13"
        );
        assert_eq!(
            done(200, r#"{"applied":"unchanged","generation":13}"#),
            "frontend 443: unchanged, generation 13"
        );
        assert_eq!(
            done(
                200,
                r#"{"applied":"reload","reload_for":"a removed frontend","generation":14}"#
            ),
            "frontend 443: applied reload (a removed frontend), generation 14"
        );
        assert_eq!(
            done(202, r#"{"applied":"pending","generation":15}"#),
            "frontend 443: pending (stored; HAProxy did not answer, applied when it is back), generation 15"
        );
        assert_eq!(
            done(
                202,
                r#"{"applied":"pending","generation":16,"haproxy_refused":"set maxconn frontend fe_443 5: No such frontend."}"#
            ),
            "frontend 443: pending (stored; HAProxy refused: set maxconn frontend fe_443 5: No such frontend.; the agent retries), generation 16"
        );

        let failed = |status, body| match outcome(443, status, body) {
            Outcome::Failed(code, line) => (code, line),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            failed(
                409,
                r#"{"error":"conflict","message":"frontend 443 is in tcp mode; a server in http mode cannot join it"}"#
            ),
            (
                2,
                "frontend 443: the agent refused it (409 conflict): frontend 443 is in tcp mode; a server in http mode cannot join it".to_string()
            )
        );
        assert_eq!(
            failed(
                404,
                r#"{"error":"not_found","message":"no frontend on port 443"}"#
            ),
            (
                2,
                "frontend 443: the agent refused it (404 not_found): no frontend on port 443"
                    .to_string()
            )
        );
        // Worth retrying: exit 1.
        assert_eq!(
            failed(
                503,
                r#"{"error":"haproxy_unavailable","message":"HAProxy does not answer"}"#
            ),
            (
                1,
                "frontend 443: the agent answered 503 haproxy_unavailable: HAProxy does not answer"
                    .to_string()
            )
        );
        assert_eq!(
            failed(429, r#"{"error":"rate_limited","message":"later"}"#).0,
            1
        );
        assert_eq!(
            failed(502, "Bad Gateway\n"),
            (
                1,
                "frontend 443: the agent answered 502: Bad Gateway".to_string()
            )
        );
        assert_eq!(
            failed(200, "ok"),
            (
                1,
                "frontend 443: the agent answered 200 without applied and generation: ok"
                    .to_string()
            )
        );
    }
}
