//! `lbagent` the daemon: flags and TOML settings, start-up in managed or attached mode, signals
//! and orderly shutdown. The binary in `src/bin/lbagent.rs` only calls [`main`].
//!
//! - **Managed** (no `--socket`): starts and supervises its own HAProxy under
//!   `<state-dir>/haproxy`, generates a key file on first start, listens on 127.0.0.1:9900.
//! - Either mode serves its API over TLS with `--tls-cert`/`--tls-key` (managed mode can
//!   make its own certificate, `--tls-self-signed`); plain HTTP otherwise.
//! - **Attached** (`--socket`): drives an existing HAProxy through its stats socket, its master
//!   CLI (or `--reload-command`), its main config and the file this agent owns.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, AgentParts};
use crate::api::{self, Api};
use crate::audit::AuditLog;
use crate::auth::{Keys, Verifier, DEFAULT_KEY_ID, DEFAULT_WINDOW};
use crate::clock::DurationSetting;
use crate::haproxy::{
    ConfigFiles, MainOptions, ManagedHaproxy, Reloader, ServerStateFile, DEFAULT_HARD_STOP_AFTER,
};
use crate::metrics::Metrics;
use crate::policy::{CidrList, Policy, PortList};
use crate::render::RenderOptions;
use crate::runtime::{ClientOptions, Endpoint, RuntimeClient};
use crate::tls::{self_signed, ServerFiles, ServerTls};

mod etcd;
use etcd::{etcd_options, open_store};

