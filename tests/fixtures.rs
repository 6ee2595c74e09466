//! Every parser over every recorded HAProxy answer in `proto-fixtures/<version>/`: real 2.6
//! captures and the newer versions' answers written from their sources. Outcome fixtures live
//! in a folder named by their class, so the classifier is checked against each one.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use lbagent::runtime::parse::{
    parse_frame, parse_servers_state, parse_show_backend, parse_show_info, parse_show_proc,
    parse_show_stat, Frame, ProxyKind, StatusState,
};
use lbagent::runtime::{Connection, Outcome};
use tokio::io::AsyncWriteExt;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("proto-fixtures")
}

fn versions() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(root())
        .unwrap()
        .map(|e| e.unwrap().path())
        // Version folders only: `2.6`, `3.0`...
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.split_once('.'))
                    .is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok())
        })
        .collect();
    v.sort();
    v
}

fn read(p: &Path) -> String {
    String::from_utf8(fs::read(p).unwrap())
        .unwrap_or_else(|_| panic!("{} is not UTF-8", p.display()))
}

fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.retain(|p| {
        let name = p.file_name().unwrap().to_string_lossy();
        name.starts_with(prefix) && name.ends_with(".txt")
    });
    v.sort();
    v
}

#[test]
fn all_versions_are_present() {
    let names: Vec<String> = versions()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for v in ["2.6", "2.8", "3.0", "3.2"] {
        assert!(
            names.contains(&v.to_string()),
            "proto-fixtures/{v} missing: {names:?}"
        );
    }
    for dir in versions() {
        assert!(
            dir.join("SOURCES.md").is_file(),
            "{} has no SOURCES.md",
            dir.display()
        );
    }
}

#[test]
fn show_info_every_version() {
    for dir in versions() {
        let v = dir.file_name().unwrap().to_string_lossy().into_owned();
        let info = parse_show_info(&read(&dir.join("show-info.txt"))).unwrap();
        assert!(
            info.version().unwrap().starts_with(&v),
            "{v}: {:?}",
            info.version()
        );
        assert!(info.pid().is_some(), "{v}");
        assert!(info.uptime_s().is_some(), "{v}");
    }
}

#[test]
fn show_stat_every_version() {
    for dir in versions() {
        for f in files(&dir, "show-stat") {
            let rows =
                parse_show_stat(&read(&f)).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            let servers: Vec<_> = rows
                .iter()
                .filter(|r| r.kind == ProxyKind::Server)
                .collect();
            assert!(servers.len() >= 5, "{}", f.display());
            assert!(
                rows.iter().any(|r| r.kind == ProxyKind::Frontend),
                "{}",
                f.display()
            );
            for r in &rows {
                let st = r.status.as_ref();
                if r.kind != ProxyKind::Listener {
                    let st =
                        st.unwrap_or_else(|| panic!("{}: {} has no status", f.display(), r.name));
                    assert_ne!(
                        st.state,
                        StatusState::Other,
                        "{}: unknown status {:?}",
                        f.display(),
                        st.text
                    );
                }
                if r.kind == ProxyKind::Server {
                    assert!(
                        r.addr.is_some(),
                        "{}: {}/{} has no addr",
                        f.display(),
                        r.proxy,
                        r.name
                    );
                    assert!(
                        r.weight.is_some(),
                        "{}: {}/{}",
                        f.display(),
                        r.proxy,
                        r.name
                    );
                }
            }
        }
    }
}

/// The 2.6 capture holds a server in every state the issue names.
#[test]
fn capture_covers_every_state() {
    let rows = parse_show_stat(&read(&root().join("2.6/show-stat.txt"))).unwrap();
    let texts: BTreeSet<String> = rows
        .iter()
        .filter_map(|r| r.status.as_ref().map(|s| s.text.clone()))
        .collect();
    for want in [
        "UP",
        "DOWN",
        "MAINT",
        "DRAIN",
        "NOLB",
        "no check",
        "OPEN",
        "UP 1/3",
        "DOWN 1/2",
        "MAINT (via be_app/maint1)",
    ] {
        assert!(texts.contains(want), "no {want:?} in {texts:?}");
    }
    let servers: Vec<_> = rows
        .iter()
        .filter(|r| r.kind == ProxyKind::Server)
        .collect();
    assert!(
        servers.iter().any(|s| s.backup == Some(1)),
        "a backup server"
    );
    assert!(
        servers.iter().any(|s| s.weight == Some(0)),
        "a weight-0 server"
    );
}

