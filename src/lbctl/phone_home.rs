//! `lbctl phone-home`, the sidecar: tells the agent, every interval, which node serves a frontend
//! port, re-resolving the node's IP each time so an IP change reaches HAProxy within one
//! interval; retries with capped exponential backoff while the agent is away; on SIGTERM
//! removes its server and exits 0. Logs one line per change or failure, not per heartbeat.
//!
//! With several agents (`--agent URL1,URL2`, for agents that share their state, not behind one
//! floating IP) it sends to one at a time and keeps to it while it answers; when it cannot be
//! reached or answers 5xx or 429 (what is retried anyway), the next attempt goes to the next
//! URL of the list, round robin. A refusal (4xx) is final as with one agent: another agent
//! sharing the state would refuse it too. The DELETE goes to the agent that took the last
//! registration, then to each other once while they cannot be reached.
//!
//! Exit codes: 0 done (stopped by a signal, or `--once` registered); 1 the agent could not be
//! reached or kept failing (`--once` gave up); 2 a usage or configuration error (a TLS
//! certificate that does not verify is one: no retry), or the agent refused the request for
//! good (400, 403, 404, 409).
//!
//! The frontend's settings flags (`--proxy-protocol`, `--check-*`, `--timeout-*`,
//! `--maxconn`) go inline in the PUT, only those given: they create the frontend when this is
//! its first server, and must match an existing frontend's (a 409 otherwise, which is final:
//! `lbctl frontend set` changes a frontend's settings). They are [`FrontendFlags`], shared with
//! `lbctl frontend set` and checked at parse time by the agent's own rules.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use hyper::Method;

use super::agent_client::{agent_said, agent_urls, AgentClient, AgentError, SigningKey};
use super::frontend::FrontendFlags;
use super::port_flag;
use crate::clock::DurationSetting;
use crate::model::{check_service_label, NodeName};

#[derive(clap::Args, Debug)]
pub struct PhoneHomeArgs {
    /// The agent's URL, or several separated by commas to fail over between agents that share
    /// their state (tried in turn while one cannot be reached or answers 5xx/429).
    #[arg(
        long,
        env = "LBAGENT_URL",
        default_value = "http://127.0.0.1:9900",
        value_name = "URL[,URL...]"
    )]
    pub agent: String,
    /// The frontend port on the load balancer.
    #[arg(long, value_parser = port_flag)]
    pub frontend_port: u16,
    /// The port on the node (a NodePort).
    #[arg(long, value_parser = port_flag)]
    pub node_port: u16,
    /// The node's name (the server's name in HAProxy).
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// The node's IP (the downward API fills NODE_IP from status.hostIP).
    #[arg(long, env = "NODE_IP", conflicts_with = "node_ip_from")]
    pub node_ip: Option<IpAddr>,
    /// Where to read the node's IP each interval: `interface:NAME` or `url:URL` (an endpoint
    /// answering the public egress IP as text).
    #[arg(long, value_name = "interface:NAME|url:URL")]
    pub node_ip_from: Option<String>,
    /// File holding the secret alone (a trailing newline is ignored), or the agent's keys.toml.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Key id.
    #[arg(long, default_value = "default")]
    pub key_id: String,
    /// `tcp` or `http`.
    #[arg(long, default_value = "tcp")]
    pub mode: String,
    /// `ready`, `drain` or `maint`.
    #[arg(long, default_value = "ready")]
    pub state: String,
    /// A label shown by lbctl (`traefik`, `mqtt`).
    #[arg(long)]
    pub service: Option<String>,
    /// Weight, 0–256.
    #[arg(long)]
    pub weight: Option<u16>,
    /// How often to re-send, 10ms to 1d: `30s`, `500ms`, `1m`, or a bare number of seconds
    /// (±10 % jitter).
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub interval: DurationSetting,
    /// Register once and exit (for init containers); the registration asks for no lease, so
    /// it stays until deleted.
    #[arg(long)]
    pub once: bool,
    /// Deadline for each request, 10ms to 1d.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub timeout: DurationSetting,
    #[command(flatten)]
    pub tls: crate::tls::client::ClientTlsArgs,
    #[command(
        flatten,
        next_help_heading = "Frontend settings (sent only when given)"
    )]
    pub frontend: FrontendFlags,
}

