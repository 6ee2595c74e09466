//! Ports the agent does not own: a new frontend on a port that HAProxy's own configuration
//! binds (any file HAProxy loads but the agent's), that HAProxy's TCP stats or master socket
//! uses, or that is the agent's API port, is refused before any file is written.
//!
//! HAProxy binds with `SO_REUSEPORT`, so a second frontend on an operator's port does not fail:
//! the kernel splits the connections between the two. The agent's bind test
//! (`reload::port_in_use`) cannot see it when the agent may not bind the port (a low port and
//! an unprivileged agent) or when HAProxy is in another network namespace; the config can.
//!
//! The files are read again for each group of changes that creates a frontend (they change
//! under the agent; reading and scanning a 1,000-line config takes well under a millisecond,
//! see `benches/parse.rs`), and after every reload or restart of HAProxy, when frontends the
//! agent already has are compared with them (the log, and the ports in `/healthz`
//! `port_conflicts`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::haproxy::binds::{self, cmdline::CommandLine, Env, Listener, Lookup};

use super::*;

/// What the agent knows of the listeners outside its own file, besides HAProxy's main file.
#[derive(Clone, Debug, Default)]
pub struct PortOwners {
    /// The agent's API address: its port is never a frontend's, whatever the policy allows.
    pub api: Option<SocketAddr>,
    /// More files or directories HAProxy loads (`--haproxy-extra-config`).
    pub extra_configs: Vec<PathBuf>,
    /// HAProxy's sockets the agent was given, when TCP (`--socket`, `--master-socket`), and what
    /// each is.
    pub sockets: Vec<(String, SocketAddr)>,
}

/// HAProxy's process as `/proc` shows it.
struct HaproxyProcess {
    pid: u64,
    args: Vec<String>,
    cwd: Option<PathBuf>,
    /// `None` when it cannot be read (another user's process).
    environ: Option<HashMap<String, String>>,
}

/// The listeners found, and those whose port could not be told (file, line and why).
struct Found {
    listeners: Vec<Listener>,
    unknown: Vec<String>,
}

impl Owner {
    /// For each of `ports`, why the agent may not create a frontend there: the owner of the
    /// port, in words. A file HAProxy loads that cannot be read, or a listener whose port
    /// cannot be told, refuses every port (any port may be the one it binds).
    pub(super) fn owned_ports(&self, ports: &BTreeSet<u16>) -> BTreeMap<u16, String> {
        let mut owned = BTreeMap::new();
        if let Some(api) = self.port_owners.api {
            if ports.contains(&api.port()) {
                owned.insert(
                    api.port(),
                    format!(
                        "port {} is the agent's own API port (--listen {api})",
                        api.port()
                    ),
                );
            }
        }
        let found = match tokio::task::block_in_place(|| self.find_listeners()) {
            Ok(f) => f,
            Err(why) => {
                for &p in ports {
                    owned.entry(p).or_insert_with(|| format!("port {p}: {why}"));
                }
                return owned;
            }
        };
        let binds = &self.render.frontend_binds;
        for &p in ports {
            if let Some(l) = found
                .listeners
                .iter()
                .find(|l| binds.iter().any(|b| l.overlaps(*b, p)))
            {
                owned
                    .entry(p)
                    .or_insert_with(|| format!("port {p} is bound by {l}"));
            }
        }
        if let Some(unknown) = found.unknown.first() {
            for u in &found.unknown {
                tracing::warn!(listener = %u, "HAProxy's configuration: a listener whose port cannot be told; new frontends are refused");
            }
            let more = match found.unknown.len() {
                1 => String::new(),
                n => format!(" (and {} more such listeners)", n - 1),
            };
            for &p in ports {
                owned.entry(p).or_insert_with(|| {
                    format!(
                        "port {p}: {unknown}{more}; the agent refuses new frontends until it can \
                         tell which ports HAProxy's own sections bind"
                    )
                });
            }
        }
        owned
    }