#[test]
fn servers_state_agrees_with_show_stat() {
    for dir in versions() {
        for (stat, state) in [
            ("show-stat.txt", "show-servers-state.txt"),
            (
                "show-stat-after-changes.txt",
                "show-servers-state-after-changes.txt",
            ),
        ] {
            let (stat, state) = (dir.join(stat), dir.join(state));
            if !stat.is_file() || !state.is_file() {
                continue;
            }
            let rows = parse_show_stat(&read(&stat)).unwrap();
            let states = parse_servers_state(&read(&state))
                .unwrap_or_else(|e| panic!("{}: {e}", state.display()));
            let from_stat: BTreeSet<(String, String)> = rows
                .iter()
                .filter(|r| r.kind == ProxyKind::Server)
                .map(|r| (r.proxy.clone(), r.name.clone()))
                .collect();
            let from_state: BTreeSet<(String, String)> = states
                .iter()
                .map(|s| (s.backend.clone(), s.server.clone()))
                .collect();
            assert_eq!(from_stat, from_state, "{}", dir.display());
            for s in &states {
                let row = rows
                    .iter()
                    .find(|r| r.proxy == s.backend && r.name == s.server)
                    .unwrap();
                let st = row.status.as_ref().unwrap().state;
                assert_eq!(
                    s.admin.in_maintenance(),
                    st == StatusState::Maint,
                    "{}: {}/{} admin {:?} vs {:?}",
                    state.display(),
                    s.backend,
                    s.server,
                    s.admin,
                    row.status
                );
            }
        }
    }
}

#[test]
fn servers_state_one_backend() {
    for dir in versions() {
        for f in files(&dir, "show-servers-state-") {
            let name = f.file_stem().unwrap().to_string_lossy().into_owned();
            let states =
                parse_servers_state(&read(&f)).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if let Some(backend) = name
                .strip_prefix("show-servers-state-")
                .filter(|b| !b.contains("after"))
            {
                assert!(!states.is_empty());
                assert!(
                    states.iter().all(|s| s.backend == backend),
                    "{}",
                    f.display()
                );
            }
        }
    }
}

#[test]
fn show_backend_lists_the_backends_of_show_stat() {
    for dir in versions() {
        let names = parse_show_backend(&read(&dir.join("show-backend.txt"))).unwrap();
        let rows = parse_show_stat(&read(&dir.join("show-stat.txt"))).unwrap();
        let from_stat: BTreeSet<&str> = rows
            .iter()
            .filter(|r| r.kind == ProxyKind::Backend)
            .map(|r| r.proxy.as_str())
            .collect();
        let listed: BTreeSet<&str> = names.iter().map(String::as_str).collect();
        assert!(
            from_stat.is_subset(&listed),
            "{}: {from_stat:?} vs {listed:?}",
            dir.display()
        );
    }
}

#[test]
fn show_proc_every_version() {
    for dir in versions() {
        let p = parse_show_proc(&read(&dir.join("show-proc.txt"))).unwrap();
        let m = p
            .master
            .unwrap_or_else(|| panic!("{}: no master", dir.display()));
        assert!(m.failed_reloads.is_some(), "{}", dir.display());
        assert!(!p.workers.is_empty(), "{}", dir.display());
        assert!(p
            .workers
            .iter()
            .all(|w| w.kind == "worker" && w.pid != m.pid));
    }
}