/// Every setting, from flags; each may also come from the `--config` TOML file (same names,
/// e.g. `state-dir = "/var/lib/lbagent"`). A flag given on the command line wins.
#[derive(Parser, Debug, Default, Deserialize)]
#[command(
    name = "lbagent",
    version,
    about = "Route phone-home requests into HAProxy, live through its runtime API",
    // A flag given twice takes the last value, so a wrapper's defaults can be overridden.
    args_override_self = true
)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// A TOML file with any of these settings.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address of the HTTP API [default: 127.0.0.1:9900].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Where the desired state (and in managed mode HAProxy's files) live [default: ./lbagent-data].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// TOML file of `key_id = "secret"` lines, mode 0600 [managed default: STATE_DIR/keys.toml, generated].
    #[arg(long, value_name = "FILE")]
    pub keys_file: Option<PathBuf>,
    /// HAProxy's admin stats socket; giving it selects attached mode.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<String>,
    /// HAProxy's master CLI socket (`haproxy -S`), used to reload.
    #[arg(long, value_name = "PATH")]
    pub master_socket: Option<String>,
    /// HAProxy's main configuration file (attached mode).
    #[arg(long, value_name = "FILE")]
    pub haproxy_config: Option<PathBuf>,
    /// The configuration file this agent owns, loaded by HAProxy as a second `-f` (attached mode).
    #[arg(long, value_name = "FILE")]
    pub managed_config: Option<PathBuf>,
    /// Attached mode: another file or directory HAProxy loads with `-f` (repeatable; a list in
    /// the settings file). New frontends on ports its sections bind are refused, as for the
    /// main file's; HAProxy's command line is read for them too, when HAProxy runs on this host
    /// [default: none].
    #[arg(long, value_name = "FILE|DIR")]
    #[serde(default)]
    pub haproxy_extra_config: Vec<PathBuf>,
    /// Reload with this command instead of the master socket, e.g. `systemctl reload haproxy`.
    #[arg(long, value_name = "CMD")]
    pub reload_command: Option<String>,
    /// Addresses every frontend binds, comma-separated; IPv6 with or without brackets, bound
    /// `v6only` beside IPv4 ones so both families share a port (0.0.0.0,[::]); `::` alone
    /// takes both families [default: 0.0.0.0].
    #[arg(long, value_name = "ADDRS")]
    pub frontend_bind: Option<crate::render::FrontendBinds>,
    /// Frontend ports requests may use [default: 1-65535 except 22 and the API's port].
    #[arg(long, value_name = "LIST")]
    pub allow_frontend_ports: Option<String>,
    /// Node ports requests may use [default: 30000-32767].
    #[arg(long, value_name = "LIST")]
    pub allow_node_ports: Option<String>,
    /// Node address prefixes requests may use, e.g. 10.0.0.0/8,2001:db8::/32 [default: any].
    #[arg(long, value_name = "LIST")]
    pub allow_node_cidrs: Option<String>,
    /// Most servers one frontend may hold [default: 1000].
    #[arg(long, value_name = "N")]
    pub max_servers_per_frontend: Option<usize>,
    // Durations are `DurationSetting`s: `90s`, `1m30s`, `500ms`, or a bare number of seconds,
    // from a flag or the file (a string or a number); each is resolved, with its range, below.
    /// Accepted clock difference for signed requests, whole seconds from 1s to 1d
    /// [default: 300s].
    #[arg(long, value_name = "DURATION")]
    pub auth_window: Option<DurationSetting>,
    /// How often HAProxy is looked at: a restart or reload (`show info`), lease expiry,
    /// draining servers; 100ms to 1h [default: 2s].
    #[arg(long, value_name = "DURATION")]
    pub reconcile_interval: Option<DurationSetting>,
    /// How often HAProxy's servers are compared in full with the desired state, repairing
    /// drift (restarts and reloads are noticed every reconcile interval); 100ms to 1d
    /// [default: 15s].
    #[arg(long, value_name = "DURATION")]
    pub drift_check_interval: Option<DurationSetting>,
    /// How long a registration lives without a renewing PUT (a sidecar's heartbeat), e.g.
    /// `90s`; `0` keeps registrations until deleted [default: 90s, three sidecar intervals].
    #[arg(long, value_name = "DURATION")]
    pub lease: Option<DurationSetting>,
    /// How long a deleted server keeps its open connections before they are shut
    /// [default: 60s].
    #[arg(long, value_name = "DURATION")]
    pub drain_timeout: Option<DurationSetting>,
    /// Most API connections open at once; at the cap the oldest connection that never
    /// authenticated is closed for a new one [default: 4096; 1024 with TLS on].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Most API connections from one address (an IPv6 /64) at once, under --max-connections;
    /// many sidecars may share one NAT address [default: 256].
    #[arg(long, value_name = "N")]
    pub max_connections_per_peer: Option<usize>,
    /// Bytes of request bodies over 2 KiB (and of the buffers of the connections reading them)
    /// held at once, across all connections, before their signature is checked; 81920 to
    /// 1073741824 [default: 4194304, 4 MiB].
    #[arg(long, value_name = "BYTES")]
    pub body_budget: Option<usize>,
    /// Failed authentications one address (an IPv6 /64) may have in a burst before its
    /// failures are answered 429; one more is allowed per second; 1 to 1000000 [default: 20].
    #[arg(long, value_name = "N")]
    pub auth_failure_burst: Option<u32>,
    /// Turn `/metrics` off.
    #[arg(long)]
    #[serde(default)]
    pub no_metrics: bool,
    /// Managed mode: leave HAProxy running when the agent stops.
    #[arg(long)]
    #[serde(default)]
    pub keep_haproxy: bool,
    /// HAProxy runs in other namespaces than the agent (another container): skip the checks that
    /// look at this host, the bind test of a new frontend's port and the look at HAProxy's
    /// command line (for the agent's file, and for the `-f` files whose ports it must not take).
    #[arg(long)]
    #[serde(default)]
    pub no_host_checks: bool,
    /// Enable the old webhook's `POST /hooks/update-haproxy` with the token in FILE (mode 0600).
    /// A plain token without replay protection: for migrating old sidecars only.
    #[arg(long, value_name = "FILE")]
    pub legacy_token_file: Option<PathBuf>,
    /// The haproxy binary [default: haproxy on PATH, else /usr/sbin/haproxy].
    #[arg(long, value_name = "PATH")]
    pub haproxy_bin: Option<PathBuf>,
    /// Attached mode: the file HAProxy's `server-state-file` names (absolute); the agent saves
    /// the servers' state there before each reload [default: none, nothing is saved]. Managed
    /// mode always uses STATE_DIR/haproxy/server-state.
    #[arg(long, value_name = "PATH")]
    pub server_state_file: Option<PathBuf>,
    /// Managed mode: how long an old HAProxy worker may go on serving its connections after a
    /// reload, e.g. 30m, 1h, 90s [default: 30m]. Attached mode: set `hard-stop-after` in
    /// HAProxy's global section.
    #[arg(long, value_name = "DURATION")]
    pub hard_stop_after: Option<DurationSetting>,
    /// Appends one JSON line per change request, accepted or refused, to FILE (0600; reopened
    /// on SIGHUP, for logrotate). Without it the records go to the normal log.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Serve the API over TLS with this certificate, PEM, leaf first then its chain (e.g.
    /// certbot's fullchain.pem). Re-read when its directory changes and on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert`, PEM, mode 0600.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate this CA (PEM) signed, besides signing
    /// their requests.
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Managed mode: serve TLS with a self-signed certificate made on first start in
    /// STATE_DIR/tls (reused after); its path is the `lbctl --ca-file` to give.
    #[arg(long)]
    #[serde(default)]
    pub tls_self_signed: bool,
    /// More names or addresses for the self-signed certificate, comma-separated (it always
    /// has localhost, 127.0.0.1, ::1 and a specific --listen address).
    #[arg(long, value_name = "LIST")]
    pub tls_self_signed_names: Option<String>,
    /// Keep the desired state in etcd, shared by the agents of several VMs: its client URLs,
    /// comma-separated (`https://10.0.0.1:2379,https://10.0.0.2:2379`). Without it, the local
    /// journal in --state-dir.
    #[arg(long, value_name = "URLS")]
    pub etcd: Option<String>,
    /// Every key of these agents lives under it [default: /lbagent/].
    #[arg(long, value_name = "PREFIX")]
    pub etcd_prefix: Option<String>,
    /// TLS to etcd: the CA (PEM) that signed its client certificates.
    #[arg(long, value_name = "FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// TLS to etcd: this agent's client certificate (PEM), with --etcd-key.
    #[arg(long, value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,
    /// TLS to etcd: the key of --etcd-cert (PEM), mode 0600.
    #[arg(long, value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,
    /// etcd's authentication: the user, with --etcd-password-file.
    #[arg(long, value_name = "NAME")]
    pub etcd_user: Option<String>,
    /// etcd's authentication: a file (mode 0600) holding the user's password.
    #[arg(long, value_name = "FILE")]
    pub etcd_password_file: Option<PathBuf>,
    /// This agent's name among those sharing etcd [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub agent_name: Option<String>,
    /// With --etcd: when the prefix holds no frontend, write the local journal's state (in
    /// --state-dir) into it at start: the move from one VM to several.
    #[arg(long)]
    #[serde(default)]
    pub seed_from_local: bool,
}