    /// Compares the frontends the agent has with HAProxy's other listeners, after HAProxy
    /// (re)loaded its files: an operator who added a section on one of the agent's ports
    /// shares it with the agent. Said in the log and `/healthz`; nothing is changed.
    pub(super) fn check_port_conflicts(&mut self) {
        let ports: BTreeSet<u16> = self.state.frontends.keys().copied().collect();
        let conflicts: Vec<(u16, String)> = if ports.is_empty() {
            Vec::new()
        } else {
            match tokio::task::block_in_place(|| self.find_listeners()) {
                Ok(found) => {
                    let binds = &self.render.frontend_binds;
                    ports
                        .iter()
                        .filter_map(|&p| {
                            let l = found
                                .listeners
                                .iter()
                                .find(|l| binds.iter().any(|b| l.overlaps(*b, p)))?;
                            Some((
                                p,
                                format!(
                                    "port {p}: the agent's {} and {l} both bind it; HAProxy \
                                     splits its connections between them",
                                    frontend_name(p)
                                ),
                            ))
                        })
                        .collect()
                }
                Err(why) => {
                    tracing::warn!(error = %why, "cannot compare the agent's frontends with HAProxy's configuration");
                    return;
                }
            }
        };
        if conflicts != self.port_conflicts {
            for (_, c) in &conflicts {
                tracing::warn!(conflict = %c, "a port of the agent's is also bound outside its file");
            }
            self.port_conflicts = conflicts;
        }
    }

    /// Every TCP listener of HAProxy outside the agent's file: the main file, the extra
    /// configs, the `-f` files and directories and the `-S` of HAProxy's command line (when
    /// HAProxy shares this host's namespaces), and the sockets the agent was given.
    fn find_listeners(&self) -> Result<Found, String> {
        let worker = self.host_checks.then_some(self.identity).flatten();
        let process = worker.and_then(|(pid, _)| haproxy_process(pid));
        self.tell_unseen_haproxy(worker.map(|(pid, _)| pid), process.as_ref());
        // In HAProxy's load order when its command line is known (an environment change of
        // one file holds for the next ones), then what else the agent was told of.
        let mut sources: Vec<(PathBuf, &'static str)> = Vec::new();
        let mut found = Found {
            listeners: Vec::new(),
            unknown: Vec::new(),
        };
        let command_line = process.as_ref().map(|p| CommandLine::parse(&p.args));
        if let (Some(p), Some(c)) = (&process, &command_line) {
            for (written, path) in c.configs.iter().zip(c.config_paths(p.cwd.as_deref())) {
                match path {
                    Some(path) => sources.push((path, " (HAProxy's command line)")),
                    None => {
                        return Err(format!(
                            "HAProxy (pid {}) loads {}, relative to a directory the agent cannot \
                             see; the agent refuses new frontends until it can read it: give it \
                             with --haproxy-extra-config",
                            p.pid,
                            written.display()
                        ))
                    }
                }
            }
            let source = PathBuf::from(format!("HAProxy's command line, pid {}", p.pid));
            let master = c.master_listeners(&source);
            found.listeners.extend(master.listeners);
            found.unknown.extend(master.unknown);
        }
        sources.push((self.config_main.clone(), ""));
        sources.extend(
            self.port_owners
                .extra_configs
                .iter()
                .map(|p| (p.clone(), " (--haproxy-extra-config)")),
        );
        let managed = canonical(&self.config_managed);
        let mut seen = std::collections::HashSet::new();
        let environ = process.as_ref().and_then(|p| p.environ.as_ref());
        let base = |name: &str| match environ {
            Some(vars) => vars
                .get(name)
                .map_or(Lookup::Unset, |v| Lookup::Value(v.clone())),
            None => std::env::var(name).map_or(Lookup::Unknown, Lookup::Guess),
        };
        let mut env = Env::new(&base);
        for (path, from) in sources {
            for file in config_files(&path).map_err(|e| unreadable(&path, from, &e))? {
                let key = canonical(&file);
                if key == managed || !seen.insert(key) {
                    continue;
                }
                let text =
                    std::fs::read_to_string(&file).map_err(|e| unreadable(&file, from, &e))?;
                let scan = binds::scan(&text, &file, &mut env);
                found.listeners.extend(scan.listeners);
                found.unknown.extend(scan.unknown);
            }
        }
        for (what, addr) in &self.port_owners.sockets {
            found.listeners.push(Listener {
                owner: what.clone(),
                file: PathBuf::from("the agent's settings"),
                line: 0,
                host: match addr.ip() {
                    ip if ip.is_unspecified() && ip.is_ipv4() => binds::Host::AnyV4,
                    ip if ip.is_unspecified() => binds::Host::AnyV6 { v6only: false },
                    ip => binds::Host::Ip(ip),
                },
                first_port: addr.port(),
                last_port: addr.port(),
            });
        }
        Ok(found)
    }
}

impl Owner {
    /// With host checks on, HAProxy's command line and environment are expected in /proc: when
    /// they are not (another PID namespace, another user's process), its `-f` files are not
    /// found and its variables are uncertain. Said once in the log, with what to do.
    fn tell_unseen_haproxy(&self, worker: Option<u64>, process: Option<&HaproxyProcess>) {
        use std::sync::atomic::Ordering;
        let why = match (worker, process) {
            (Some(pid), None) => format!(
                "HAProxy's worker (pid {pid}) is not a HAProxy process the agent can see in \
                 /proc (another PID namespace?): its -f files are not read (give them with \
                 --haproxy-extra-config) and its environment variables are uncertain"
            ),
            (Some(_), Some(p)) if p.environ.is_none() => format!(
                "HAProxy's environment (/proc/{}/environ) cannot be read (another user's \
                 process): a listener whose port is in an environment variable may refuse every \
                 new frontend",
                p.pid
            ),
            _ => return,
        };
        if !self.unseen_haproxy_told.swap(true, Ordering::Relaxed) {
            tracing::warn!(reason = %why, "host checks are on, but HAProxy's process cannot be fully read");
        }
    }
}

fn unreadable(path: &Path, from: &str, e: &std::io::Error) -> String {
    format!(
        "cannot read {}{from}, which HAProxy loads: {e}; the agent refuses new frontends until \
         it can tell which ports HAProxy's own sections bind",
        path.display()
    )
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The files HAProxy loads for one `-f`: the file, or a directory's `*.cfg` regular files (or
/// symlinks to them).
fn config_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !std::fs::metadata(path)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(path)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    let mut files = Vec::new();
    for name in binds::cmdline::dir_configs(names) {
        let file = path.join(name);
        // Followed, as HAProxy's stat() does: a symlinked `.cfg` is loaded. A dangling one
        // cannot be read, so the scan fails closed rather than skip what HAProxy may load.
        let meta = std::fs::metadata(&file)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
        if meta.is_file() {
            files.push(file);
        }
    }
    Ok(files)
}

/// HAProxy's process behind the worker `pid` that `show info` names: its master when it has
/// one (the command line, working directory and environment it was started with), else the
/// worker itself. `None` when `pid` is no HAProxy here (another PID namespace).
fn haproxy_process(pid: u64) -> Option<HaproxyProcess> {
    let worker = read_process(pid)?;
    let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parent_pid(&s));
    Some(parent.and_then(read_process).unwrap_or(worker))
}

