//! A real etcd cluster for tests: Debian's `etcd` members on free loopback ports and temporary
//! data directories, each stopped and started on demand (quorum lost and regained), all
//! stopped when the handle drops, even when the test panics.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::agent::{eventually, stop_child};
use super::free_port;

/// Where Debian's `etcd-server` and `etcd-client` put their programs.
const ETCD: &str = "/usr/bin/etcd";
const ETCDCTL: &str = "/usr/bin/etcdctl";

/// One member: its name, ports, data directory and process while it runs.
struct Member {
    name: String,
    client: u16,
    peer: u16,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A cluster of members on loopback.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial_cluster: String,
    tls: Option<EtcdTls>,
    /// `user:password` for etcdctl, once authentication is on.
    pub ctl_user: Option<String>,
}

/// TLS on the members' client URLs, with client certificates required: PEM files.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// What etcdctl presents.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster commits a write.
    pub fn start(n: usize) -> EtcdCluster {
        EtcdCluster::start_with(n, None)
    }

    /// [`Self::start`], with TLS on the client URLs when `tls` is given.
    pub fn start_with(n: usize, tls: Option<EtcdTls>) -> EtcdCluster {
        assert!(
            std::path::Path::new(ETCD).exists(),
            "{ETCD} is missing: apt-get install etcd-server etcd-client (.ci/run does)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                data: dir.path().join(format!("m{i}.data")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            dir,
            members,
            initial_cluster,
            tls,
            ctl_user: None,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_writable();
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "member {} already runs", m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap();
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let mut cmd = Command::new(ETCD);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &format!("lbagent-test-{}", std::process::id()),
                // Quick elections: a test that stops the leader waits less.
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        m.child = Some(child);
    }

    /// Every member's client URL, comma-separated, as `--etcd` takes them.
    pub fn urls(&self) -> String {
        (0..self.members.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Member `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[i].client)
    }

    /// Stops member `i` (SIGTERM).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            stop_child(&mut c, Duration::from_secs(10));
        }
    }

    /// Starts member `i` again, on its data directory.
    pub fn resume(&mut self, i: usize) {
        self.spawn(i);
    }

    /// `etcdctl` against the running members.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let endpoints: Vec<String> = (0..self.members.len())
            .filter(|i| self.members[*i].child.is_some())
            .map(|i| self.url(i))
            .collect();
        let mut cmd = Command::new(ETCDCTL);
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(endpoints.join(","))
            .args(["--command-timeout", "3s"]);
        if let Some(t) = &self.tls {
            cmd.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        if let Some(user) = &self.ctl_user {
            cmd.args(["--user", user]);
        }
        let out = cmd
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {ETCDCTL}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "etcdctl {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Waits until a write commits (a quorum runs) and every running member answers: a
    /// quorum can commit while the last member still starts, and a test may give an agent
    /// that member alone.
    pub fn wait_writable(&self) {
        eventually(Duration::from_secs(20), "etcd to commit a write", || {
            self.ctl(&["put", "/lbagent-test/ping", "1"])
                .map(|_| ())
                .map_err(|e| format!("{e}\n{}", self.logs()))
        });
        eventually(
            Duration::from_secs(20),
            "every running etcd member to answer",
            || {
                self.ctl(&["endpoint", "health"])
                    .map(|_| ())
                    .map_err(|e| format!("{e}\n{}", self.logs()))
            },
        );
    }

    /// The cluster's current revision.
    pub fn revision(&self) -> i64 {
        let out = self
            .ctl(&["get", "/lbagent-test/none", "-w", "json"])
            .expect("etcdctl get");
        let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl's JSON");
        v["header"]["revision"].as_i64().expect("a revision")
    }

    /// Compacts the history up to the current revision: watches from before it are cancelled.
    pub fn compact(&self) -> i64 {
        let rev = self.revision();
        self.ctl(&["compact", &rev.to_string()])
            .expect("etcdctl compact");
        rev
    }

    /// The value of `key`, if any.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.ctl(&["get", key, "--print-value-only"]).ok()?;
        let value = out.trim_end_matches('\n');
        (!value.is_empty()).then(|| value.to_string())
    }

    /// Keys under `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.ctl(&["get", prefix, "--prefix", "--keys-only"])
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Every member's log, for a failure message.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let text = std::fs::read_to_string(&m.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "--- etcd {} (last lines)\n{}",
                    m.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The directory everything is in.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