/// The PUT's `frontend` object, or `None` when no setting was given (the key is left out). For
/// an existing frontend each one given must be what it has, or the agent refuses the PUT (409).
fn inline_settings(flags: &FrontendFlags) -> Option<serde_json::Value> {
    let s = flags.settings();
    // Serialized as given, not normalized: `--check-rise 2` is still checked against the
    // frontend's.
    (!s.is_default()).then(|| serde_json::to_value(&s).expect("settings serialize"))
}

/// The range of `--interval` and `--timeout`.
const DURATION_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(86_400);

/// Where the node IP comes from.
enum IpSource {
    Fixed(IpAddr),
    Interface(String),
    Url(String),
}

impl IpSource {
    async fn resolve(&self, timeout: Duration) -> Result<IpAddr, String> {
        match self {
            IpSource::Fixed(ip) => Ok(*ip),
            IpSource::Interface(name) => interface_ip(name),
            IpSource::Url(url) => {
                let text = plain_get(url, timeout).await?;
                let t = text.trim();
                t.parse()
                    .map_err(|_| format!("{url} answered {t:?}, not an IP address"))
            }
        }
    }
}

/// The first global IPv4 address of an interface, else its first IPv6 one.
fn interface_ip(name: &str) -> Result<IpAddr, String> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("cannot list interfaces: {e}"))?;
    let mut v6 = None;
    let mut seen = false;
    for a in addrs.filter(|a| a.interface_name == name) {
        seen = true;
        let Some(addr) = a.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            return Ok(IpAddr::V4(v4.ip()));
        }
        if let Some(s6) = addr.as_sockaddr_in6() {
            let ip = s6.ip();
            // Link-local addresses are no use to a load balancer elsewhere.
            if (ip.segments()[0] & 0xffc0) != 0xfe80 && v6.is_none() {
                v6 = Some(IpAddr::V6(ip));
            }
        }
    }
    match (v6, seen) {
        (Some(ip), _) => Ok(ip),
        (None, true) => Err(format!("interface {name} has no usable IP address")),
        (None, false) => Err(format!("no interface named {name}")),
    }
}