impl Settings {
    /// Fills what the command line left unset from the TOML file.
    fn merge(mut self, file: Settings) -> Settings {
        macro_rules! fill {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = file.$f; } )* };
        }
        fill!(
            listen,
            state_dir,
            keys_file,
            socket,
            master_socket,
            haproxy_config,
            managed_config,
            reload_command,
            frontend_bind,
            allow_frontend_ports,
            allow_node_ports,
            allow_node_cidrs,
            max_servers_per_frontend,
            max_connections,
            max_connections_per_peer,
            body_budget,
            auth_failure_burst,
            auth_window,
            reconcile_interval,
            lease,
            drain_timeout,
            drift_check_interval,
            haproxy_bin,
            server_state_file,
            hard_stop_after,
            audit_log,
            tls_cert,
            tls_key,
            tls_client_ca,
            tls_self_signed_names,
            etcd,
            etcd_prefix,
            etcd_ca_file,
            etcd_cert,
            etcd_key,
            etcd_user,
            etcd_password_file,
            agent_name
        );
        self.seed_from_local |= file.seed_from_local;
        self.tls_self_signed |= file.tls_self_signed;
        if self.haproxy_extra_config.is_empty() {
            self.haproxy_extra_config = file.haproxy_extra_config;
        }
        self.no_metrics |= file.no_metrics;
        self.keep_haproxy |= file.keep_haproxy;
        self.no_host_checks |= file.no_host_checks;
        self
    }
}

/// glibc gives threads that allocate at once arenas of their own (up to 8 per core), each
/// keeping what was freed in it: at 10,000 servers that was about 8 MiB of the agent's 34 MiB
/// (`cargo bench --bench agent`: 34.2 MiB RSS, 26.1 with one arena, changes/s unchanged). One
/// owner task does nearly all the allocating, so a second arena buys little. An operator's
/// `MALLOC_ARENA_MAX` still decides. Called before any thread starts.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: sets one allocator parameter, before the process has a second thread.
        unsafe {
            nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
        }
    }
}

/// Runs the daemon with the process arguments.
pub fn main() -> ExitCode {
    let cli = Settings::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
                // The audit trail, when it goes to the log, is not for RUST_LOG to turn off.
                .add_directive("lbagent::audit=info".parse().expect("a valid directive")),
        )
        .with_target(false)
        // Colour only for a person at a terminal: journald and log files get plain text.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    limit_malloc_arenas();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbagent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbagent: {e}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A legacy token file larger than this is not one (the old tokens are a few dozen bytes).
const MAX_LEGACY_TOKEN_FILE: u64 = 4096;

fn parse_list<T: std::str::FromStr<Err = String>>(flag: &str, v: &str) -> Result<T, BoxError> {
    v.parse::<T>().map_err(|e| format!("--{flag}: {e}").into())
}

