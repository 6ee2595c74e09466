//! The runtime API client: one persistent interactive connection, reopened when it breaks, a
//! deadline on every call, typed commands in and typed answers out, and batches of commands
//! pipelined in as few round trips as HAProxy's request buffer allows.

use std::time::{Duration, Instant};

use super::command::{AddServerOptions, Command, ServerAdminState};
use super::connection::{Connection, Endpoint};
use super::error::{Error, Result};
use super::outcome::Outcome;
use super::parse::{
    parse_servers_state, parse_show_backend, parse_show_info, parse_show_proc, parse_show_stat,
    Info, ParseError, ProcList, ServerState, StatRow,
};
use super::validate::{Name, ServerRef};

/// How the client talks to HAProxy.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Deadline for each call: connecting, sending and reading every answer.
    pub timeout: Duration,
    /// Most bytes of commands written in one round trip. A batch is sent as one command per
    /// line, all lines in one write, and cut into round trips of at most this size so HAProxy's
    /// request buffer (`tune.bufsize`, 16 KiB by default) always has room for what is in flight.
    pub max_batch_bytes: usize,
    /// Largest answer accepted (`show stat` of 10,000 servers is about 6 MiB).
    pub max_answer: usize,
    /// Reconnect before sending when the connection sat idle this long, so HAProxy's
    /// `stats timeout` (10 s by default) never closes it under a command.
    pub idle_reconnect: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(5),
            max_batch_bytes: 8 * 1024,
            max_answer: 256 * 1024 * 1024,
            idle_reconnect: Duration::from_secs(5),
        }
    }
}

/// A client for one HAProxy runtime socket (a worker's stats socket or the master CLI).
#[derive(Debug)]
pub struct RuntimeClient {
    endpoint: Endpoint,
    options: ClientOptions,
    conn: Option<Connection>,
    last_used: Instant,
}

/// One command's answer in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The command as sent.
    pub command: String,
    pub outcome: Outcome,
}

impl Reply {
    /// `Ok` with the outcome on success, [`Error::Command`] otherwise.
    pub fn into_result(self) -> Result<Outcome> {
        if self.outcome.is_success() {
            Ok(self.outcome)
        } else {
            Err(Error::Command {
                command: self.command,
                outcome: self.outcome,
            })
        }
    }

    /// The answer's data, parsed; an error answer is [`Error::Command`], one that does not
    /// parse [`Error::Parse`] naming the command.
    pub fn parsed<T>(
        self,
        parse: impl FnOnce(&str) -> std::result::Result<T, ParseError>,
    ) -> Result<T> {
        let command = self.command.clone();
        let outcome = self.into_result()?;
        parse(&outcome.text).map_err(|e| Error::parse(&command, e.to_string(), &outcome.text))
    }
}

fn conn_name(conn: &Connection) -> String {
    conn.endpoint().to_string()
}

impl RuntimeClient {
    /// A client for `endpoint`; nothing is opened until the first call (or [`Self::connect`]).
    pub fn new(endpoint: Endpoint, options: ClientOptions) -> RuntimeClient {
        RuntimeClient {
            endpoint,
            options,
            conn: None,
            last_used: Instant::now(),
        }
    }

