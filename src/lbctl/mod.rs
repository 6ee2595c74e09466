//! `lbctl`, the operator's CLI: its commands and their output. The binary in `src/bin/lbctl.rs`
//! only calls [`main`].

pub mod agent_client;
pub mod frontend;
pub mod health;
pub mod phone_home;
pub mod show;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::clock::DurationSetting;
use crate::runtime::{ClientOptions, Endpoint, RuntimeClient};
use agent_client::agent_said;
use show::{render_info, render_table, Colour, Overview};

/// Default stats socket of Debian's HAProxy package.
pub const DEFAULT_SOCKET: &str = "/run/haproxy/admin.sock";

#[derive(Parser, Debug)]
#[command(
    name = "lbctl",
    version,
    about = "Operate lbagent and the HAProxy it drives"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Subcommand, Debug)]
pub enum Commands {
    /// Show what HAProxy is doing: frontends, backends and servers (or `show info`).
    Show(ShowArgs),
    /// Print the agent's view: desired state and what HAProxy reports (signed GET /v1/frontends).
    State(StateArgs),
    /// Exit 0 when the local agent and its HAProxy are healthy (GET /healthz, no key): for
    /// monitoring and keepalived's vrrp_script. 1 unhealthy, 2 usage, 3 no answer.
    Health(health::HealthArgs),
    /// Set a frontend's whole settings, or remove it (signed PUT and DELETE /v1/frontends/PORT).
    #[command(subcommand)]
    Frontend(frontend::FrontendCommand),
    /// The sidecar: keep telling the agent which node serves a frontend port.
    PhoneHome(Box<phone_home::PhoneHomeArgs>),
    /// Print the four auth headers for a request, for curl users.
    Sign(SignArgs),
}

#[derive(clap::Args, Debug)]
pub struct SignArgs {
    /// HTTP method, e.g. PUT.
    pub method: String,
    /// Path with query, e.g. /v1/frontends/443/servers/node-a.
    pub path: String,
    /// The request body (the exact bytes that will be sent).
    #[arg(long, value_name = "FILE")]
    pub body: Option<PathBuf>,
    /// File holding the secret alone, or the agent's keys.toml.
    #[arg(long, value_name = "FILE")]
    pub key_file: PathBuf,
    /// Key id.
    #[arg(long, default_value = "default")]
    pub key_id: String,
}

#[derive(clap::Args, Debug)]
pub struct StateArgs {
    #[command(flatten)]
    pub agent: AgentArgs,
    /// Print the agent's JSON as it is.
    #[arg(long)]
    pub json: bool,
}

/// How an operator's command reaches the agent and signs for it: `lbctl state`'s and `lbctl
/// frontend`'s flags. (`lbctl phone-home` has its own: a sidecar's key may come from the
/// environment, and its deadline is per retry; so has `lbctl health`, which needs no key and
/// a short deadline.)
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The agent's URL.
    #[arg(long, env = "LBAGENT_URL", default_value = "http://127.0.0.1:9900")]
    pub agent: String,
    /// The key: the agent's keys.toml, or a file holding the secret alone.
    #[arg(long, value_name = "FILE")]
    pub key_file: PathBuf,
    /// Which key of a keys.toml (default `default`).
    #[arg(long)]
    pub key_id: Option<String>,
    /// Deadline: `10s`, `500ms`, or a bare number of seconds.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub timeout: DurationSetting,
    #[command(flatten)]
    pub tls: crate::tls::client::ClientTlsArgs,
}

/// What [`AgentArgs`] give: a client, the key and the deadline.
pub struct Connection {
    pub client: agent_client::AgentClient,
    pub key: agent_client::SigningKey,
    pub timeout: Duration,
}