/// Reads settings, starts everything, and runs until SIGTERM or SIGINT.
pub async fn run(cli: Settings) -> Result<(), BoxError> {
    let settings = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --config {}: {e}", path.display()))?;
            let file: Settings =
                toml::from_str(&text).map_err(|e| format!("--config {}: {e}", path.display()))?;
            cli.merge(file)
        }
        None => cli,
    };
    // Every value is checked before anything is created or started.
    let durations = Durations::resolve(&settings)?;
    let limits = resolve_limits(&settings)?;
    raise_file_limit(limits.max_connections);
    let listen = settings
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9900)));
    let state_dir = settings
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("lbagent-data"));
    std::fs::create_dir_all(&state_dir)
        .map_err(|e| format!("cannot create --state-dir {}: {e}", state_dir.display()))?;
    let bin = settings
        .haproxy_bin
        .clone()
        .unwrap_or_else(crate::haproxy::default_binary);

    let mut policy = Policy::defaults(listen.port());
    if let Some(v) = &settings.allow_frontend_ports {
        policy.frontend_ports = parse_list::<PortList>("allow-frontend-ports", v)?;
    }
    if let Some(v) = &settings.allow_node_ports {
        policy.node_ports = parse_list::<PortList>("allow-node-ports", v)?;
    }
    if let Some(v) = &settings.allow_node_cidrs {
        policy.node_cidrs = parse_list::<CidrList>("allow-node-cidrs", v)?;
    }
    if let Some(n) = settings.max_servers_per_frontend {
        policy.max_servers_per_frontend = n;
    }

    let attached = settings.socket.is_some();
    let metrics = if tls_on(&settings) {
        Metrics::with_tls()
    } else {
        Metrics::new()
    };
    let tls = server_tls(&settings, attached, listen, &state_dir, &metrics)?;
    // A flag of the other mode is refused before anything starts.
    let main_options = if attached {
        if settings.hard_stop_after.is_some() {
            return Err(
                "--hard-stop-after is for managed mode; attached, set `hard-stop-after` \
                        in the global section of HAProxy's main file"
                    .into(),
            );
        }
        if let Some(p) = settings
            .server_state_file
            .as_ref()
            .filter(|p| p.is_relative())
        {
            return Err(format!(
                "--server-state-file {}: must be an absolute path, the one HAProxy's \
                 `server-state-file` names",
                p.display()
            )
            .into());
        }
        for p in &settings.haproxy_extra_config {
            std::fs::metadata(p)
                .map_err(|e| format!("--haproxy-extra-config {}: {e}", p.display()))?;
        }
        None
    } else {
        if let Some(p) = settings.haproxy_extra_config.first() {
            return Err(format!(
                "--haproxy-extra-config {} is for attached mode; managed mode's HAProxy loads \
                 only the agent's files",
                p.display()
            )
            .into());
        }
        if let Some(p) = &settings.server_state_file {
            return Err(format!(
                "--server-state-file {} is for attached mode; managed mode keeps the servers' \
                 state in STATE_DIR/haproxy/server-state",
                p.display()
            )
            .into());
        }
        Some(MainOptions {
            hard_stop_after: durations.hard_stop_after,
        })
    };
    let keys_path = match (&settings.keys_file, attached) {
        (Some(p), _) => p.clone(),
        (None, false) => state_dir.join("keys.toml"),
        (None, true) => return Err("attached mode needs --keys-file".into()),
    };
    let keys = if !attached && !keys_path.exists() {
        let keys = Keys::generate_file(&keys_path, DEFAULT_KEY_ID)?;
        println!(
            "lbagent: generated a key, id `{DEFAULT_KEY_ID}`, in {} (mode 0600)",
            keys_path.display()
        );
        keys
    } else {
        Keys::load(&keys_path)?
    };
    let verifier = Verifier::new(keys, durations.auth_window);
    verifier.refuse_signed_before(crate::clock::unix_seconds());

    let (audit, audit_writer) = match &settings.audit_log {
        Some(path) => {
            let (log, writer) = AuditLog::open(path, metrics.clone())?;
            (log, Some(writer))
        }
        None => (AuditLog::to_log(), None),
    };
    let legacy_token = match &settings.legacy_token_file {
        Some(path) => Some(read_legacy_token(path)?),
        None => None,
    };

    let etcd = etcd_options(&settings, listen, &state_dir)?;
    let (store, state) = open_store(&state_dir, etcd, settings.seed_from_local, &metrics).await?;
    tracing::info!(
        store = ?store.kind(),
        generation = state.generation,
        frontends = state.frontends.len(),
        servers = state.server_count(),
        "desired state loaded"
    );

    let mut managed = None;
    let (socket, files, reloader, haproxy_log, server_state) = if attached {
        let socket = Endpoint::parse(settings.socket.as_deref().unwrap_or_default());
        let main = settings
            .haproxy_config
            .clone()
            .ok_or("attached mode needs --haproxy-config (HAProxy's main file)")?;
        let managed_file = settings.managed_config.clone().ok_or(
            "attached mode needs --managed-config (the file HAProxy loads as a second -f)",
        )?;
        let reloader = match (&settings.reload_command, &settings.master_socket) {
            (Some(cmd), _) => Reloader::Command(cmd.clone()),
            (None, Some(m)) => Reloader::Master(Endpoint::parse(m)),
            (None, None) => {
                return Err(
                    "attached mode needs --master-socket or --reload-command to add frontends"
                        .into(),
                )
            }
        };
        let files = ConfigFiles {
            haproxy_bin: bin.clone(),
            main,
            managed: managed_file,
        };
        let server_state = settings
            .server_state_file
            .clone()
            .map(|p| ServerStateFile::new(p, socket.clone()));
        if let Some(f) = &server_state {
            check_server_state_path(f.path(), &files)?;
            // What it holds is from before this start (a reload command's, or an agent stopped
            // mid-reload); and a file that is there keeps HAProxy 2.6 from warning at starts.
            f.clear().await;
        }
        (socket, files, reloader, None, server_state)
    } else {
        let main = main_options.unwrap_or_default();
        let m = ManagedHaproxy::start_with(&state_dir.join("haproxy"), &bin, &main).await?;
        let parts = (
            Endpoint::Unix(m.admin_socket()),
            m.config_files(),
            m.reloader(),
            Some(m.log_path()),
            Some(m.server_state_file()),
        );
        println!(
            "lbagent: managed HAProxy (pid {}) in {}; stats socket {}",
            m.pid(),
            m.dir().display(),
            m.admin_socket().display()
        );
        managed = Some(m);
        parts
    };

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let shutdown = CancellationToken::new();
    let port_owners = port_owners(
        listener.local_addr().unwrap_or(listen),
        &settings,
        &socket,
        &reloader,
    );
    let parts = AgentParts {
        state,
        store,
        store_dir: state_dir.clone(),
        client: RuntimeClient::new(socket, ClientOptions::default()),
        files,
        reloader,
        policy,
        render: RenderOptions {
            frontend_binds: settings
                .frontend_bind
                .clone()
                .map_or_else(|| RenderOptions::default().frontend_binds, |b| b.0),
        },
        managed,
        reconcile_every: durations.reconcile_interval,
        drift_check_every: durations.drift_check_interval,
        reload_deadline: Duration::from_secs(15),
        haproxy_log,
        keep_haproxy: settings.keep_haproxy,
        host_checks: !settings.no_host_checks,
        lease: durations.lease,
        drain_timeout: durations.drain_timeout,
        server_state,
        port_owners,
    };
    // The owner stops only after the HTTP server has finished its in-flight requests.
    let agent_stop = CancellationToken::new();
    let (handle, agent_task) = agent::spawn(parts, metrics.clone(), agent_stop.clone());
    let api = Arc::new(Api {
        agent: handle,
        verifier,
        metrics: metrics.clone(),
        metrics_enabled: !settings.no_metrics,
        legacy_token,
        audit,
        tls: tls.clone(),
        limits: api::limits::Limits::new(limits, &metrics),
    });
    let _tls_watch = match &tls {
        Some(tls) => Some(crate::tls::watch::spawn(tls.clone(), shutdown.clone())?),
        None => None,
    };
    println!(
        "lbagent: listening on {}://{} (keys: {})",
        if tls.is_some() { "https" } else { "http" },
        listener.local_addr().unwrap_or(listen),
        keys_path.display()
    );
    let server = tokio::spawn(api::serve(
        listener,
        api.clone(),
        shutdown.clone(),
        Duration::from_secs(10),
    ));

    wait_for_signals(&api, &keys_path).await;
    tracing::info!("stopping: finishing in-flight requests");
    shutdown.cancel();
    let _ = server.await;
    agent_stop.cancel();
    let _ = agent_task.await;
    // Every record of a served request is written before the process ends.
    drop(api);
    if let Some(writer) = audit_writer {
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    }
    Ok(())
}

