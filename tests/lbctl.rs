//! The `lbctl` binary against a real HAProxy: `show --json` must agree with the socket's own
//! `show stat` (read here with a plain CSV split, independent of the crate's parser), the table
//! lists every server and prints no colour into a pipe, and bad sockets give one clear line.

mod common;

use std::collections::HashMap;
use std::process::{Command, Output};

use common::{answers, free_port, Haproxy};
use serde_json::Value;

fn lbctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lbctl"))
        .args(args)
        .env_remove("LBCTL_SOCKET")
        .env_remove("NO_COLOR")
        .output()
        .expect("run lbctl")
}

/// Several backends, mixed algorithms, states and weights; ~240 servers.
fn many_servers() -> String {
    let up = free_port();
    let closed = free_port();
    let mut cfg = format!(
        "listen up_target
    mode http
    bind 127.0.0.1:{up}
    http-request return status 200

frontend fe_main
    bind 127.0.0.1:{}
    default_backend be_rr
",
        free_port()
    );
    for (b, algo) in [
        ("be_rr", "roundrobin"),
        ("be_lc", "leastconn"),
        ("be_src", "source"),
        ("be_first", "first"),
    ] {
        cfg.push_str(&format!("\nbackend {b}\n    balance {algo}\n"));
        for i in 0..60 {
            let opts = match i % 6 {
                0 => format!("127.0.0.1:{up} check inter 100ms"),
                1 => format!("127.0.0.1:{closed} check inter 100ms rise 1 fall 1"),
                2 => format!("127.0.0.{}:{} disabled", 2 + i % 200, 30000 + i),
                3 => format!("[::1]:{} weight 0", 30000 + i),
                4 => format!("127.0.0.{}:{} weight {} backup", 2 + i % 200, 30000 + i, i),
                _ => format!("127.0.0.{}:{} weight {}", 2 + i % 200, 30000 + i, 1 + i),
            };
            cfg.push_str(&format!("    server s{i} {opts}\n"));
        }
    }
    // HTTP checks on another port than the traffic's (closed): a health port, as the agent's
    // `check.port` and `check.http_path` make.
    cfg.push_str(&format!(
        "\nbackend be_http\n    option httpchk GET /healthz\n\
         server h0 127.0.0.1:{closed} check port {up} inter 100ms\n\
         server h1 127.0.0.2:{closed} check port {up} inter 100ms\n"
    ));
    cfg
}

/// `show servers state` read by a plain split: (backend, server) → `srv_check_port`.
fn raw_check_ports(h: &Haproxy) -> HashMap<(String, String), u64> {
    let text = answers(&h.admin, "show servers state\n").unwrap();
    let mut lines = text.lines().skip(1);
    let header: Vec<&str> = lines
        .next()
        .unwrap()
        .trim_start_matches("# ")
        .split(' ')
        .collect();
    let col = |name| header.iter().position(|c| *c == name).unwrap();
    let (be, srv, port) = (col("be_name"), col("srv_name"), col("srv_check_port"));
    lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (
                (f[be].to_string(), f[srv].to_string()),
                f[port].parse().unwrap(),
            )
        })
        .collect()
}

/// `show stat` read by a plain CSV split: (proxy, server) → column → value.
fn raw_stat(h: &Haproxy) -> HashMap<(String, String), HashMap<String, String>> {
    let text = answers(&h.admin, "show stat\n").unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap()
        .trim_start_matches("# ")
        .split(',')
        .map(str::to_string)
        .collect();
    let mut out = HashMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let cols: HashMap<String, String> = header
            .iter()
            .cloned()
            .zip(line.split(',').map(str::to_string))
            .collect();
        if cols["type"] == "2" {
            out.insert((cols["pxname"].clone(), cols["svname"].clone()), cols);
        }
    }
    out
}

fn expected_status(raw: &str) -> &str {
    match raw.split(' ').next().unwrap() {
        "no" => "UP", // "no check"
        w => w,
    }
}