/// The parent pid in a `/proc/<pid>/stat` line: the fourth field, counted after the command
/// name in parentheses (which may hold spaces and parentheses itself).
fn parent_pid(stat: &str) -> Option<u64> {
    let (_, after) = stat.rsplit_once(')')?;
    after.split_whitespace().nth(1)?.parse().ok()
}

/// `pid`'s command line, working directory and environment, when it is a HAProxy.
fn read_process(pid: u64) -> Option<HaproxyProcess> {
    let args = command_line(pid)?;
    let program = Path::new(args.first()?).file_name()?;
    if !program.to_string_lossy().starts_with("haproxy") {
        return None;
    }
    let environ = std::fs::read(format!("/proc/{pid}/environ"))
        .ok()
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter_map(|kv| {
                    let kv = String::from_utf8_lossy(kv);
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.to_string()))
                })
                .collect()
        });
    Some(HaproxyProcess {
        pid,
        args,
        cwd: std::fs::read_link(format!("/proc/{pid}/cwd")).ok(),
        environ,
    })
}

/// `/proc/<pid>/cmdline` as arguments.
pub(super) fn command_line(pid: u64) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_of_a_process() {
        assert_eq!(
            parent_pid("4242 (haproxy) S 4241 4241 4241 0 -1 4194560"),
            Some(4241)
        );
        assert_eq!(parent_pid("7 (a) b) (c) R 1 7 7"), Some(1));
        assert_eq!(parent_pid("garbage"), None);
    }
}