/// What new frontends must not share besides HAProxy's main file: the API's port, the extra
/// configs, and HAProxy's sockets the agent was given when they are TCP.
fn port_owners(
    api: SocketAddr,
    settings: &Settings,
    socket: &Endpoint,
    reloader: &Reloader,
) -> agent::PortOwners {
    let mut sockets = Vec::new();
    if let Endpoint::Tcp(a) = socket {
        sockets.push(("HAProxy's stats socket (--socket)".to_string(), *a));
    }
    if let Reloader::Master(Endpoint::Tcp(a)) = reloader {
        sockets.push(("HAProxy's master CLI (--master-socket)".to_string(), *a));
    }
    agent::PortOwners {
        api: Some(api),
        extra_configs: settings.haproxy_extra_config.clone(),
        sockets,
    }
}

/// The duration settings, resolved: each the flag's (or the file's) value or its default,
/// checked against its range.
#[derive(Debug, PartialEq, Eq)]
struct Durations {
    auth_window: Duration,
    reconcile_interval: Duration,
    drift_check_interval: Duration,
    lease: Duration,
    drain_timeout: Duration,
    hard_stop_after: Duration,
}

impl Durations {
    fn resolve(s: &Settings) -> Result<Durations, String> {
        let secs = Duration::from_secs;
        let or =
            |v: Option<DurationSetting>, default: Duration| v.unwrap_or(DurationSetting(default));
        let auth_window = or(s.auth_window, DEFAULT_WINDOW);
        let resolved = Durations {
            auth_window: auth_window.within("--auth-window", secs(1)..=secs(86_400))?,
            reconcile_interval: or(s.reconcile_interval, secs(2)).within(
                "--reconcile-interval",
                Duration::from_millis(100)..=secs(3600),
            )?,
            drift_check_interval: or(s.drift_check_interval, secs(15)).within(
                "--drift-check-interval",
                Duration::from_millis(100)..=secs(86_400),
            )?,
            // 0 turns leases off. Bounded so the lease clocks' arithmetic cannot overflow;
            // keep it at two or more sidecar intervals (docs/operations.md).
            lease: match or(s.lease, secs(90)) {
                DurationSetting(d) if d.is_zero() => d,
                l => l.within("--lease", secs(1)..=secs(30 * 86_400))?,
            },
            drain_timeout: or(s.drain_timeout, secs(60))
                .within("--drain-timeout", Duration::ZERO..=secs(86_400))?,
            // HAProxy's timers hold no more than 24 days.
            hard_stop_after: or(s.hard_stop_after, DEFAULT_HARD_STOP_AFTER)
                .within("--hard-stop-after", secs(1)..=secs(24 * 24 * 3600))?,
        };
        if resolved.auth_window.subsec_nanos() != 0 {
            return Err(format!(
                "--auth-window {auth_window} must be whole seconds: request timestamps are"
            ));
        }
        Ok(resolved)
    }
}

/// Raises the soft limit on open files to the hard one: the default soft limit (often 1024)
/// is below `--max-connections`, and accepting would fail with EMFILE long before the cap.
fn raise_file_limit(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
        }
    }
    // Room for HAProxy's sockets, the store and config files beside the connections.
    let needed = max_connections as u64 + 256;
    let now = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s);
    if now < needed {
        tracing::warn!(
            limit = now,
            "the open-file limit is below --max-connections + 256 ({needed}); raise it \
             (LimitNOFILE= in the systemd unit) or lower --max-connections"
        );
    }
}

/// The connection and body limits: each the flag's (or the file's) value or its default,
/// checked against its range.
fn resolve_limits(s: &Settings) -> Result<api::limits::LimitSettings, String> {
    use api::limits::{
        LimitSettings, DEFAULT_BODY_BUDGET, DEFAULT_FAILURE_BURST, DEFAULT_MAX_CONNECTIONS,
        DEFAULT_MAX_CONNECTIONS_PER_PEER, DEFAULT_MAX_CONNECTIONS_TLS,
    };
    let within = |flag: &str, v: usize, range: std::ops::RangeInclusive<usize>| {
        if range.contains(&v) {
            Ok(v)
        } else {
            Err(format!(
                "--{flag} {v}: must be from {} to {}",
                range.start(),
                range.end()
            ))
        }
    };
    let max_connections = within(
        "max-connections",
        s.max_connections.unwrap_or(if tls_on(s) {
            DEFAULT_MAX_CONNECTIONS_TLS
        } else {
            DEFAULT_MAX_CONNECTIONS
        }),
        1..=1 << 20,
    )?;
    Ok(LimitSettings {
        max_connections,
        max_connections_per_peer: within(
            "max-connections-per-peer",
            s.max_connections_per_peer
                .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_PEER.min(max_connections)),
            1..=max_connections,
        )?,
        // At least one body of the largest size fits.
        body_budget: within(
            "body-budget",
            s.body_budget.unwrap_or(DEFAULT_BODY_BUDGET),
            api::MAX_BODY + api::limits::CONNECTION_BUFFERS..=1 << 30,
        )?,
        auth_failure_burst: within(
            "auth-failure-burst",
            s.auth_failure_burst.unwrap_or(DEFAULT_FAILURE_BURST) as usize,
            1..=1_000_000,
        )? as u32,
    })
}