#[test]
fn json_agrees_with_show_stat() {
    let h = Haproxy::start(&many_servers());
    // Let the checks settle so servers are not mid-transition between the two reads.
    common::wait_until(
        std::time::Duration::from_secs(10),
        "checks to settle",
        || {
            let raw = raw_stat(&h);
            let checked = |b: &str, s: &str, result| {
                raw[&(b.to_string(), s.to_string())]["check_status"].contains(result)
            };
            // And the first checks have answered, so a backend's check kind shows.
            raw.values().all(|c| !c["status"].contains('/'))
                && checked("be_http", "h0", "L7OK")
                && checked("be_rr", "s0", "L4OK")
        },
    );
    let out = lbctl(&["show", "--json", "--socket", h.admin.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let raw = raw_stat(&h);
    let check_ports = raw_check_ports(&h);

    let mut seen = 0;
    for b in json["backends"].as_array().unwrap() {
        let bname = b["name"].as_str().unwrap();
        assert!(b["status"].is_string());
        for s in b["servers"].as_array().unwrap() {
            let name = s["name"].as_str().unwrap();
            let cols = &raw[&(bname.to_string(), name.to_string())];
            let addr = &cols["addr"];
            let (ip, port) = addr.rsplit_once(':').unwrap();
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            assert_eq!(s["addr"], ip, "{bname}/{name}");
            assert_eq!(s["port"], port.parse::<u64>().unwrap(), "{bname}/{name}");
            assert_eq!(
                s["weight"],
                cols["weight"].parse::<u64>().unwrap(),
                "{bname}/{name}"
            );
            assert_eq!(
                s["status"],
                expected_status(&cols["status"]),
                "{bname}/{name}: {}",
                cols["status"]
            );
            // 0 there is the traffic port: no port of its own.
            let check_port = check_ports[&(bname.to_string(), name.to_string())];
            let expected = if check_port == 0 {
                Value::Null
            } else {
                check_port.into()
            };
            assert_eq!(s["check_port"], expected, "{bname}/{name}");
            for key in [
                "check_status",
                "sessions_current",
                "sessions_total",
                "last_change_s",
            ] {
                assert!(s.get(key).is_some(), "missing {key}");
            }
            seen += 1;
        }
    }
    assert_eq!(seen, raw.len(), "every server of show stat is in the JSON");
    assert_eq!(seen, 242);
    // What a backend's check is, as far as HAProxy tells: the HTTP checks on their own port
    // (once a check has answered), the TCP connects on the traffic port.
    let backend = |name: &str| {
        json["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap()
            .clone()
    };
    let http = backend("be_http");
    assert_eq!(http["check_kind"], "http", "{http}");
    assert!(http["check_port"].as_u64().is_some_and(|p| p > 0), "{http}");
    assert_eq!(
        http["servers"][0]["status"], "UP",
        "checked on the health port"
    );
    let rr = backend("be_rr");
    assert_eq!(rr["check_kind"], "tcp", "{rr}");
    assert_eq!(rr["check_port"], Value::Null, "{rr}");
    let fronts: Vec<_> = json["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    assert!(fronts.contains(&"fe_main".to_string()));
    assert!(json["frontends"][0]["sessions_current"].is_number());
    // Every status is one of the five.
    let statuses: std::collections::HashSet<_> = json["backends"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["servers"].as_array().unwrap())
        .map(|s| s["status"].as_str().unwrap().to_string())
        .collect();
    assert!(
        statuses
            .iter()
            .all(|s| ["UP", "DOWN", "MAINT", "DRAIN", "NOLB"].contains(&s.as_str())),
        "{statuses:?}"
    );
    assert!(statuses.contains("DOWN") && statuses.contains("MAINT") && statuses.contains("UP"));
}

#[test]
fn table_lists_every_server_without_colour_in_a_pipe() {
    let h = Haproxy::start(&many_servers());
    let out = lbctl(&["show", "--socket", h.admin.to_str().unwrap()]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(!table.contains('\x1b'), "colour codes in a pipe");
    assert!(
        table.lines().any(|l| l.starts_with("BACKEND be_http ")
            && l.contains(", 2 servers, ")
            && l.contains("check on :")),
        "{table}"
    );
    for (b, s) in raw_stat(&h).keys() {
        assert!(table.contains(&format!("BACKEND {b}")), "{b}");
        assert!(
            table
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{s} "))
                    || l.trim_start().starts_with(&format!("{s}* "))),
            "{s} missing"
        );
    }
    let filtered = lbctl(&[
        "show",
        "--backend",
        "be_lc",
        "--socket",
        h.admin.to_str().unwrap(),
    ]);
    let text = String::from_utf8(filtered.stdout).unwrap();
    assert!(text.contains("BACKEND be_lc") && !text.contains("BACKEND be_rr"));
    let missing = lbctl(&[
        "show",
        "--backend",
        "be_nope",
        "--socket",
        h.admin.to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("be_nope"));
}

#[test]
fn show_info_and_env_socket() {
    let h = Haproxy::start(&many_servers());
    let out = Command::new(env!("CARGO_BIN_EXE_lbctl"))
        .args(["show", "info"])
        .env("LBCTL_SOCKET", &h.admin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let raw = answers(&h.admin, "show info\n").unwrap();
    let version = raw
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .unwrap();
    assert!(text.contains(version), "{text}");
    assert!(text.contains("Uptime"));
    let json = lbctl(&[
        "show",
        "info",
        "--json",
        "--socket",
        h.admin.to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["Version"], version);
}

fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_sockets_give_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.sock");
    assert_one_line_error(
        &lbctl(&["show", "--socket", missing.to_str().unwrap()]),
        "does not exist",
    );
    let file = dir.path().join("plain");
    std::fs::write(&file, "x").unwrap();
    assert_one_line_error(
        &lbctl(&["show", "--socket", file.to_str().unwrap()]),
        "regular file",
    );
    assert_one_line_error(
        &lbctl(&["show", "--socket", dir.path().to_str().unwrap()]),
        "directory",
    );

    // A socket whose server answers something else.
    let path = dir.path().join("http.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut s, _)) = listener.accept() {
            let mut b = [0u8; 64];
            let _ = s.read(&mut b);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    assert_one_line_error(
        &lbctl(&["show", "--socket", path.to_str().unwrap()]),
        "not a HAProxy runtime socket",
    );
    server.join().unwrap();

    // A socket whose server says nothing: the deadline ends it.
    let path = dir.path().join("mute.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let conn = listener.accept();
        // Hold the connection until lbctl gives up and closes it.
        if let Ok((mut s, _)) = conn {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut s, &mut sink);
        }
    });
    assert_one_line_error(
        &lbctl(&[
            "show",
            "--timeout",
            "0.3",
            "--socket",
            path.to_str().unwrap(),
        ]),
        "no answer to `prompt`",
    );
    server.join().unwrap();
}

#[test]
fn permission_denied_is_one_clear_line() {
    // Root opens any socket, so run lbctl as `nobody` against HAProxy's mode-600 socket.
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if !is_root {
        eprintln!("skipped: needs root to run lbctl as another user");
        return;
    }
    let h = Haproxy::start(&many_servers());
    // The temp dir itself must be reachable by nobody for the socket's own mode to decide.
    std::fs::set_permissions(
        h.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_lbctl"))
        .args(["show", "--socket", h.admin.to_str().unwrap()])
        .output()
        .expect("run setpriv");
    assert_one_line_error(&out, "permission denied");
}

#[test]
fn watch_redraws_until_interrupted() {
    use std::io::Read;
    let h = Haproxy::start(&many_servers());
    let mut child = Command::new(env!("CARGO_BIN_EXE_lbctl"))
        .args([
            "show",
            "--backend",
            "be_rr",
            "--watch",
            "0.1",
            "--socket",
            h.admin.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 65536];
    // Read until three frames arrived (bounded by the number of reads and by the watch period).
    for _ in 0..1000 {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "lbctl stopped early");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        if seen.matches("BACKEND be_rr").count() >= 3 {
            break;
        }
    }
    assert!(seen.matches("BACKEND be_rr").count() >= 3);
    assert!(!seen.contains('\x1b'), "no escape codes into a pipe");
    common::send_signal(child.id(), "INT");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}