#[test]
fn outcomes_are_classified_as_filed() {
    let mut checked = 0;
    for dir in versions() {
        let outcomes = dir.join("outcome");
        let Ok(kinds) = fs::read_dir(&outcomes) else {
            continue;
        };
        for kind_dir in kinds {
            let kind_dir = kind_dir.unwrap().path();
            let kind = kind_dir.file_name().unwrap().to_string_lossy().into_owned();
            for f in files(&kind_dir, "") {
                let cmd = read(&f.with_extension("cmd"));
                let text = read(&f);
                // `show ...` and `get ...` print data on success.
                let outcome = if cmd.starts_with("show ") || cmd.starts_with("get ") {
                    Outcome::of_query(&text)
                } else {
                    Outcome::of_action(&text)
                };
                assert_eq!(
                    outcome.kind.as_str(),
                    kind,
                    "{}: `{cmd}` → {text:?}",
                    f.display()
                );
                assert_eq!(outcome.text, text, "raw text kept");
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "only {checked} outcome fixtures");
}

/// Frames a recorded prompt-mode byte stream into its answers.
fn frame_all(path: &Path) -> Vec<String> {
    let bytes = fs::read(path).unwrap();
    let mut rest = &bytes[..];
    let mut answers = Vec::new();
    while !rest.is_empty() {
        match parse_frame(rest, b"> ", 1 << 20) {
            Frame::Complete { body_len, consumed } => {
                answers.push(String::from_utf8_lossy(&rest[..body_len]).into_owned());
                rest = &rest[consumed..];
            }
            other => panic!(
                "{}: {other:?} with {} bytes left",
                path.display(),
                rest.len()
            ),
        }
    }
    answers
}

/// What `RuntimeClient::batch` relies on: commands sent one per line in one write come back
/// with one prompt each, in every version, and each answer classifies like the same command
/// sent alone.
#[test]
fn one_command_per_line_frames_into_one_answer_each() {
    for dir in versions() {
        let raw = dir.join("raw/batch-2.bin");
        let cmds = read(&dir.join("raw/batch-2.cmd"));
        let cmds: Vec<&str> = cmds.lines().filter(|l| !l.is_empty()).collect();
        let answers = frame_all(&raw);
        assert_eq!(answers.len(), cmds.len(), "{}: {answers:?}", raw.display());
        let kinds: Vec<_> = cmds
            .iter()
            .zip(&answers)
            .map(|(c, a)| {
                if c.starts_with("show ") || c.starts_with("get ") {
                    Outcome::of_query(a).kind.as_str()
                } else {
                    Outcome::of_action(a).kind.as_str()
                }
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "success",
                "not-found",
                "success",
                "success",
                "invalid-argument",
                "success"
            ],
            "{}",
            raw.display()
        );
    }
}

/// Why batches are not `;`-joined: up to 3.0 each command of such a line gets its own prompt,
/// from 3.2 on the whole line gets one, so the answers cannot be told apart.
#[test]
fn semicolon_joined_line_gets_one_prompt_from_3_2() {
    for dir in versions() {
        let v = dir.file_name().unwrap().to_string_lossy().into_owned();
        let count = read(&dir.join("raw/batch-1.cmd"))
            .trim_end()
            .split(';')
            .count();
        let answers = frame_all(&dir.join("raw/batch-1.bin"));
        let expected = if v.as_str() >= "3.2" { 1 } else { count };
        assert_eq!(answers.len(), expected, "{v}: {answers:?}");
    }
}

#[tokio::test]
async fn recorded_handshakes_give_the_prompt() {
    for dir in versions() {
        for (file, prompt) in [
            ("raw/prompt-handshake.bin", &b"> "[..]),
            ("raw/master-prompt-handshake.bin", b"master> "),
        ] {
            let path = dir.join(file);
            if !path.is_file() {
                continue;
            }
            let greeting = fs::read(&path).unwrap();
            let (client, mut server) = tokio::io::duplex(4096);
            tokio::spawn(async move {
                server.write_all(&greeting).await.unwrap();
                // Keep the peer open until the handshake is read.
                let mut sink = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut server, &mut sink).await;
            });
            let conn = Connection::handshake(Box::new(client), "fixture".into(), 1024)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(conn.prompt(), prompt, "{}", path.display());
        }
    }
}