    /// Another client of the same endpoint with the same options, not connected: for a task
    /// that must not wait for this one's calls.
    pub fn sibling(&self) -> RuntimeClient {
        RuntimeClient::new(self.endpoint.clone(), self.options.clone())
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Closes the connection; the next call opens a new one. Needed after a reload: an open
    /// CLI connection stays with the old worker (and keeps it alive), which no longer serves
    /// the new configuration.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// Opens the connection now, so a wrong path or a peer that is not HAProxy is reported
    /// before any command.
    pub async fn connect(&mut self) -> Result<()> {
        self.ensure_connected().await.map(|_| ())
    }

    fn timeout_error(&self, what: &str) -> Error {
        Error::Timeout {
            endpoint: self.endpoint.to_string(),
            what: what.to_string(),
            after: self.options.timeout,
        }
    }

    async fn ensure_connected(&mut self) -> Result<&mut Connection> {
        if self.conn.is_some() && self.last_used.elapsed() >= self.options.idle_reconnect {
            self.conn = None;
        }
        if self.conn.is_none() {
            let open = Connection::open(&self.endpoint, self.options.max_answer);
            let conn = match tokio::time::timeout(self.options.timeout, open).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(Error::NotHaproxy {
                        endpoint: self.endpoint.to_string(),
                        detail: format!("no answer to `prompt` within {:?}", self.options.timeout),
                    })
                }
            };
            self.conn = Some(conn);
        }
        self.last_used = Instant::now();
        Ok(self.conn.as_mut().expect("connection set just above"))
    }

    /// Sends request lines in one write and reads one answer per line.
    async fn round_trip(&mut self, lines: &[String], what: &str) -> Result<Vec<String>> {
        let reused = self.conn.is_some() && self.last_used.elapsed() < self.options.idle_reconnect;
        let mut answers = self.attempt(lines, what).await?;
        // Closed with nothing answered: on a connection that had been in use, HAProxy closed it
        // (`stats timeout`, a reload) before reading the line, so the line never ran and is
        // safe to send once more on a fresh connection. At worst a retried `add server`
        // reports AlreadyExists.
        if answers.is_none() && reused {
            answers = self.attempt(lines, what).await?;
        }
        answers.ok_or_else(|| Error::Closed {
            endpoint: self.endpoint.to_string(),
            what: what.to_string(),
            received: String::new(),
        })
    }

    /// One try of [`Self::round_trip`] within the deadline; `Ok(None)` when HAProxy closed the
    /// connection before answering. The connection is dropped on any failure: after a timeout
    /// or a broken read its position in the stream is unknown.
    async fn attempt(&mut self, lines: &[String], what: &str) -> Result<Option<Vec<String>>> {
        let deadline = self.options.timeout;
        let exchange = async {
            let conn = self.ensure_connected().await?;
            conn.send_lines(lines, what).await?;
            let mut answers = Vec::with_capacity(lines.len());
            for _ in 0..lines.len() {
                match conn.read_answer(what).await? {
                    Some(a) => answers.push(a),
                    // Nothing answered: nothing ran, the caller may send it all again.
                    None if answers.is_empty() => return Ok(None),
                    // Some commands ran: sending the lot again would run them twice.
                    None => {
                        return Err(Error::Closed {
                            endpoint: conn_name(conn),
                            what: format!(
                                "{what} after {} of {} answers",
                                answers.len(),
                                lines.len()
                            ),
                            received: String::new(),
                        })
                    }
                }
            }
            Ok::<_, Error>(Some(answers))
        };
        let result = match tokio::time::timeout(deadline, exchange).await {
            Ok(r) => r,
            Err(_) => Err(self.timeout_error(what)),
        };
        match result {
            Ok(Some(answers)) => {
                self.last_used = Instant::now();
                Ok(Some(answers))
            }
            other => {
                self.conn = None;
                other
            }
        }
    }

    /// Runs one command and classifies its answer; HAProxy refusing it is an `Ok` reply with a
    /// failed outcome, not an `Err`.
    pub async fn execute(&mut self, command: &Command) -> Result<Reply> {
        let mut replies = self.batch(std::slice::from_ref(command)).await?;
        Ok(replies.remove(0))
    }

    /// Runs commands in order and returns one reply per command; a failed command does not
    /// stop the ones after it.
    ///
    /// The commands go one per line, as many lines per write as `max_batch_bytes` allows, and
    /// the answers are read after each write: one round trip per chunk. Lines rather than
    /// `;`-joined commands, because each line gets its own prompt in every HAProxy version,
    /// which is what frames one command's answer from the next; from 3.2 on HAProxy prints a
    /// single prompt for a whole `;`-joined line (see `raw/batch-1.bin` in
    /// `proto-fixtures/3.2.26-1/` against `proto-fixtures/3.0.11-1+deb13u4/`).
    pub async fn batch(&mut self, commands: &[Command]) -> Result<Vec<Reply>> {
        let mut replies = Vec::with_capacity(commands.len());
        let texts: Vec<String> = commands.iter().map(|c| c.to_string()).collect();
        let mut start = 0;
        while start < texts.len() {
            let mut end = start;
            let mut len = 0;
            while end < texts.len() {
                let add = texts[end].len() + 1;
                if end > start && len + add > self.options.max_batch_bytes {
                    break;
                }
                len += add;
                end += 1;
            }
            if len > self.options.max_batch_bytes {
                return Err(Error::InvalidArgument {
                    field: "command",
                    value: super::error::excerpt(&texts[start], 80),
                    reason: "is longer than the runtime API's request buffer",
                });
            }
            let what = if end - start == 1 {
                format!("`{}`", texts[start])
            } else {
                format!("a batch of {} commands", end - start)
            };
            let answers = self.round_trip(&texts[start..end], &what).await?;
            for ((cmd, text), answer) in commands[start..end]
                .iter()
                .zip(&texts[start..end])
                .zip(answers)
            {
                let outcome = match cmd.answer_header() {
                    Some(header) => Outcome::of_query(header, &answer),
                    None => Outcome::of_action(&answer),
                };
                replies.push(Reply {
                    command: text.clone(),
                    outcome,
                });
            }
            start = end;
        }
        Ok(replies)
    }

    /// Runs a command whose answer is data, failing on an error answer, then parses it.
    async fn query<T>(
        &mut self,
        command: Command,
        parse: impl FnOnce(&str) -> std::result::Result<T, ParseError>,
    ) -> Result<T> {
        self.execute(&command).await?.parsed(parse)
    }

    /// Runs an action command; a refusal is [`Error::Command`] with HAProxy's words.
    async fn act(&mut self, command: Command) -> Result<Outcome> {
        self.execute(&command).await?.into_result()
    }

    pub async fn show_info(&mut self) -> Result<Info> {
        self.query(Command::ShowInfo, parse_show_info).await
    }

    pub async fn show_stat(&mut self) -> Result<Vec<StatRow>> {
        self.query(Command::ShowStat, parse_show_stat).await
    }

    /// `show stat` of the frontends only: a line each, whatever the number of servers.
    pub async fn show_stat_frontends(&mut self) -> Result<Vec<StatRow>> {
        self.query(Command::ShowStatFrontends, parse_show_stat)
            .await
    }

    pub async fn show_servers_state(&mut self, backend: Option<&Name>) -> Result<Vec<ServerState>> {
        self.query(
            Command::ShowServersState(backend.cloned()),
            parse_servers_state,
        )
        .await
    }

    /// `show servers state` of each of `backends`: one round trip while the lines fit in
    /// `max_batch_bytes` (about 300 backends), as [`Self::batch`] cuts them.
    pub async fn show_servers_states(&mut self, backends: &[Name]) -> Result<Vec<ServerState>> {
        let commands: Vec<Command> = backends
            .iter()
            .map(|b| Command::ShowServersState(Some(b.clone())))
            .collect();
        let mut rows = Vec::new();
        for reply in self.batch(&commands).await? {
            rows.extend(reply.parsed(parse_servers_state)?);
        }
        Ok(rows)
    }

    pub async fn show_backends(&mut self) -> Result<Vec<String>> {
        self.query(Command::ShowBackend, parse_show_backend).await
    }

    pub async fn add_server(
        &mut self,
        server: &ServerRef,
        addr: std::net::IpAddr,
        port: u16,
        options: AddServerOptions,
    ) -> Result<Outcome> {
        self.act(Command::add_server(server.clone(), addr, port, options)?)
            .await
    }

    pub async fn del_server(&mut self, server: &ServerRef) -> Result<Outcome> {
        self.act(Command::DelServer(server.clone())).await
    }

    pub async fn set_server_addr(
        &mut self,
        server: &ServerRef,
        addr: std::net::IpAddr,
        port: Option<u16>,
    ) -> Result<Outcome> {
        self.act(Command::SetServerAddr {
            server: server.clone(),
            addr,
            port,
        })
        .await
    }

    pub async fn set_server_state(
        &mut self,
        server: &ServerRef,
        state: ServerAdminState,
    ) -> Result<Outcome> {
        self.act(Command::SetServerState(server.clone(), state))
            .await
    }

    pub async fn set_server_weight(&mut self, server: &ServerRef, weight: u32) -> Result<Outcome> {
        self.act(Command::set_weight(server.clone(), weight)?).await
    }

    pub async fn enable_health(&mut self, server: &ServerRef) -> Result<Outcome> {
        self.act(Command::EnableHealth(server.clone())).await
    }

    pub async fn disable_health(&mut self, server: &ServerRef) -> Result<Outcome> {
        self.act(Command::DisableHealth(server.clone())).await
    }

    pub async fn enable_frontend(&mut self, frontend: &Name) -> Result<Outcome> {
        self.act(Command::EnableFrontend(frontend.clone())).await
    }

    pub async fn disable_frontend(&mut self, frontend: &Name) -> Result<Outcome> {
        self.act(Command::DisableFrontend(frontend.clone())).await
    }

    pub async fn set_maxconn_frontend(&mut self, frontend: &Name, maxconn: u32) -> Result<Outcome> {
        self.act(Command::SetMaxconnFrontend(frontend.clone(), maxconn))
            .await
    }

    /// Master CLI: the process list.
    pub async fn show_proc(&mut self) -> Result<ProcList> {
        self.query(Command::ShowProc, parse_show_proc).await
    }

    /// Master CLI: asks the master to reload and returns whatever it printed before closing
    /// the connection. HAProxy 2.6 prints nothing and re-executes itself; 2.7+ print a
    /// `Success=1|0` report. Whether the reload worked is for the caller to confirm through
    /// [`Self::show_proc`] (a new worker pid, the `failed` count). A master still starting the
    /// worker of an earlier reload (3.1+) refuses: [`Error::ReloadInProgress`].
    pub async fn reload(&mut self) -> Result<String> {
        let deadline = self.options.timeout;
        let attempt = async {
            let conn = self.ensure_connected().await?;
            if !conn.is_master() {
                return Err(Error::InvalidArgument {
                    field: "socket",
                    value: self.endpoint.to_string(),
                    reason: "`reload` needs the master CLI (haproxy -S), not a stats socket",
                });
            }
            let conn = self.conn.as_mut().expect("connected above");
            conn.send_lines(&["reload".to_string()], "`reload`").await?;
            conn.read_answer_or_close("`reload`").await
        };
        let out = tokio::time::timeout(deadline, attempt).await;
        // The master closes every CLI connection when it re-executes.
        self.conn = None;
        let text = match out {
            Ok(r) => r?,
            Err(_) => return Err(self.timeout_error("`reload`")),
        };
        if is_reload_in_progress(&text) {
            return Err(Error::ReloadInProgress {
                endpoint: self.endpoint.to_string(),
            });
        }
        if text.contains("Success=0") {
            return Err(Error::Command {
                command: "reload".into(),
                outcome: Outcome {
                    kind: super::outcome::OutcomeKind::Other,
                    text,
                },
            });
        }
        Ok(text)
    }
}

/// Whether a `reload` report is 3.1's refusal while an earlier reload's worker is starting:
/// `Success=0`, then `--`, then exactly this sentence (mworker.c, `cli_parse_reload`).
fn is_reload_in_progress(report: &str) -> bool {
    let mut lines = report.lines().map(str::trim_end);
    lines.next() == Some("Success=0") && lines.any(|l| l == "Another reload is still in progress.")
}

#[cfg(test)]
mod tests {
    use super::is_reload_in_progress;

    #[test]
    fn the_in_progress_refusal_is_told_by_its_whole_sentence() {
        assert!(is_reload_in_progress(
            "Success=0\n--\nAnother reload is still in progress.\n\n"
        ));
        // A failed reload whose log happens to mention a reload is a failure, not a refusal.
        assert!(!is_reload_in_progress(
            "Success=0\n--\n[ALERT] Another reload is still in progress. (quoted)\n"
        ));
        assert!(!is_reload_in_progress(
            "Success=1\n--\nAnother reload is still in progress.\n"
        ));
        assert!(!is_reload_in_progress(""));
    }
}
