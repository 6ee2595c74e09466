//! `lbctl`, the operator's CLI: its commands and their output. The binary in `src/bin/lbctl.rs`
//! only calls [`main`].

pub mod agent_client;
pub mod phone_home;
pub mod show;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::runtime::{ClientOptions, Endpoint, RuntimeClient};
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
    /// The sidecar: keep telling the agent which node serves a frontend port.
    PhoneHome(phone_home::PhoneHomeArgs),
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
    /// The agent's URL.
    #[arg(long, env = "LBAGENT_URL", default_value = "http://127.0.0.1:9900")]
    pub agent: String,
    /// The key: the agent's keys.toml, or a file holding the secret alone.
    #[arg(long, value_name = "FILE")]
    pub key_file: PathBuf,
    /// Which key of a keys.toml (default `default`).
    #[arg(long)]
    pub key_id: Option<String>,
    /// Print the agent's JSON as it is.
    #[arg(long)]
    pub json: bool,
    /// Deadline, in seconds.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub timeout: f64,
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
    /// Redraw every SECONDS until interrupted.
    #[arg(long, value_name = "SECONDS")]
    pub watch: Option<f64>,
    /// Deadline for each socket call, in seconds.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub timeout: f64,
}

/// Runs `lbctl` with the process arguments: errors become one line on stderr and exit code 1.
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
    if let Commands::PhoneHome(args) = cli.command {
        return runtime.block_on(phone_home::run(args));
    }
    let result = runtime.block_on(async {
        match cli.command {
            Commands::Show(args) => run_show(args).await,
            Commands::State(args) => run_state(args).await,
            Commands::Sign(args) => run_sign(args),
            Commands::PhoneHome(_) => unreachable!("handled above"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn seconds(flag: &str, v: f64) -> Result<Duration, String> {
    if v.is_finite() && v > 0.0 && v < 1e9 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!(
            "{flag} must be a positive number of seconds, got {v}"
        ))
    }
}

async fn run_show(args: ShowArgs) -> Result<(), Box<dyn std::error::Error>> {
    let options = ClientOptions {
        timeout: seconds("--timeout", args.timeout)?,
        ..ClientOptions::default()
    };
    let watch = args.watch.map(|w| seconds("--watch", w)).transpose()?;
    let mut client = RuntimeClient::new(Endpoint::parse(&args.socket), options);
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
                let rows = client.show_stat().await?;
                if let Some(b) = &args.backend {
                    if !rows.iter().any(|r| &r.proxy == b) {
                        return Err(format!("no backend named {b:?} in show stat").into());
                    }
                }
                let view = Overview::from_stat(&rows, args.backend.as_deref());
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
    let key = agent_client::SigningKey::from_file(&args.key_file, args.key_id.as_deref())
        .map_err(|e| e.to_string())?;
    let timeout = seconds("--timeout", args.timeout)?;
    let (status, body) = agent_client::signed_request(
        &args.agent,
        &key,
        hyper::Method::GET,
        "/v1/frontends",
        Vec::new(),
        timeout,
    )
    .await
    .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("the agent answered {status}: {}", body.trim()).into());
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