async fn plain_get(url: &str, timeout: Duration) -> Result<String, String> {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL {url:?}: {e}"))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let resp = tokio::time::timeout(timeout, client.get(uri))
        .await
        .map_err(|_| format!("{url} did not answer within {timeout:?}"))?
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url} answered {}", resp.status()));
    }
    let body = tokio::time::timeout(timeout, resp.into_body().collect())
        .await
        .map_err(|_| format!("{url} did not finish answering"))?
        .map_err(|e| format!("reading {url}: {e}"))?
        .to_bytes();
    if body.len() > 256 {
        return Err(format!(
            "{url} answered {} bytes, not an IP address",
            body.len()
        ));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn log(line: &str) {
    eprintln!("lbctl phone-home: {line}");
}

/// ±10 % random jitter: spreads sidecars that start together (the same instant on many nodes,
/// when a cluster boots, so not from the clock).
fn jittered(interval: Duration) -> Duration {
    let mut b = [0u8; 2];
    // Without randomness the interval stays as it is: jitter is a courtesy, not a need.
    let r = getrandom::fill(&mut b).map_or(500, |()| u16::from_le_bytes(b) % 1000);
    let factor = 0.9 + 0.2 * (f64::from(r) / 1000.0);
    interval.mul_f64(factor)
}

enum Sent {
    Ok(String),
    /// Worth retrying with the same agent: the clock or key may be fixed, the node IP found.
    Retry(String),
    /// Worth retrying, with the next agent of a list: this one cannot be reached or answered
    /// 5xx or 429.
    Away(String),
    /// Retrying will not help.
    Refused(String),
    /// 409: the frontend's settings differ from this sidecar's flags (the agent's message,
    /// which names the field). Final before this sidecar ever registered; after, the frontend
    /// was changed under it, and it renews without them (see [`run`]).
    SettingsConflict(String),
}

struct PhoneHome {
    args: PhoneHomeArgs,
    /// `--agent`'s, in its order: one, or a failover list.
    agents: Vec<AgentClient>,
    key: SigningKey,
    source: IpSource,
    path: String,
    /// The PUT's `frontend` object, when a setting was given.
    frontend: Option<serde_json::Value>,
    interval: Duration,
    timeout: Duration,
}

impl PhoneHome {
    async fn put(&self, agent: &AgentClient, ip: IpAddr) -> Sent {
        self.put_with(agent, ip, self.frontend.as_ref()).await
    }

    /// "the agent answered", naming which when there are several.
    fn answered(&self, agent: &AgentClient) -> String {
        if self.agents.len() > 1 {
            format!("the agent at {} answered", agent.url())
        } else {
            "the agent answered".into()
        }
    }

    async fn put_with(
        &self,
        agent: &AgentClient,
        ip: IpAddr,
        frontend: Option<&serde_json::Value>,
    ) -> Sent {
        let mut body = serde_json::json!({
            "node_ip": ip.to_string(),
            "node_port": self.args.node_port,
            "mode": self.args.mode,
            "state": self.args.state,
        });
        if let Some(s) = &self.args.service {
            body["service"] = serde_json::json!(s);
        }
        if let Some(w) = self.args.weight {
            body["weight"] = serde_json::json!(w);
        }
        // Registered once, never renewed: it must not expire by the agent's lease.
        if self.args.once {
            body["lease"] = serde_json::json!(false);
        }
        if let Some(settings) = frontend {
            body["frontend"] = settings.clone();
        }
        let body = body.to_string().into_bytes();
        match agent
            .signed_request(&self.key, Method::PUT, &self.path, body, self.timeout)
            .await
        {
            Ok((200 | 202, text)) => Sent::Ok(text),
            // A 409 (a mode or setting that differs from the frontend's, a port HAProxy or
            // another section owns) stays so until someone acts: final, like a refusal.
            Ok((409, text)) if frontend.is_some() && is_settings_conflict(&text) => {
                let (head, message) = agent_said(409, &text);
                Sent::SettingsConflict(format!("the agent refused it ({head}): {message}"))
            }
            Ok((status @ (400 | 403 | 404 | 409 | 413), text)) => {
                let (head, message) = agent_said(status, &text);
                Sent::Refused(format!("the agent refused it ({head}): {message}"))
            }
            Ok((status, text)) => {
                let (head, message) = agent_said(status, &text);
                let e = format!("{} {head}: {message}", self.answered(agent));
                if elsewhere(status) {
                    Sent::Away(e)
                } else {
                    Sent::Retry(e)
                }
            }
            Err(AgentError::Config(e)) => Sent::Refused(e),
            Err(AgentError::Transport(e)) => Sent::Away(e),
        }
    }

    /// The DELETE: [`Sent::Ok`] when the server is gone (200, or 404: it was not there),
    /// [`Sent::Away`] when another agent may take it, else [`Sent::Refused`].
    async fn delete(&self, agent: &AgentClient) -> Sent {
        match agent
            .signed_request(
                &self.key,
                Method::DELETE,
                &self.path,
                Vec::new(),
                self.timeout,
            )
            .await
        {
            Ok((200 | 404, text)) => Sent::Ok(text),
            Ok((status, text)) => {
                let (head, message) = agent_said(status, &text);
                let e = format!("{} {head}: {message}", self.answered(agent));
                if elsewhere(status) {
                    Sent::Away(e)
                } else {
                    Sent::Refused(e)
                }
            }
            Err(AgentError::Transport(e)) => Sent::Away(e),
            Err(e @ AgentError::Config(_)) => Sent::Refused(e.to_string()),
        }
    }
}

/// Whether an answer's status is the agent's trouble, not the request's: 5xx, or 429 (its
/// API flooded). Another agent of a list may answer; a 4xx refusal it would give too.
fn elsewhere(status: u16) -> bool {
    status >= 500 || status == 429
}

/// The agents in the order the DELETE tries them: `first` (the one holding the
/// registration), then each other once, round the list.
fn delete_order(first: usize, count: usize) -> impl Iterator<Item = usize> {
    (0..count).map(move |i| (first + i) % count)
}

/// Whether a 409's body is the agent's refusal of inline settings: its message names the
/// field under `frontend.` (the mode and port refusals do not).
fn is_settings_conflict(body: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(body).is_ok_and(|v| {
        v["error"] == "conflict"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("frontend."))
    })
}

