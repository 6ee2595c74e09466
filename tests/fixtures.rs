//! Every parser over every recorded HAProxy answer in `proto-fixtures/<version>/`, one folder per
//! HAProxy build, named by the exact version it reports (`2.6.12-1+deb12u4`, `2.8.0`,
//! `3.0.11-1+deb13u4`, `3.2.26-1`), all captured by `proto-fixtures/capture.sh` from a running
//! HAProxy. Expectations that depend on the version go by the branch (major.minor) parsed from
//! the folder name. Outcome fixtures live in a folder named by their class, so the classifier is
//! checked against each one.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use lbagent::runtime::parse::{
    parse_frame, parse_servers_state, parse_show_backend, parse_show_info, parse_show_proc,
    parse_show_stat, version_branch, Frame, ProxyKind, StatusState,
};
use lbagent::runtime::{Command, Connection, Outcome};
use tokio::io::AsyncWriteExt;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("proto-fixtures")
}

fn name_of(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}

/// The branch of a version folder.
fn branch(dir: &Path) -> (u32, u32) {
    version_branch(&name_of(dir))
        .unwrap_or_else(|| panic!("{} is not a version folder", dir.display()))
}

/// Every version folder, by branch. Any other folder under `proto-fixtures/` is an error rather
/// than silently skipped.
fn versions() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(root())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    for p in &v {
        assert!(
            version_branch(&name_of(p)).is_some(),
            "{}: not named by a HAProxy version",
            p.display()
        );
    }
    v.sort_by_key(|p| (branch(p), name_of(p)));
    assert!(!v.is_empty(), "no version folder in {}", root().display());
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
fn branch_is_parsed_from_the_folder_name() {
    assert_eq!(version_branch("2.6.12-1+deb12u4"), Some((2, 6)));
    assert_eq!(version_branch("3.0.11-1+deb13u4"), Some((3, 0)));
    assert_eq!(version_branch("3.2.26-1"), Some((3, 2)));
    assert_eq!(version_branch("2.8.0"), Some((2, 8)));
    assert_eq!(version_branch("2.8.0-fdd8154ed"), Some((2, 8)));
    assert_eq!(version_branch("3.10.1"), Some((3, 10)));
    assert_eq!(version_branch("3.2"), Some((3, 2)));
    assert_eq!(version_branch("3.2-dev13"), Some((3, 2)));
    assert!(version_branch("3.10.1").unwrap() > version_branch("3.2.26-1").unwrap());
    for bad in [
        "capture.sh",
        "raw",
        "3",
        "3.",
        ".2",
        "3.x",
        "3.2x",
        "3.2.x",
        "a.2.1",
    ] {
        assert_eq!(version_branch(bad), None, "{bad}");
    }
}