/// Reads the legacy token, refusing a file others can read (like the keys file).
fn read_legacy_token(path: &Path) -> Result<Vec<u8>, BoxError> {
    let text = crate::secret_file::read(path, MAX_LEGACY_TOKEN_FILE)
        .map_err(|e| format!("--legacy-token-file {e}"))?;
    let token = text.trim();
    if token.len() < 8 {
        return Err(format!(
            "--legacy-token-file {}: the token is shorter than 8 characters",
            path.display()
        )
        .into());
    }
    tracing::warn!(
        "the legacy endpoint POST /hooks/update-haproxy is on: plain token, no replay protection"
    );
    Ok(token.as_bytes().to_vec())
}

/// Whether the API serves TLS.
fn tls_on(s: &Settings) -> bool {
    s.tls_cert.is_some() || s.tls_self_signed
}

/// The API's TLS, from `--tls-cert`/`--tls-key` or managed mode's `--tls-self-signed`; `None`
/// serves plain HTTP. Every TLS file is read and checked here, before anything starts.
fn server_tls(
    s: &Settings,
    attached: bool,
    listen: SocketAddr,
    state_dir: &Path,
    metrics: &Metrics,
) -> Result<Option<Arc<ServerTls>>, BoxError> {
    // Checked here, not by clap: a pair may be split between the command line and the file.
    let files =
        match (&s.tls_cert, &s.tls_key, s.tls_self_signed) {
            (Some(_), _, true) | (_, Some(_), true) => {
                return Err("--tls-self-signed and --tls-cert/--tls-key are either-or".into())
            }
            (Some(cert), Some(key), false) => ServerFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: None,
            },
            (Some(_), None, _) | (None, Some(_), _) => {
                return Err("--tls-cert and --tls-key go together".into())
            }
            (None, None, true) if attached => return Err(
                "--tls-self-signed is for managed mode; attached, give --tls-cert and --tls-key"
                    .into(),
            ),
            (None, None, true) => {
                let extra: Vec<String> = s
                    .tls_self_signed_names
                    .as_deref()
                    .unwrap_or_default()
                    .split(',')
                    .map(String::from)
                    .collect();
                let names = self_signed::wanted_names(listen, &extra);
                let dir = state_dir.join("tls");
                let made = self_signed::ensure(&dir, &names)?;
                let files = made.files;
                let cert = crate::tls::read_certs(&files.cert, "--tls-self-signed")?;
                println!(
                    "lbagent: {} self-signed TLS certificate {} (SHA-256 {}) for {}; \
                 give lbctl --ca-file {}",
                    if made.made { "made a" } else { "reusing the" },
                    files.cert.display(),
                    crate::tls::fingerprint(&cert[0]),
                    names.iter().cloned().collect::<Vec<_>>().join(", "),
                    files.cert.display()
                );
                files
            }
            (None, None, false) => {
                if s.tls_client_ca.is_some() {
                    return Err("--tls-client-ca needs TLS: give --tls-cert and --tls-key".into());
                }
                if s.tls_self_signed_names.is_some() {
                    return Err("--tls-self-signed-names needs --tls-self-signed".into());
                }
                return Ok(None);
            }
        };
    let files = ServerFiles {
        client_ca: s.tls_client_ca.clone(),
        ..files
    };
    Ok(Some(Arc::new(ServerTls::load(files, metrics.tls.clone())?)))
}

/// Waits for SIGTERM or SIGINT; SIGHUP re-reads the key file and the TLS files, and reopens the
/// audit log.
async fn wait_for_signals(api: &Api, keys_path: &Path) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stopping");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                match api.verifier.reload(keys_path) {
                    Ok(ids) => tracing::info!(keys = ?ids, "key file re-read"),
                    Err(e) => tracing::error!(error = %e, "key file not re-read; keeping the current keys"),
                }
                api.audit.reopen();
                if let Some(tls) = &api.tls {
                    tls.reload("SIGHUP");
                }
            }
        }
    }
}