impl AgentArgs {
    /// Reads the key and the TLS files and checks the URL and `--timeout`: what is wrong with
    /// one of them is a [`agent_client::AgentError::Config`] (exit 2).
    pub fn connect(&self) -> Result<Connection, agent_client::AgentError> {
        use agent_client::AgentError::Config;
        let key = agent_client::SigningKey::from_file(&self.key_file, self.key_id.as_deref())
            .map_err(|e| Config(e.to_string()))?;
        let timeout = self
            .timeout
            .within("--timeout", DURATION_RANGE)
            .map_err(Config)?;
        let client = agent_client::AgentClient::new(&self.agent, &self.tls)?;
        Ok(Connection {
            client,
            key,
            timeout,
        })
    }
}

/// A port argument, through the same check the agent applies.
fn port_flag(text: &str) -> Result<u16, String> {
    crate::runtime::validate::port("port", text).map_err(|e| e.to_string())
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShowWhat {
    /// The HAProxy process: version, pid, uptime, connections, rates.
    Info,
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// What to show: nothing for the servers table, `info` for the process.
    pub what: Option<ShowWhat>,
    /// HAProxy's stats socket: a path, or ipv4@IP:PORT for a TCP socket.
    #[arg(long, env = "LBCTL_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: String,
    /// Only this backend.
    #[arg(long)]
    pub backend: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Redraw every DURATION until interrupted: `2s`, `500ms`, or a bare number of seconds.
    #[arg(long, value_name = "DURATION")]
    pub watch: Option<DurationSetting>,
    /// Deadline for each socket call: `5s`, `500ms`, or a bare number of seconds.
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    pub timeout: DurationSetting,
}

/// Runs `lbctl` with the process arguments: errors become one line on stderr and exit code 1,
/// or 2 for a configuration error found talking to the agent (a TLS certificate that does not
/// verify, a bad URL).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lbctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Commands::PhoneHome(args) => return runtime.block_on(phone_home::run(*args)),
        Commands::Frontend(command) => return runtime.block_on(frontend::run(command)),
        Commands::Health(args) => return runtime.block_on(health::run(args)),
        _ => {}
    }
    let result = runtime.block_on(async {
        match cli.command {
            Commands::Show(args) => run_show(args).await,
            Commands::State(args) => run_state(args).await,
            Commands::Sign(args) => run_sign(args),
            Commands::PhoneHome(_) | Commands::Frontend(_) | Commands::Health(_) => {
                unreachable!("handled above")
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbctl: {e}");
            match e.downcast_ref::<agent_client::AgentError>() {
                Some(agent_client::AgentError::Config(_)) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// The range of `--timeout` and `--watch`: above zero, at most a day.
const DURATION_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(86_400);

async fn run_show(args: ShowArgs) -> Result<(), Box<dyn std::error::Error>> {
    let options = ClientOptions {
        timeout: args.timeout.within("--timeout", DURATION_RANGE)?,
        ..ClientOptions::default()
    };
    let watch = args
        .watch
        .map(|w| w.within("--watch", DURATION_RANGE))
        .transpose()?;
    let mut client = RuntimeClient::new(Endpoint::parse(&args.socket), options);
    let mut states_client = client.sibling();
    let stdout = std::io::stdout();
    let terminal = stdout.is_terminal();
    let colour = Colour::detect(terminal);
    loop {
        let text = match args.what {
            Some(ShowWhat::Info) => {
                let info = client.show_info().await?;
                if args.json {
                    let map: serde_json::Map<String, serde_json::Value> = info
                        .fields
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                        .collect();
                    serde_json::to_string_pretty(&map)? + "\n"
                } else {
                    render_info(&info)
                }
            }
            None => {
                // Check ports are only in `show servers state` (a quarter of `show stat`'s
                // bytes), asked of the one backend when one is shown, on a connection of its
                // own so HAProxy writes both answers at once.
                let backend = args
                    .backend
                    .as_deref()
                    .map(|b| crate::runtime::Name::new("--backend", b))
                    .transpose()?;
                let (rows, states) = tokio::join!(
                    client.show_stat(),
                    states_client.show_servers_state(backend.as_ref())
                );
                let rows = rows?;
                if let Some(b) = &args.backend {
                    if !rows.iter().any(|r| &r.proxy == b) {
                        return Err(format!("no backend named {b:?} in show stat").into());
                    }
                }
                let mut view = Overview::from_stat(&rows, args.backend.as_deref());
                // The check ports are extra: a `--backend` naming a frontend (which `show
                // servers state` does not know), or an older answer, leaves them out only.
                if let Ok(states) = states {
                    view.add_servers_state(&states);
                }
                if args.json {
                    serde_json::to_string_pretty(&view)? + "\n"
                } else {
                    render_table(&view, colour)
                }
            }
        };
        let mut out = stdout.lock();
        if watch.is_some() && terminal {
            // Home the cursor and clear, so the table redraws in place.
            out.write_all(b"\x1b[H\x1b[2J")?;
        }
        out.write_all(text.as_bytes())?;
        out.flush()?;
        drop(out);
        let Some(every) = watch else {
            return Ok(());
        };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

async fn run_state(args: StateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let c = args.agent.connect()?;
    let (status, body) = c
        .client
        .signed_request(
            &c.key,
            hyper::Method::GET,
            "/v1/frontends",
            Vec::new(),
            c.timeout,
        )
        .await?;
    if status != 200 {
        let (head, message) = agent_said(status, &body);
        return Err(format!("the agent answered {head}: {message}").into());
    }
    let value: serde_json::Value = serde_json::from_str(&body)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    print!("{}", show::render_state(&value));
    Ok(())
}

fn run_sign(args: SignArgs) -> Result<(), Box<dyn std::error::Error>> {
    let key = agent_client::SigningKey::from_file(&args.key_file, Some(&args.key_id))
        .map_err(|e| e.to_string())?;
    let body = match &args.body {
        Some(p) => {
            std::fs::read(p).map_err(|e| format!("cannot read --body {}: {e}", p.display()))?
        }
        None => Vec::new(),
    };
    let now = crate::clock::unix_seconds();
    let method = args.method.to_ascii_uppercase();
    for (name, value) in
        crate::auth::signed_headers(&key.id, &key.secret, &method, &args.path, &body, now)
    {
        println!("{name}: {value}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_flags_take_humantime_and_bare_seconds() {
        let show = |extra: &[&str]| {
            let base = ["lbctl", "show"];
            match Cli::try_parse_from(base.iter().chain(extra)).map(|c| c.command) {
                Ok(Commands::Show(a)) => Ok(a),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e.to_string()),
            }
        };
        let a = show(&[]).unwrap();
        assert_eq!((a.timeout.0, a.watch), (Duration::from_secs(5), None));
        let a = show(&["--timeout", "0.3", "--watch", "2"]).unwrap();
        assert_eq!(a.timeout.0, Duration::from_millis(300));
        assert_eq!(a.watch.map(|w| w.0), Some(Duration::from_secs(2)));
        let a = show(&["--timeout", "1m", "--watch", "500ms"]).unwrap();
        assert_eq!(a.timeout.0, Duration::from_secs(60));
        assert_eq!(a.watch.map(|w| w.0), Some(Duration::from_millis(500)));
        let e = show(&["--watch", "often"]).unwrap_err();
        assert!(
            e.contains("--watch") && e.contains("\"often\" is not a duration"),
            "{e}"
        );
        let zero = show(&["--timeout", "0"]).unwrap().timeout;
        let e = zero.within("--timeout", DURATION_RANGE).unwrap_err();
        assert!(e.starts_with("--timeout 0s is out of range"), "{e}");

        match Cli::try_parse_from(["lbctl", "state", "--key-file", "k"])
            .unwrap()
            .command
        {
            Commands::State(a) => assert_eq!(a.agent.timeout.0, Duration::from_secs(10)),
            other => panic!("{other:?}"),
        }
    }
}