/// Runs the sidecar.
pub async fn run(args: PhoneHomeArgs) -> ExitCode {
    let usage = |m: String| {
        log(&m);
        ExitCode::from(2)
    };
    if let Err(e) = NodeName::new(&args.node) {
        return usage(e.message);
    }
    if let Some(Err(e)) = args
        .service
        .as_deref()
        .map(|s| check_service_label("--service", s))
    {
        return usage(e.message);
    }
    let key = match (&args.key_file, std::env::var("LBAGENT_KEY")) {
        (Some(path), _) => match SigningKey::from_file(path, Some(&args.key_id)) {
            Ok(k) => k,
            Err(e) => return usage(e.to_string()),
        },
        (None, Ok(secret)) if !secret.trim().is_empty() => SigningKey {
            id: args.key_id.clone(),
            secret: secret.trim_end_matches(['\n', '\r']).as_bytes().to_vec(),
        },
        _ => return usage("no key: give --key-file FILE or set LBAGENT_KEY".into()),
    };
    let source = match (&args.node_ip, &args.node_ip_from) {
        (Some(ip), _) => IpSource::Fixed(*ip),
        (None, Some(from)) => match from.split_once(':') {
            Some(("interface", name)) => IpSource::Interface(name.to_string()),
            Some(("url", url)) => IpSource::Url(url.to_string()),
            _ => {
                return usage(format!(
                    "--node-ip-from {from:?}: use interface:NAME or url:URL"
                ))
            }
        },
        (None, None) => {
            return usage("no node IP: give --node-ip, set NODE_IP, or --node-ip-from".into())
        }
    };
    let interval = match args.interval.within("--interval", DURATION_RANGE) {
        Ok(d) => d,
        Err(e) => return usage(e),
    };
    let timeout = match args.timeout.within("--timeout", DURATION_RANGE) {
        Ok(d) => d,
        Err(e) => return usage(e),
    };
    let urls = match agent_urls(&args.agent) {
        Ok(u) => u,
        Err(e) => return usage(e),
    };
    // Every URL now, so a typo in the second shows at start, not at the first failover.
    let mut agents = Vec::with_capacity(urls.len());
    for url in urls {
        match AgentClient::new(url, &args.tls) {
            Ok(c) => agents.push(c),
            Err(e) => return usage(e.to_string()),
        }
    }
    let path = format!("/v1/frontends/{}/servers/{}", args.frontend_port, args.node);
    let frontend = inline_settings(&args.frontend);
    let ph = PhoneHome {
        args,
        agents,
        key,
        source,
        path,
        frontend,
        interval,
        timeout,
    };

    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => return usage(format!("cannot watch SIGTERM: {e}")),
    };
    let max_backoff = ph
        .interval
        .clamp(Duration::from_secs(1), Duration::from_secs(60));
    let give_up_once = Instant::now() + Duration::from_secs(120);
    let mut backoff = Duration::from_millis(500);
    let mut registered: Option<IpAddr> = None;
    let mut last_error: Option<String> = None;
    // The settings conflict last logged, while the sidecar renews without its flags.
    let mut settings_told: Option<String> = None;
    let several = ph.agents.len() > 1;
    // The agent asked now, and the one that took the last registration (the DELETE's).
    let mut current = 0;
    let mut holder: Option<usize> = None;
    // With several agents, the failure last logged for each: one line per agent and outage,
    // not one per attempt while every agent is away.
    let mut agent_told: Vec<Option<String>> = vec![None; ph.agents.len()];
    loop {
        let agent = &ph.agents[current];
        let attempt = match ph.source.resolve(ph.timeout).await {
            Err(e) => Sent::Retry(format!("node IP: {e}")),
            Ok(ip) => {
                let (sent, without_flags) = match ph.put(agent, ip).await {
                    // The frontend's settings were changed after this sidecar registered: its
                    // node keeps serving with them (dropping it would take the node out of
                    // service over a setting), and the log says so at every change of the
                    // message.
                    Sent::SettingsConflict(e) if registered.is_some() => {
                        if settings_told.as_deref() != Some(e.as_str()) {
                            log(&format!(
                                "{e}; renewing without this sidecar's frontend flags: the frontend's own settings stand until they match again"
                            ));
                            settings_told = Some(e);
                        }
                        (ph.put_with(agent, ip, None).await, true)
                    }
                    Sent::SettingsConflict(e) => (Sent::Refused(e), false),
                    other => (other, false),
                };
                if let Sent::Ok(answer) = &sent {
                    if !without_flags {
                        settings_told = None;
                    }
                    if registered != Some(ip) || last_error.is_some() || holder != Some(current) {
                        let through = if several {
                            format!(" through {}", agent.url())
                        } else {
                            String::new()
                        };
                        let without = if without_flags {
                            " (without its frontend flags)"
                        } else {
                            ""
                        };
                        log(&format!(
                            "{} at {ip}:{} serves frontend {}{through}{without}: {}",
                            ph.args.node,
                            ph.args.node_port,
                            ph.args.frontend_port,
                            answer.trim()
                        ));
                    }
                    registered = Some(ip);
                    holder = Some(current);
                }
                sent
            }
        };
        // With several agents, this one's trouble sends the next attempt to the next one, and
        // its own line replaces "retrying" (last_error is set, so the arm below stays quiet).
        if let (true, Sent::Away(e)) = (several, &attempt) {
            let next = (current + 1) % ph.agents.len();
            if agent_told[current].as_ref() != Some(e) {
                log(&format!("{e}; trying {}", ph.agents[next].url()));
                agent_told[current] = Some(e.clone());
            }
            last_error = Some(e.clone());
            current = next;
        }
        let wait = match attempt {
            Sent::Ok(_) => {
                last_error = None;
                agent_told.fill(None);
                backoff = Duration::from_millis(500);
                if ph.args.once {
                    return ExitCode::SUCCESS;
                }
                jittered(ph.interval)
            }
            Sent::Refused(e) | Sent::SettingsConflict(e) => {
                log(&e);
                return ExitCode::from(2);
            }
            Sent::Retry(e) | Sent::Away(e) => {
                if last_error.as_deref() != Some(e.as_str()) {
                    log(&format!("{e}; retrying"));
                    last_error = Some(e);
                }
                if ph.args.once && Instant::now() > give_up_once {
                    log("giving up");
                    return ExitCode::from(1);
                }
                let w = backoff;
                backoff = (backoff * 2).min(max_backoff);
                jittered(w)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // Leaving: take our server out so a pod that moves leaves nothing stale behind.
    let order: Vec<usize> = delete_order(holder.unwrap_or(current), ph.agents.len()).collect();
    for (i, &at) in order.iter().enumerate() {
        let agent = &ph.agents[at];
        match ph.delete(agent).await {
            Sent::Ok(_) => {
                let through = if several {
                    format!(" through {}", agent.url())
                } else {
                    String::new()
                };
                log(&format!(
                    "{} removed from frontend {}{through}",
                    ph.args.node, ph.args.frontend_port
                ));
                break;
            }
            Sent::Away(e) if i + 1 < order.len() => {
                let next = ph.agents[order[i + 1]].url();
                log(&format!(
                    "could not remove {}: {e}; trying {next}",
                    ph.args.node
                ));
            }
            Sent::Away(e) | Sent::Refused(e) | Sent::Retry(e) | Sent::SettingsConflict(e) => {
                log(&format!("could not remove {}: {e}", ph.args.node));
                break;
            }
        }
    }
    ExitCode::SUCCESS
}

use std::time::Instant;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: PhoneHomeArgs,
        }
        let parse = |extra: &[&str]| {
            let base = [
                "lbctl",
                "--frontend-port",
                "443",
                "--node-port",
                "30443",
                "--node",
                "n",
            ];
            Cli::try_parse_from(base.iter().chain(extra)).map(|c| c.args)
        };
        let a = parse(&[]).unwrap();
        assert_eq!(
            (a.interval.0, a.timeout.0),
            (Duration::from_secs(30), Duration::from_secs(10))
        );
        let a = parse(&["--interval", "500ms", "--timeout", "20"]).unwrap();
        assert_eq!(a.interval.0, Duration::from_millis(500));
        assert_eq!(a.timeout.0, Duration::from_secs(20));
        let e = parse(&["--interval", "5x"]).err().unwrap().to_string();
        assert!(
            e.contains("--interval") && e.contains("\"5x\" is not a duration"),
            "{e}"
        );
        for bad in ["0s", "1ms", "2d"] {
            let a = parse(&["--interval", bad]).unwrap();
            let e = a.interval.within("--interval", DURATION_RANGE).unwrap_err();
            assert!(
                e.starts_with("--interval ") && e.contains("out of range"),
                "{e}"
            );
        }
    }

    fn parse(extra: &[&str]) -> Result<PhoneHomeArgs, String> {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: PhoneHomeArgs,
        }
        let base = [
            "lbctl",
            "--frontend-port",
            "443",
            "--node-port",
            "30443",
            "--node",
            "n",
        ];
        Cli::try_parse_from(base.iter().chain(extra))
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn only_the_settings_given_go_into_the_body() {
        assert_eq!(inline_settings(&parse(&[]).unwrap().frontend), None);
        let a = parse(&[
            "--proxy-protocol",
            "v2",
            "--check-port",
            "32123",
            "--check-http",
            "/healthz",
            "--timeout-tunnel",
            "1h",
        ])
        .unwrap();
        assert_eq!(
            inline_settings(&a.frontend),
            Some(serde_json::json!({
                "proxy_protocol": "v2",
                "check": {"port": 32123, "http_path": "/healthz"},
                "timeouts": {"tunnel": "1h"},
            }))
        );
        // Every flag, and values equal to HAProxy's defaults, are sent as given: the agent
        // compares each with the frontend's.
        let all = parse(&[
            "--proxy-protocol=none",
            "--check-port=1",
            "--check-http=/",
            "--check-interval=2s",
            "--check-rise=2",
            "--check-fall=3",
            "--timeout-client=1m",
            "--timeout-server=90s",
            "--timeout-tunnel=24h",
            "--timeout-connect=500ms",
            "--maxconn=1000000",
        ])
        .unwrap();
        let body = inline_settings(&all.frontend).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "proxy_protocol": "none",
                "check": {"port": 1, "http_path": "/", "interval": "2s", "rise": 2, "fall": 3},
                "timeouts": {"client": "1m", "server": "90s", "tunnel": "24h", "connect": "500ms"},
                "maxconn": 1000000,
            })
        );
        // What the agent reads back from it is what was given.
        let raw: crate::model::settings::RawSettings = serde_json::from_value(body).unwrap();
        assert_eq!(raw.validate("frontend.").unwrap(), all.frontend.settings());
    }

    #[test]
    fn only_the_agents_trouble_fails_over() {
        for status in [500, 502, 503, 504, 429] {
            assert!(elsewhere(status), "{status}");
        }
        // A refusal, a key or clock problem: another agent sharing the state would say the same.
        for status in [400, 401, 403, 404, 405, 409, 413, 302] {
            assert!(!elsewhere(status), "{status}");
        }
    }

    #[test]
    fn the_delete_tries_the_holder_first_then_each_other_once() {
        assert_eq!(delete_order(0, 1).collect::<Vec<_>>(), [0]);
        assert_eq!(delete_order(1, 3).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(delete_order(2, 3).collect::<Vec<_>>(), [2, 0, 1]);
    }

    #[test]
    fn agent_flag_takes_a_list() {
        let a = parse(&["--agent", "http://a:9900,http://b:9900"]).unwrap();
        assert_eq!(
            agent_urls(&a.agent).unwrap(),
            ["http://a:9900", "http://b:9900"]
        );
        assert_eq!(
            agent_urls(&parse(&[]).unwrap().agent).unwrap(),
            ["http://127.0.0.1:9900"]
        );
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..100 {
            let j = jittered(Duration::from_secs(10));
            assert!(
                j >= Duration::from_secs(9) && j <= Duration::from_secs(11),
                "{j:?}"
            );
        }
    }

    #[test]
    fn loopback_interface_has_an_address() {
        assert_eq!(interface_ip("lo").unwrap(), IpAddr::from([127, 0, 0, 1]));
        assert!(interface_ip("no-such-if0")
            .unwrap_err()
            .contains("no interface"));
    }
}