#[test]
fn all_versions_are_present() {
    let branches: Vec<(u32, u32)> = versions().iter().map(|d| branch(d)).collect();
    for want in [(2, 6), (2, 8), (3, 0), (3, 2)] {
        let n = branches.iter().filter(|b| **b == want).count();
        assert_eq!(
            n,
            1,
            "want one folder of {}.{} in proto-fixtures/, found {n}: {:?}",
            want.0,
            want.1,
            versions()
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
        let v = name_of(&dir);
        let info = parse_show_info(&read(&dir.join("show-info.txt"))).unwrap();
        // The folder is named by the version HAProxy reports; an upstream build's may carry a
        // `-<commit>` suffix left out of the folder name (`2.8.0` for `2.8.0-fdd8154ed`).
        let version = info.version().unwrap();
        assert!(
            version == v || version.starts_with(&format!("{v}-")),
            "{v}: {version:?}"
        );
        assert!(info.pid().is_some(), "{v}");
        assert!(info.uptime_s().is_some(), "{v}");
    }
}

#[test]
fn show_stat_every_version() {
    for dir in versions() {
        let stats = files(&dir, "show-stat");
        assert_eq!(stats.len(), 2, "{}: {stats:?}", dir.display());
        for f in stats {
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

/// Every capture holds a server in every state the issue names.
#[test]
fn capture_covers_every_state() {
    for dir in versions() {
        capture_covers_every_state_in(&dir.join("show-stat.txt"));
    }
}

fn capture_covers_every_state_in(path: &Path) {
    let rows = parse_show_stat(&read(path)).unwrap();
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
        assert!(
            texts.contains(want),
            "{}: no {want:?} in {texts:?}",
            path.display()
        );
    }
    let servers: Vec<_> = rows
        .iter()
        .filter(|r| r.kind == ProxyKind::Server)
        .collect();
    assert!(
        servers.iter().any(|s| s.backup == Some(1)),
        "{}: a backup server",
        path.display()
    );
    assert!(
        servers.iter().any(|s| s.weight == Some(0)),
        "{}: a weight-0 server",
        path.display()
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
        let mut one_backend = 0;
        for f in files(&dir, "show-servers-state-") {
            let name = f.file_stem().unwrap().to_string_lossy().into_owned();
            let states =
                parse_servers_state(&read(&f)).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if let Some(backend) = name
                .strip_prefix("show-servers-state-")
                .filter(|b| !b.contains("after"))
            {
                assert!(!states.is_empty(), "{}", f.display());
                assert!(
                    states.iter().all(|s| s.backend == backend),
                    "{}",
                    f.display()
                );
                one_backend += 1;
            }
        }
        assert_eq!(
            one_backend,
            1,
            "{}: show-servers-state-<backend>.txt",
            dir.display()
        );
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
        // Same build for every process, and the same version string `show info` gives (3.2.26's
        // column is padded with trailing spaces, which must not end up in it).
        let info = parse_show_info(&read(&dir.join("show-info.txt"))).unwrap();
        for e in std::iter::once(&m).chain(&p.workers) {
            assert_eq!(
                e.version.as_deref(),
                info.version(),
                "{}: pid {}",
                dir.display(),
                e.pid
            );
        }
    }
}

#[test]
fn outcomes_are_classified_as_filed() {
    let mut slugs_of_first: Option<BTreeSet<String>> = None;
    for dir in versions() {
        let mut checked = 0;
        let mut slugs = BTreeSet::new();
        let outcomes = dir.join("outcome");
        let kinds =
            fs::read_dir(&outcomes).unwrap_or_else(|e| panic!("{}: {e}", outcomes.display()));
        for kind_dir in kinds {
            let kind_dir = kind_dir.unwrap().path();
            let kind = kind_dir.file_name().unwrap().to_string_lossy().into_owned();
            for f in files(&kind_dir, "") {
                let cmd = read(&f.with_extension("cmd"));
                let text = read(&f);
                let outcome = classify(&cmd, &text);
                assert_eq!(
                    outcome.kind.as_str(),
                    kind,
                    "{}: `{cmd}` → {text:?}",
                    f.display()
                );
                assert_eq!(outcome.text, text, "raw text kept");
                slugs.insert(format!(
                    "{kind}/{}",
                    f.file_stem().unwrap().to_string_lossy()
                ));
                checked += 1;
            }
        }
        assert!(
            checked >= 30,
            "{}: only {checked} outcome fixtures",
            dir.display()
        );
        // Every version answers the same list of commands, each filed under the same class.
        match &slugs_of_first {
            None => slugs_of_first = Some(slugs),
            Some(first) => assert_eq!(&slugs, first, "{}", dir.display()),
        }
    }
}

/// Classifies a recorded answer as the client would: the `show` commands lbagent sends by the
/// header their data starts with (`Command::answer_header`), everything else as an action.
/// `get weight` (recorded, never sent by lbagent) prints a bare number: data when it starts
/// with a digit.
fn classify(cmd: &str, text: &str) -> Outcome {
    let command = [
        ("show info", Command::ShowInfo),
        ("show stat", Command::ShowStat),
        ("show servers state", Command::ShowServersState(None)),
        ("show backend", Command::ShowBackend),
        ("show proc", Command::ShowProc),
    ]
    .into_iter()
    .find(|(line, _)| cmd == *line || cmd.starts_with(&format!("{line} ")));
    match command.and_then(|(_, c)| c.answer_header()) {
        Some(header) => Outcome::of_query(header, text),
        None if cmd.starts_with("get weight ")
            && text.starts_with(|c: char| c.is_ascii_digit()) =>
        {
            Outcome::of_query("", text)
        }
        None => Outcome::of_action(text),
    }
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
            .map(|(c, a)| classify(c, a).kind.as_str())
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
        let v = name_of(&dir);
        let count = read(&dir.join("raw/batch-1.cmd"))
            .trim_end()
            .split(';')
            .count();
        assert!(count > 1, "{v}: raw/batch-1.cmd is one command");
        let answers = frame_all(&dir.join("raw/batch-1.bin"));
        let expected = if branch(&dir) >= (3, 2) { 1 } else { count };
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

/// `show servers state` alone gives what `show stat` says of each server (its status summed up,
/// its check status): checked on every server of every version's captures, which hold UP, DOWN,
/// MAINT (also inherited through `track`), DRAIN, NOLB, no check, checks in progress and
/// servers going up or down.
#[test]
fn servers_state_tells_what_show_stat_says_of_each_server() {
    for (dir, suffix) in versions()
        .into_iter()
        .flat_map(|d| [(d.clone(), ""), (d, "-after-changes")])
    {
        let stat = parse_show_stat(&read(&dir.join(format!("show-stat{suffix}.txt")))).unwrap();
        let state =
            parse_servers_state(&read(&dir.join(format!("show-servers-state{suffix}.txt"))))
                .unwrap();
        let mut compared = 0;
        for s in &state {
            let Some(row) = stat
                .iter()
                .find(|r| r.proxy == s.backend && r.name == s.server)
            else {
                continue;
            };
            let want = row.status.as_ref().map(|st| st.summary().to_string());
            assert_eq!(
                Some(s.status_summary().to_string()),
                want,
                "{}: {}/{} {s:?}",
                name_of(&dir),
                s.backend,
                s.server
            );
            assert_eq!(
                s.check_status_name(),
                row.check_status.clone().filter(|c| !c.is_empty()),
                "{}: {}/{} {s:?}",
                name_of(&dir),
                s.backend,
                s.server
            );
            compared += 1;
        }
        assert!(
            compared >= 5,
            "{}{suffix}: only {compared} servers",
            name_of(&dir)
        );
    }
}
