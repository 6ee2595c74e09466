//! Parser throughput on `show stat` and `show servers state` answers for 10,000 servers, and
//! the cost of finding the ports a 1,000-line HAProxy config binds (`haproxy::binds`, read for
//! every group of changes that creates a frontend: `config_binds`, read from disk and scanned).
//!
//! The input is built from the real HAProxy 2.6 answers in `proto-fixtures/<2.6.x>/` (the one
//! folder of the 2.6 branch, today `2.6.12-1+deb12u4`, Debian 12's package): their header
//! is kept as is, and their server rows (every status shape HAProxy printed: UP, DOWN, MAINT,
//! MAINT via a tracked server, DRAIN, NOLB, no check, backup, `UP 1/3`, `DOWN 1/2`...) are
//! replicated with new backend and server names, ids and addresses. `show stat` also keeps the
//! fixture's FRONTEND rows and gets one BACKEND row per backend, as HAProxy prints it.
//!
//! Each parser runs next to a naive split-only pass over the same bytes (split into lines,
//! split each line on the separator, count the fields), which is the floor any reader of the
//! answer pays; the summary printed at the end gives the parser's cost as a ratio of it. A plain
//! count of separators and newlines (no fields kept) is measured too, as a reference for what
//! touching every byte costs.
//!
//!     cargo bench --bench parse

mod util;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use util::{mean_ns, measuring};

use criterion::{Criterion, Throughput};
use lbagent::runtime::parse::{parse_servers_state, parse_show_stat};

const SERVERS: usize = 10_000;
const PER_BACKEND: usize = 100;
const BACKENDS: usize = SERVERS / PER_BACKEND;

/// The one fixture folder of HAProxy's 2.6 branch: folders are named by the exact version
/// HAProxy reported (`2.6.12-1+deb12u4`), so it is found by its branch.
fn fixture_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto-fixtures");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("read {}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(lbagent::runtime::parse::version_branch)
                    == Some((2, 6))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "want one 2.6 folder in {}: {found:?}",
        root.display()
    );
    found.pop().unwrap()
}