/// Refuses a `--server-state-file` that would overwrite something else: one of HAProxy's
/// config files, or a file that is not a servers' state (its first line is the format, `1`).
fn check_server_state_path(path: &Path, files: &ConfigFiles) -> Result<(), String> {
    let same = |other: &Path| {
        path == other
            || std::fs::canonicalize(path)
                .ok()
                .is_some_and(|p| std::fs::canonicalize(other).ok() == Some(p))
    };
    if same(&files.main) || same(&files.managed) {
        return Err(format!(
            "--server-state-file {} is one of HAProxy's config files; give the path of HAProxy's \
             `server-state-file` line",
            path.display()
        ));
    }
    match std::fs::read_to_string(path) {
        Ok(text) => match text.lines().map(str::trim).find(|l| !l.is_empty()) {
            None | Some("1") => Ok(()),
            Some(first) => Err(format!(
                "--server-state-file {}: the file is there and is no servers' state (its first \
                 line is {first:?}, not the format version `1`); the agent would overwrite it",
                path.display()
            )),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("--server-state-file {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_server_state_path_that_would_overwrite_something_else_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = ConfigFiles {
            haproxy_bin: "haproxy".into(),
            main: dir.path().join("haproxy.cfg"),
            managed: dir.path().join("lbagent.cfg"),
        };
        std::fs::write(&files.main, "global\n").unwrap();
        let e = check_server_state_path(&files.main, &files).unwrap_err();
        assert!(e.contains("one of HAProxy's config files"), "{e}");
        let other = dir.path().join("notes.txt");
        std::fs::write(&other, "global\n").unwrap();
        let e = check_server_state_path(&other, &files).unwrap_err();
        assert!(e.contains("is no servers' state"), "{e}");
        let state = dir.path().join("server-state");
        assert!(
            check_server_state_path(&state, &files).is_ok(),
            "missing is fine"
        );
        std::fs::write(&state, "1\n# be_id be_name\n").unwrap();
        assert!(check_server_state_path(&state, &files).is_ok());
    }

    fn token_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let path = dir.join("legacy-token");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn resolve(args: &[&str]) -> Result<Durations, String> {
        let cli = Settings::try_parse_from(std::iter::once("lbagent").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Durations::resolve(&cli)
    }

    #[test]
    fn duration_flags_take_humantime_and_bare_seconds() {
        let d = resolve(&[
            "--auth-window",
            "90s",
            "--reconcile-interval",
            "500ms",
            "--drift-check-interval",
            "1m30s",
            "--lease",
            "2m",
            "--drain-timeout",
            "10s",
            "--hard-stop-after",
            "1h",
        ])
        .unwrap();
        let secs = Duration::from_secs;
        assert_eq!(
            d,
            Durations {
                auth_window: secs(90),
                reconcile_interval: Duration::from_millis(500),
                drift_check_interval: secs(90),
                lease: secs(120),
                drain_timeout: secs(10),
                hard_stop_after: secs(3600),
            }
        );
        // Bare numbers are seconds, as the flags were before they took units; 0 is no lease.
        let d = resolve(&[
            "--auth-window",
            "300",
            "--reconcile-interval",
            "0.5",
            "--lease",
            "0",
        ])
        .unwrap();
        assert_eq!(d.auth_window, secs(300));
        assert_eq!(d.reconcile_interval, Duration::from_millis(500));
        assert_eq!(d.lease, Duration::ZERO);
        // Defaults, and the help text says them.
        assert_eq!(
            resolve(&[]).unwrap(),
            Durations {
                auth_window: secs(300),
                reconcile_interval: secs(2),
                drift_check_interval: secs(15),
                lease: secs(90),
                drain_timeout: secs(60),
                hard_stop_after: secs(30 * 60),
            }
        );
        let help = <Settings as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for default in ["300s", "2s", "15s", "90s", "60s"] {
            assert!(
                help.contains(&format!("[default: {default}")),
                "{default}: {help}"
            );
        }
        assert_eq!("300s".parse::<DurationSetting>().unwrap().0, DEFAULT_WINDOW);

        // Bad text: clap names the flag and quotes the text.
        for flag in [
            "--auth-window",
            "--reconcile-interval",
            "--drift-check-interval",
            "--lease",
            "--drain-timeout",
            "--hard-stop-after",
        ] {
            let e = resolve(&[flag, "5x"]).unwrap_err();
            assert!(
                e.contains(flag) && e.contains("\"5x\" is not a duration"),
                "{e}"
            );
        }
        // Out of range, or not whole seconds: the setting is named.
        let e = resolve(&["--reconcile-interval", "10ms"]).unwrap_err();
        assert!(
            e.starts_with("--reconcile-interval 10ms is out of range"),
            "{e}"
        );
        let e = resolve(&["--drift-check-interval", "0"]).unwrap_err();
        assert!(
            e.starts_with("--drift-check-interval 0s is out of range"),
            "{e}"
        );
        let e = resolve(&["--auth-window", "0"]).unwrap_err();
        assert!(e.starts_with("--auth-window 0s is out of range"), "{e}");
        let e = resolve(&["--hard-stop-after", "25d"]).unwrap_err();
        assert!(
            e.starts_with("--hard-stop-after 25days is out of range"),
            "{e}"
        );
        let e = resolve(&["--auth-window", "1.5s"]).unwrap_err();
        assert!(e.contains("whole seconds"), "{e}");
    }

    #[test]
    fn settings_file_durations_as_strings_or_seconds() {
        let file: Settings = toml::from_str(
            "auth-window = \"2m\"\nreconcile-interval = 2.5\nlease = \"0\"\ndrain-timeout = 5\n",
        )
        .unwrap();
        let d = Durations::resolve(&file).unwrap();
        assert_eq!(d.auth_window, Duration::from_secs(120));
        assert_eq!(d.reconcile_interval, Duration::from_millis(2500));
        assert_eq!(d.lease, Duration::ZERO);
        assert_eq!(d.drain_timeout, Duration::from_secs(5));
        let e = toml::from_str::<Settings>("reconcile-interval = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("reconcile-interval") && e.contains("\"soon\" is not a duration"),
            "{e}"
        );
        // The command line wins over the file.
        let cli = Settings::try_parse_from(["lbagent", "--auth-window", "1m"]).unwrap();
        let merged = cli.merge(toml::from_str("auth-window = 300").unwrap());
        assert_eq!(
            Durations::resolve(&merged).unwrap().auth_window,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn tls_settings_come_from_the_file_too_and_go_in_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "127.0.0.1:9900".parse().unwrap();
        let tls_of = |cli: &[&str], file: &str| {
            let cli =
                Settings::try_parse_from(std::iter::once("lbagent").chain(cli.iter().copied()))
                    .unwrap();
            let s = cli.merge(toml::from_str(file).unwrap());
            server_tls(&s, false, listen, dir.path(), &Metrics::with_tls())
                .map_err(|e| e.to_string())
        };
        assert!(tls_of(&[], "").unwrap().is_none(), "plain HTTP by default");
        let e = tls_of(&["--tls-cert", "c.pem"], "").unwrap_err();
        assert!(e.contains("--tls-cert and --tls-key go together"), "{e}");
        // The pair split between the command line and the file is read as one.
        let e = tls_of(&["--tls-cert", "/nonexistent/c.pem"], "tls-key = \"k.pem\"").unwrap_err();
        assert!(e.starts_with("--tls-cert /nonexistent/c.pem:"), "{e}");
        let e = tls_of(&["--tls-self-signed"], "tls-cert = \"c.pem\"").unwrap_err();
        assert!(e.contains("either-or"), "{e}");
        let e = tls_of(&[], "tls-client-ca = \"ca.pem\"").unwrap_err();
        assert!(e.contains("--tls-client-ca needs TLS"), "{e}");
        let e = tls_of(&["--tls-self-signed-names", "a.example"], "").unwrap_err();
        assert!(e.contains("needs --tls-self-signed"), "{e}");
        // From the file alone: a certificate is made and served.
        let tls = tls_of(
            &[],
            "tls-self-signed = true\ntls-self-signed-names = \"lb.example.com\"\n",
        )
        .unwrap()
        .expect("TLS on");
        assert_eq!(tls.files().cert, dir.path().join("tls/cert.pem"));
        let e = server_tls(
            &Settings {
                tls_self_signed: true,
                ..Settings::default()
            },
            true,
            listen,
            dir.path(),
            &Metrics::with_tls(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("for managed mode"), "{e}");
    }

    #[test]
    fn extra_configs_repeat_and_come_from_the_file() {
        let cli = Settings::try_parse_from([
            "lbagent",
            "--haproxy-extra-config",
            "/etc/haproxy/conf.d",
            "--haproxy-extra-config",
            "/etc/haproxy/more.cfg",
        ])
        .unwrap();
        let want = [
            PathBuf::from("/etc/haproxy/conf.d"),
            PathBuf::from("/etc/haproxy/more.cfg"),
        ];
        assert_eq!(cli.haproxy_extra_config, want);
        let file: Settings =
            toml::from_str("haproxy-extra-config = [\"/etc/haproxy/conf.d\"]\n").unwrap();
        let merged = Settings::try_parse_from(["lbagent"]).unwrap().merge(file);
        assert_eq!(merged.haproxy_extra_config, want[..1]);
        // The command line wins over the file.
        let file: Settings = toml::from_str("haproxy-extra-config = [\"/x.cfg\"]\n").unwrap();
        assert_eq!(cli.merge(file).haproxy_extra_config, want);
    }

    #[test]
    fn limit_flags_have_defaults_ranges_and_the_file() {
        let limits = |args: &[&str]| {
            let cli =
                Settings::try_parse_from(std::iter::once("lbagent").chain(args.iter().copied()))
                    .unwrap();
            resolve_limits(&cli)
        };
        assert_eq!(limits(&[]).unwrap(), api::limits::LimitSettings::default());
        // With TLS on, fewer by default: each connection may hold more.
        let tls = limits(&["--tls-self-signed"]).unwrap();
        assert_eq!(
            tls.max_connections,
            api::limits::DEFAULT_MAX_CONNECTIONS_TLS
        );
        let tls = limits(&["--tls-self-signed", "--max-connections", "3000"]).unwrap();
        assert_eq!(tls.max_connections, 3000, "a given value wins");
        let l = limits(&["--max-connections", "100", "--body-budget", "100000"]).unwrap();
        assert_eq!(
            (l.max_connections, l.max_connections_per_peer, l.body_budget),
            (100, 100, 100_000),
            "the per-peer default never exceeds the total"
        );
        for (args, needle) in [
            (&["--max-connections", "0"][..], "--max-connections 0"),
            (
                &[
                    "--max-connections",
                    "10",
                    "--max-connections-per-peer",
                    "11",
                ],
                "--max-connections-per-peer 11: must be from 1 to 10",
            ),
            (&["--body-budget", "65536"], "--body-budget 65536"),
            (&["--auth-failure-burst", "0"], "--auth-failure-burst 0"),
        ] {
            let e = limits(args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
        let file: Settings =
            toml::from_str("max-connections-per-peer = 512\nauth-failure-burst = 5\n").unwrap();
        let merged = Settings::try_parse_from(["lbagent"]).unwrap().merge(file);
        let l = resolve_limits(&merged).unwrap();
        assert_eq!((l.max_connections_per_peer, l.auth_failure_burst), (512, 5));
    }

    #[test]
    fn legacy_token_file_is_a_secret_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = token_file(dir.path(), "old-shared-token\n", 0o600);
        assert_eq!(read_legacy_token(&p).unwrap(), b"old-shared-token");

        let p = token_file(dir.path(), "old-shared-token\n", 0o644);
        let e = read_legacy_token(&p).unwrap_err().to_string();
        let shown = p.display();
        assert!(
            e.starts_with(&format!("--legacy-token-file {shown} has mode 0644")),
            "{e}"
        );
        assert!(e.contains(&format!("chmod 600 {shown}")), "{e}");
        assert!(!e.contains("old-shared-token"), "{e}");

        let p = token_file(dir.path(), "short\n", 0o600);
        let e = read_legacy_token(&p).unwrap_err().to_string();
        assert!(e.contains("shorter than 8"), "{e}");
    }
}
