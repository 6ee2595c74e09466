//! What HAProxy's command line says about its listeners: the config files and directories it
//! loads (`-f`, and everything after `--`), the directory it loads them from (`-C`), and its
//! master CLI (`-S`). Pure: the caller reads `/proc/<pid>/cmdline`.

use std::path::{Path, PathBuf};

use super::{parse_address, Address, Listener, Scan};

/// HAProxy's command line, as far as its listeners go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandLine {
    /// `-f` paths (files or directories) in order, as written (relative to [`Self::chdir`],
    /// or to HAProxy's working directory).
    pub configs: Vec<PathBuf>,
    /// `-C DIR`: HAProxy changes to it before loading its files.
    pub chdir: Option<PathBuf>,
    /// `-S` arguments: `<address>[,<bind options>...]`.
    pub master_cli: Vec<String>,
}

/// Flags of HAProxy 2.6 to 3.2 that take the next argument.
const WITH_VALUE: &[&str] = &["-f", "-C", "-S", "-L", "-p", "-x", "-n", "-N", "-m", "-cc"];

impl CommandLine {
    /// Reads `args` (argv, the program first).
    pub fn parse(args: &[String]) -> CommandLine {
        let mut out = CommandLine::default();
        let mut rest = args.iter().skip(1);
        while let Some(arg) = rest.next() {
            match arg.as_str() {
                "--" => {
                    out.configs.extend(rest.by_ref().map(PathBuf::from));
                }
                flag if WITH_VALUE.contains(&flag) => {
                    let Some(value) = rest.next() else { break };
                    match flag {
                        "-f" => out.configs.push(PathBuf::from(value)),
                        "-C" => out.chdir = Some(PathBuf::from(value)),
                        "-S" => out.master_cli.push(value.clone()),
                        _ => {}
                    }
                }
                // `-sf`/`-st` are followed by pids, which are no flags and no files.
                _ => {}
            }
        }
        out
    }

    /// The `-f` paths made absolute: against `-C`, else against `cwd` (HAProxy's working
    /// directory); `None` for a relative path with neither.
    pub fn config_paths(&self, cwd: Option<&Path>) -> Vec<Option<PathBuf>> {
        let base = match (&self.chdir, cwd) {
            (Some(c), _) if c.is_absolute() => Some(c.clone()),
            (Some(c), Some(cwd)) => Some(cwd.join(c)),
            (Some(_), None) => None,
            (None, cwd) => cwd.map(Path::to_path_buf),
        };
        self.configs
            .iter()
            .map(|p| {
                if p.is_absolute() {
                    Some(p.clone())
                } else {
                    base.as_ref().map(|b| b.join(p))
                }
            })
            .collect()
    }

    /// The master CLI's TCP listeners, and those whose port cannot be told (an `fd@` one);
    /// `source` names where the command line came from.
    pub fn master_listeners(&self, source: &Path) -> Scan {
        let mut out = Scan::default();
        for arg in &self.master_cli {
            let address = arg.split(',').next().unwrap_or_default();
            let owner = format!("HAProxy's master CLI (-S {address})");
            match parse_address(address, &[], false) {
                Address::Tcp {
                    host,
                    first_port,
                    last_port,
                } => out.listeners.push(Listener {
                    owner,
                    file: source.to_path_buf(),
                    line: 0,
                    host,
                    first_port,
                    last_port,
                }),
                Address::NotTcp => {}
                Address::Unknown(why) => out.unknown.push(format!(
                    "{}: {owner} listens on {address:?}: {why}",
                    source.display()
                )),
            }
        }
        out
    }
}

/// Which entries of a `-f` directory HAProxy loads, in its order: the names whose first `.cfg`
/// ends them, not hidden, sorted (HAProxy also skips anything that is not a regular file; the
/// caller filters those).
pub fn dir_configs(mut names: Vec<String>) -> Vec<String> {
    names.retain(|n| !n.starts_with('.') && n.find(".cfg").is_some_and(|i| i + 4 == n.len()));
    names.sort();
    names
}
