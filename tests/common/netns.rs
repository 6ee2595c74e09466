//! Network namespaces for tests that need several hosts on one machine: hosts on one IPv4 /24
//! joined by a bridge in a namespace of its own, programs run inside a host (`ip netns exec`),
//! sockets opened inside one from the test itself (`setns` on a scoped thread), and daemons
//! stopped when their handle drops. Deleting the namespaces deletes the bridge and every veth
//! with them, so nothing is left in the machine's own namespace, also when the test panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::send_signal;

/// Runs `ip` with `args`; panics with its stderr when it fails.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Panics, saying what is missing, unless this test can make namespaces (root) and the
/// programs it names exist: a test that needs them fails rather than skips, so a CI machine
/// without them is noticed.
pub fn require(programs: &[(&str, &Path)]) {
    // The effective uid, second on /proc's `Uid:` line.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string));
    assert!(
        euid.as_deref() == Some("0"),
        "this test needs root (network namespaces, keepalived); CI runs it as root"
    );
    for (what, path) in programs {
        assert!(
            path.is_file(),
            "this test needs {what} at {} (apt-get install -y {what})",
            path.display()
        );
    }
}

/// Runs `f` on a thread inside namespace `ns`: sockets it opens (a listener, a connection)
/// stay in that namespace whichever thread uses them afterwards.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // Only this thread moves: the network namespace is per thread.
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// `program` run inside namespace `ns`.
pub fn command_in(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// Hosts on one /24: each a namespace with `eth0` (its veth, the other end on the bridge) and
/// `lo` up. Dropping it deletes them all.
pub struct Lan {
    bridge_ns: String,
    /// Host namespaces, in creation order.
    hosts: Vec<String>,
}

impl Lan {
    /// A bridge in namespace `<prefix>br`. `prefix` must be unique on the machine (the test
    /// binary's pid in it) and short: interface names have 15 characters.
    pub fn new(prefix: &str) -> Lan {
        let bridge_ns = format!("{prefix}br");
        ip(&["netns", "add", &bridge_ns]);
        let lan = Lan {
            bridge_ns,
            hosts: Vec::new(),
        };
        let b = lan.bridge_ns.as_str();
        ip(&["-n", b, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", b, "link", "set", "br0", "up"]);
        lan
    }

    /// Adds host `ns` with `addr` (`10.99.0.11/24`) on its `eth0`.
    pub fn host(&mut self, ns: &str, addr: &str) {
        ip(&["netns", "add", ns]);
        self.hosts.push(ns.to_string());
        let b = self.bridge_ns.as_str();
        let port = format!("v{}", self.hosts.len());
        ip(&[
            "-n", b, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]);
        ip(&["-n", b, "link", "set", &port, "master", "br0", "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
    }

    /// The IPv4 addresses on `eth0` of host `ns`, as `ip addr` lists them (`10.99.0.11/24`).
    pub fn addrs(ns: &str) -> Vec<String> {
        let out = ip(&["-n", ns, "-4", "-o", "addr", "show", "dev", "eth0"]);
        out.lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                w.find(|x| *x == "inet")?;
                w.next().map(str::to_string)
            })
            .collect()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // A namespace still holding a process lives on until it exits; the daemons were
        // stopped first (they drop before the Lan that they need).
        for ns in self.hosts.iter().rev().chain([&self.bridge_ns]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A background program with its output in a log file, stopped on drop (SIGTERM, then SIGKILL),
/// together with any process left whose command line contains `needle` (children it forked).
pub struct Daemon {
    pub label: String,
    child: Option<Child>,
    pub log: PathBuf,
    needle: String,
}

impl Daemon {
    /// Starts `cmd`, its stdout and stderr to `log`. `needle` (a unique path on its command
    /// line) finds its children at the end.
    pub fn spawn(label: &str, mut cmd: Command, log: PathBuf, needle: &str) -> Daemon {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {label}: {e}"));
        Daemon {
            label: label.to_string(),
            child: Some(child),
            log,
            needle: needle.to_string(),
        }
    }

    /// What it printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with its log if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(st) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!("{} exited ({st}):\n{}", self.label, self.log_text());
        }
    }
}

/// Pids of live processes (any program) whose command line contains `needle`.
pub fn pids_with_cmdline(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            // Zombies have an empty command line: gone for our purposes.
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect();
    out.sort_unstable();
    out
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            eprintln!(
                "----- {} (end of {}) -----\n{tail}",
                self.label,
                self.log.display()
            );
        }
        if let Some(mut c) = self.child.take() {
            send_signal(c.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = pids_with_cmdline(&self.needle);
            if left.is_empty() {
                break;
            }
            for pid in &left {
                send_signal(*pid, "KILL");
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "{}: processes still alive after SIGKILL: {left:?}",
                    self.label
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