fn fixture(name: &str) -> String {
    let path = fixture_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A loopback address and port for server `j` of backend `b` (only text here: nothing connects).
fn addr(b: usize, j: usize) -> (String, u16) {
    (
        format!("127.{}.{}.{}", 1 + b / 250, b % 250, 1 + j % 250),
        (20000 + j) as u16,
    )
}

fn backend_name(b: usize) -> String {
    format!("be_bench_{b:03}")
}

fn server_name(j: usize) -> String {
    format!("srv-{j:05}")
}

/// A generated `show stat` answer: header, the fixture's frontends, then `BACKENDS` backends of
/// `PER_BACKEND` servers each and their BACKEND row. Returns the text and its number of rows.
fn show_stat_input() -> (String, usize) {
    let text = fixture("show-stat.txt");
    let mut lines = text.lines().filter(|l| !l.is_empty());
    let header = lines.next().expect("header");
    let names: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    let col = |n: &str| names.iter().position(|c| *c == n).expect(n);
    let (px, sv, iid, sid, addr_c, ty) = (
        col("pxname"),
        col("svname"),
        col("iid"),
        col("sid"),
        col("addr"),
        col("type"),
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert!(
        rows.iter().all(|r| !r.concat().contains('"')),
        "fixture rows are expected unquoted"
    );
    let frontends: Vec<&Vec<&str>> = rows.iter().filter(|r| r[ty] == "0").collect();
    let servers: Vec<&Vec<&str>> = rows.iter().filter(|r| r[ty] == "2").collect();
    let backend_row = rows
        .iter()
        .find(|r| r[ty] == "1" && r[px] == "be_app")
        .expect("be_app BACKEND row");
    assert!(
        servers.len() >= 10,
        "fixture has {} server rows",
        servers.len()
    );

    let mut out = String::with_capacity(SERVERS * 400);
    out.push_str(header);
    out.push('\n');
    let mut count = 0;
    for f in &frontends {
        out.push_str(&f.join(","));
        out.push('\n');
        count += 1;
    }
    let mut fields: Vec<String> = Vec::new();
    for b in 0..BACKENDS {
        let be = backend_name(b);
        let be_iid = (100 + b).to_string();
        for j in 0..PER_BACKEND {
            let tmpl = servers[(b * PER_BACKEND + j) % servers.len()];
            let (ip, port) = addr(b, j);
            fields.clear();
            fields.extend(tmpl.iter().map(|f| f.to_string()));
            fields[px] = be.clone();
            fields[sv] = server_name(j);
            fields[iid] = be_iid.clone();
            fields[sid] = (j + 1).to_string();
            if !fields[addr_c].is_empty() {
                fields[addr_c] = format!("{ip}:{port}");
            }
            // `MAINT (via be_app/maint1)` and the `tracked` column name a server of the same
            // backend: point them at this backend's first server.
            let tmpl_px = tmpl[px];
            for f in fields.iter_mut() {
                if let Some(pos) = f.find(&format!("{tmpl_px}/")) {
                    let end = f[pos..].find(')').map_or(f.len(), |e| pos + e);
                    f.replace_range(pos..end, &format!("{be}/{}", server_name(0)));
                }
            }
            out.push_str(&fields.join(","));
            out.push('\n');
            count += 1;
        }
        let mut row: Vec<String> = backend_row.iter().map(|f| f.to_string()).collect();
        row[px] = be.clone();
        row[iid] = be_iid;
        out.push_str(&row.join(","));
        out.push('\n');
        count += 1;
    }
    out.push('\n');
    (out, count)
}

/// A generated `show servers state` answer: version line, header, `SERVERS` rows.
fn servers_state_input() -> (String, usize) {
    let text = fixture("show-servers-state.txt");
    let mut lines = text.lines().filter(|l| !l.is_empty());
    let version = lines.next().expect("version line");
    let header = lines.next().expect("header");
    let names: Vec<&str> = header.trim_start_matches("# ").split(' ').collect();
    let col = |n: &str| names.iter().position(|c| *c == n).expect(n);
    let (be_id, be_name, srv_id, srv_name, srv_addr, srv_port) = (
        col("be_id"),
        col("be_name"),
        col("srv_id"),
        col("srv_name"),
        col("srv_addr"),
        col("srv_port"),
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(' ').collect()).collect();
    assert!(rows.len() >= 10, "fixture has {} server rows", rows.len());
    let mut out = String::with_capacity(SERVERS * 120);
    out.push_str(version);
    out.push('\n');
    out.push_str(header);
    out.push('\n');
    let mut fields: Vec<String> = Vec::new();
    for b in 0..BACKENDS {
        for j in 0..PER_BACKEND {
            let tmpl = &rows[(b * PER_BACKEND + j) % rows.len()];
            let (ip, port) = addr(b, j);
            fields.clear();
            fields.extend(tmpl.iter().map(|f| f.to_string()));
            fields[be_id] = (100 + b).to_string();
            fields[be_name] = backend_name(b);
            fields[srv_id] = (j + 1).to_string();
            fields[srv_name] = server_name(j);
            fields[srv_addr] = ip;
            fields[srv_port] = port.to_string();
            out.push_str(&fields.join(" "));
            out.push('\n');
        }
    }
    out.push('\n');
    (out, SERVERS)
}

/// The floor: split into lines, split each on `sep`, count the fields.
fn split_only(text: &str, sep: char) -> usize {
    let mut fields = 0;
    for line in text.lines() {
        fields += line.split(sep).count();
    }
    fields
}

/// A reference below the floor: count separators and newlines in one pass over the bytes (a
/// loop the compiler vectorises), no field boundaries kept: what touching every byte costs.
fn byte_count(text: &str, sep: u8) -> usize {
    text.as_bytes()
        .iter()
        .filter(|&&b| b == sep || b == b'\n')
        .count()
}

/// Checks the generated answers parse completely and into the expected values before timing.
fn check_inputs(stat: &str, stat_rows: usize, state: &str, state_rows: usize) {
    let rows = parse_show_stat(stat).expect("generated show stat parses");
    assert_eq!(rows.len(), stat_rows);
    let servers: Vec<_> = rows
        .iter()
        .filter(|r| r.kind == lbagent::runtime::parse::ProxyKind::Server)
        .collect();
    assert_eq!(servers.len(), SERVERS);
    let last = servers.last().unwrap();
    let (ip, port) = addr(BACKENDS - 1, PER_BACKEND - 1);
    assert_eq!(last.proxy, backend_name(BACKENDS - 1));
    assert_eq!(last.name, server_name(PER_BACKEND - 1));
    assert_eq!(last.addr.as_deref(), Some(format!("{ip}:{port}").as_str()));
    assert!(servers.iter().all(|s| s.status.is_some()));

    let st = parse_servers_state(state).expect("generated servers state parses");
    assert_eq!(st.len(), state_rows);
    let last = st.last().unwrap();
    assert_eq!(last.backend, backend_name(BACKENDS - 1));
    assert_eq!(last.addr.as_deref(), Some(ip.as_str()));
    assert_eq!(last.port, Some(port));
}

/// A HAProxy config of `CONFIG_LINES` lines, as an operator's grows: a global section with
/// sockets, defaults, then frontends with binds (some quoted, some lists and ranges), comments
/// and backends with servers.
const CONFIG_LINES: usize = 1000;

fn config_input() -> String {
    let mut text = String::from(
        "global\n    log /dev/log local0\n    stats socket /run/haproxy/admin.sock mode 660 level admin\n    \
         stats socket ipv4@127.0.0.1:9999 level admin\n    stats timeout 30s\n    user haproxy\n\n\
         defaults\n    mode http\n    timeout connect 5s\n    timeout client 50s\n    timeout server 50s\n\n",
    );
    let mut i = 0;
    while text.lines().count() < CONFIG_LINES {
        text.push_str(&format!(
            "# site {i}: the public web frontend\nfrontend site_{i}\n    bind :{} ssl crt /etc/haproxy/certs/{i}.pem\n    \
             bind \"127.0.0.1:{},127.0.0.1:{}\"\n    http-request set-header X-Site '{i} #not a comment'\n    \
             default_backend be_site_{i}\n\nbackend be_site_{i}\n    balance roundrobin\n    \
             server s1 10.0.{}.1:8080 check\n    server s2 10.0.{}.2:8080 check\n\n",
            10000 + i,
            20000 + i,
            30000 + i,
            i % 250,
            i % 250
        ));
        i += 1;
    }
    text.lines()
        .take(CONFIG_LINES)
        .map(|l| format!("{l}\n"))
        .collect()
}

struct Case {
    group: &'static str,
    id: &'static str,
    bytes: usize,
    rows: usize,
}

fn benches(c: &mut Criterion, cases: &mut Vec<Case>) {
    let (stat, stat_rows) = show_stat_input();
    let (state, state_rows) = servers_state_input();
    check_inputs(&stat, stat_rows, &state, state_rows);
    eprintln!(
        "input: show stat {} rows, {:.2} MB; show servers state {} rows, {:.2} MB",
        stat_rows,
        stat.len() as f64 / 1e6,
        state_rows,
        state.len() as f64 / 1e6
    );

    // MB/s: `show stat`, the answer `lbctl show` reads and the 200 MB/s target is set on.
    let mut g = c.benchmark_group("show_stat");
    g.throughput(Throughput::Bytes(stat.len() as u64));
    g.bench_function("split_baseline", |b| {
        b.iter(|| split_only(black_box(&stat), ','))
    });
    g.bench_function("byte_count", |b| {
        b.iter(|| byte_count(black_box(&stat), b','))
    });
    g.bench_function("parse_show_stat", |b| {
        b.iter(|| parse_show_stat(black_box(&stat)).unwrap())
    });
    g.finish();
    for id in ["split_baseline", "byte_count", "parse_show_stat"] {
        cases.push(Case {
            group: "show_stat",
            id,
            bytes: stat.len(),
            rows: stat_rows,
        });
    }

    // rows/s: `show servers state`, which the reconciler reads to learn what HAProxy has.
    let mut g = c.benchmark_group("servers_state");
    g.throughput(Throughput::Elements(state_rows as u64));
    g.bench_function("split_baseline", |b| {
        b.iter(|| split_only(black_box(&state), ' '))
    });
    g.bench_function("byte_count", |b| {
        b.iter(|| byte_count(black_box(&state), b' '))
    });
    g.bench_function("parse_servers_state", |b| {
        b.iter(|| parse_servers_state(black_box(&state)).unwrap())
    });
    g.finish();
    for id in ["split_baseline", "byte_count", "parse_servers_state"] {
        cases.push(Case {
            group: "servers_state",
            id,
            bytes: state.len(),
            rows: state_rows,
        });
    }
}

fn config_benches(c: &mut Criterion, cases: &mut Vec<Case>) {
    let text = config_input();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("haproxy.cfg");
    std::fs::write(&file, &text).unwrap();
    let env = |_: &str| lbagent::haproxy::binds::Lookup::Unset;
    let found =
        lbagent::haproxy::binds::scan(&text, &file, &mut lbagent::haproxy::binds::Env::new(&env));
    assert!(found.unknown.is_empty(), "{:?}", found.unknown);
    assert!(found.listeners.len() > 200, "{}", found.listeners.len());
    let rows = text.lines().count();
    assert_eq!(rows, CONFIG_LINES);
    let mut g = c.benchmark_group("config_binds");
    g.throughput(Throughput::Elements(rows as u64));
    g.bench_function("split_baseline", |b| {
        b.iter(|| split_only(black_box(&text), ' '))
    });
    g.bench_function("scan", |b| {
        b.iter(|| {
            lbagent::haproxy::binds::scan(
                black_box(&text),
                &file,
                &mut lbagent::haproxy::binds::Env::new(&env),
            )
        })
    });
    g.bench_function("read_and_scan", |b| {
        b.iter(|| {
            let t = std::fs::read_to_string(black_box(&file)).unwrap();
            lbagent::haproxy::binds::scan(&t, &file, &mut lbagent::haproxy::binds::Env::new(&env))
        })
    });
    g.finish();
    for id in ["split_baseline", "scan", "read_and_scan"] {
        cases.push(Case {
            group: "config_binds",
            id,
            bytes: text.len(),
            rows,
        });
    }
}

fn summary(cases: &[Case], since: SystemTime) {
    eprintln!();
    eprintln!(
        "parse summary (criterion mean per pass; 10,000 servers; a {CONFIG_LINES}-line config)"
    );
    eprintln!(
        "{:<36} {:>10} {:>9} {:>12} {:>16}",
        "case", "ms/pass", "MB/s", "rows/s", "x split-only"
    );
    for c in cases {
        let Some(ns) = mean_ns(c.group, c.id, since) else {
            eprintln!(
                "{:<36} (not measured in this run)",
                format!("{}/{}", c.group, c.id)
            );
            continue;
        };
        let base = mean_ns(c.group, "split_baseline", since);
        let s = ns / 1e9;
        eprintln!(
            "{:<36} {:>10.2} {:>9.1} {:>12.0} {:>16}",
            format!("{}/{}", c.group, c.id),
            ns / 1e6,
            c.bytes as f64 / 1e6 / s,
            c.rows as f64 / s,
            base.map_or_else(|| "-".into(), |b| format!("{:.2}", ns / b)),
        );
    }
}

fn main() {
    let since = SystemTime::now();
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    let mut cases = Vec::new();
    benches(&mut c, &mut cases);
    config_benches(&mut c, &mut cases);
    c.final_summary();
    if measuring() {
        summary(&cases, since);
    }
}
