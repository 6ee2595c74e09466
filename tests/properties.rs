//! Property tests of the runtime layer: no parser panics on any input, generated answers parse
//! back to what was generated, framing survives any split of the byte stream, and checked values
//! only ever render to one safe command line.
//!
//! Run with `cargo test --test properties`; see `docs/fuzzing.md`. Failures are not persisted to
//! a regressions file: turn a shrunk failing input into a plain `#[test]` (see the doc).

use std::net::IpAddr;

use lbagent::runtime::parse::{
    parse_frame, parse_frame_from, parse_servers_state, parse_show_backend, parse_show_info,
    parse_show_proc, parse_show_stat, parse_status, resume_point, Frame, OperState, ParseError,
    ProcEntry, ProxyKind,
};
use lbagent::runtime::{
    AddServerOptions, Command, Name, Outcome, SendProxy, ServerAdminState, ServerRef,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::TestCaseError;

/// `cases` per property, unless `PROPTEST_CASES` is set (then that, for every property). No
/// regressions file: a failure prints its shrunk input, to be kept as a plain `#[test]`.
fn cfg(cases: u32) -> ProptestConfig {
    let default = ProptestConfig::default();
    ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            default.cases
        } else {
            cases
        },
        failure_persistence: None,
        ..default
    }
}

// ---------------------------------------------------------------------------------------------
// Samples: small but real-shaped answers (cut from proto-fixtures/2.6.12-1+deb12u4), to be mutated.
// ---------------------------------------------------------------------------------------------

const STAT: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,status,weight,act,bck,lastchg,downtime,iid,sid,type,rate,check_status,check_code,check_desc,addr,mode,algo,uweight,-,\n\
fe_http,FRONTEND,,,0,0,1000,0,0,0,OPEN,,,,,,2,0,0,0,,,,,http,,,,\n\
be_app,up1,0,0,0,1,,3,120,410,UP,1,1,0,3,0,9,1,2,0,L7OK,200,\"Layer7 check passed, \"\"ok\"\"\",127.0.0.1:47108,http,roundrobin,1,,\n\
be_app,maint1,0,0,0,0,,0,0,0,MAINT (via be_app/up1),1,1,0,3,3,9,4,2,0,,,,127.0.0.1:47108,http,roundrobin,1,,\n\
be_app,BACKEND,0,0,0,1,1000,3,120,410,UP 1/3,51,2,1,3,0,9,0,1,0,,,,,http,roundrobin,51,,\n\n";

const SERVERS_STATE: &str = "1\n\
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n\
9 be_app 1 up1 127.0.0.1 2 0 1 1 3 15 3 4 6 0 0 0 - 47108 - 0 0 - - 0\n\
9 be_app 4 maint1 ::1 0 5 1 1 3 1 0 0 14 0 0 0 - 47108 - 0 0 - - 0\n\n";

const INFO: &str = "Name: HAProxy\nVersion: 2.6.12-1+deb12u4\nRelease_date: 2026/10/17\nPid: 17051\nUptime: 0d 0h00m03s\nUptime_sec: 3\nMaxconn: 9972\nCurrConns: 3\nUnstoppable Jobs: 1\nnode: vm\n\n";

const BACKEND: &str = "# name\nhealth\nbe_app\nbe_lc\nbe_static\n\n";

const PROC: &str =
    "#<PID>          <type>          <reloads>       <uptime>        <version>      \n\
17031           master          0 [failed: 0]   0d00h00m03s     2.6.12-1+deb12u4\n\
# workers\n\
17051           worker          0               0d00h00m03s     2.6.12-1+deb12u4\n\
# old workers\n\
17040           worker          1               0d00h00m09s     2.6.12-1+deb12u4\n\
# programs\n\n";

const STATUSES: &[&str] = &[
    "UP",
    "UP 1/3",
    "DOWN 1/2",
    "NOLB",
    "DRAIN (agent)",
    "MAINT (via be_app/web1)",
    "MAINT (resolution)",
    "no check",
    "OPEN",
    "WAITING",
];

const OUTCOMES: &[&str] = &[
    "\n",
    "New server registered.\n",
    "Server deleted.\n",
    "IP changed from '127.0.0.1' to '1.2.3.4', port changed from '1' to '2' by 'stats socket command'\n",
    "No such server.\n",
    "Already exists a server with the same name in backend.\n",
    "Only servers in maintenance mode can be deleted.",
    "Invalid addr 'bad' by 'stats socket command'\n",
    "Permission denied\n",
    "Unknown command, but maybe one of the following ones is a better match:\n  add acl\n",
];

const ALL_SAMPLES: &[&str] = &[STAT, SERVERS_STATE, INFO, BACKEND, PROC];

// ---------------------------------------------------------------------------------------------
// Input generators for the no-panic properties.
// ---------------------------------------------------------------------------------------------

/// A character likely to matter to some parser.
fn special_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => select(&[
            '#', ',', '\n', '\r', ' ', '\t', '"', '-', ':', '/', '>', '<', '[', ']', '(', ')', '0',
            '1', '9', 'a', 'U', 'P', 'D', ';', '\\', '\u{0}', 'é', '\u{feff}',
        ][..]),
        1 => any::<char>(),
    ]
}

#[derive(Clone, Debug)]
enum Edit {
    Insert(usize, char),
    Delete(usize),
    Replace(usize, char),
    /// Duplicates a span of the text (repeats a line, a field...).
    Repeat(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), special_char()).prop_map(|(i, c)| Edit::Insert(i, c)),
        any::<usize>().prop_map(Edit::Delete),
        (any::<usize>(), special_char()).prop_map(|(i, c)| Edit::Replace(i, c)),
        (any::<usize>(), 1..40usize).prop_map(|(i, n)| Edit::Repeat(i, n)),
    ]
}

fn mutate(sample: &str, edits: &[Edit]) -> String {
    let mut cs: Vec<char> = sample.chars().collect();
    for e in edits {
        match *e {
            Edit::Insert(i, c) => {
                let i = i % (cs.len() + 1);
                cs.insert(i, c);
            }
            Edit::Delete(i) if !cs.is_empty() => {
                let i = i % cs.len();
                cs.remove(i);
            }
            Edit::Replace(i, c) if !cs.is_empty() => {
                let i = i % cs.len();
                cs[i] = c;
            }
            Edit::Repeat(i, n) if !cs.is_empty() => {
                let i = i % cs.len();
                let end = (i + n).min(cs.len());
                let span: Vec<char> = cs[i..end].to_vec();
                cs.splice(end..end, span);
            }
            _ => {}
        }
    }
    cs.into_iter().collect()
}

/// A valid sample with a few random edits.
fn almost(samples: &'static [&'static str]) -> impl Strategy<Value = String> {
    (select(samples), vec(edit(), 1..8)).prop_map(|(s, e)| mutate(s, &e))
}

/// Text over the small alphabet the parsers care about.
const SMALL_ALPHABET: &str = "[#,\n \"\\-0123456789abUPDOWN/:]{0,300}";
const WIDER_ALPHABET: &str = "[#,\n\r \t\"\\-0-9abmUPDOWNAIT/:;>()\\[\\]<>_.]{0,300}";

fn arbitrary_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        vec(any::<u8>(), 0..400).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        SMALL_ALPHABET,
        WIDER_ALPHABET,
    ]
}

/// A parse error names a line of the text (or 0 for the whole text).
fn check_line(text: &str, e: &ParseError) -> Result<(), TestCaseError> {
    let lines = text.split('\n').count();
    prop_assert!(
        e.line <= lines,
        "error names line {} of a {}-line text: {}",
        e.line,
        lines,
        e
    );
    Ok(())
}

/// The parsed value, or a failure showing the text.
fn parsed<T>(r: Result<T, ParseError>, text: &str) -> Result<T, TestCaseError> {
    r.map_err(|e| TestCaseError::fail(format!("{e}\n{text:?}")))
}

/// The framing model: the first newline at or after `scan_from` that is followed by the prompt.
fn frame_model(buf: &[u8], prompt: &[u8], max_len: usize, scan_from: usize) -> Frame {
    if scan_from == 0 && buf.starts_with(prompt) {
        return Frame::Complete {
            body_len: 0,
            consumed: prompt.len(),
        };
    }
    let end = (scan_from.min(buf.len())..buf.len())
        .find(|&i| buf[i] == b'\n' && buf[i + 1..].starts_with(prompt));
    if let Some(i) = end {
        return Frame::Complete {
            body_len: i + 1,
            consumed: i + 1 + prompt.len(),
        };
    }
    if buf.len() > max_len {
        Frame::Invalid(String::new())
    } else {
        Frame::Partial
    }
}

fn check_frame(
    buf: &[u8],
    prompt: &[u8],
    max_len: usize,
    scan_from: usize,
) -> Result<(), TestCaseError> {
    let got = parse_frame_from(buf, prompt, max_len, scan_from);
    match (&got, frame_model(buf, prompt, max_len, scan_from)) {
        (Frame::Invalid(_), Frame::Invalid(_)) => {}
        (got, want) => prop_assert_eq!(got, &want),
    }
    if let Frame::Complete { body_len, consumed } = got {
        prop_assert!(body_len <= consumed && consumed <= buf.len());
        prop_assert_eq!(&buf[body_len..consumed], prompt);
    }
    if scan_from == 0 {
        prop_assert_eq!(got, parse_frame(buf, prompt, max_len));
    }
    Ok(())
}

/// Feeds `text` to every parser; none may panic, and errors must name a real line.
fn exercise(text: &str) -> Result<(), TestCaseError> {
    if let Err(e) = parse_show_stat(text) {
        check_line(text, &e)?;
    }
    if let Err(e) = parse_servers_state(text) {
        check_line(text, &e)?;
    }
    if let Err(e) = parse_show_info(text) {
        check_line(text, &e)?;
    }
    if let Err(e) = parse_show_backend(text) {
        check_line(text, &e)?;
    }
    if let Err(e) = parse_show_proc(text) {
        check_line(text, &e)?;
    }
    let s = parse_status(text);
    prop_assert_eq!(&s.text, text);
    let _ = s.summary();
    let a = Outcome::of_action(text);
    prop_assert_eq!(&a.text, text);
    for header in ["# name\n", "Name: ", ""] {
        let q = Outcome::of_query(header, text);
        prop_assert_eq!(&q.text, text);
    }
    for prompt in [&b"> "[..], b"master> "] {
        check_frame(text.as_bytes(), prompt, 1 << 20, 0)?;
        check_frame(text.as_bytes(), prompt, text.len() / 2, text.len() / 3)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(cfg(1000))]

    #[test]
    fn no_panic_on_arbitrary_text(text in arbitrary_text()) {
        exercise(&text)?;
    }

    #[test]
    fn no_panic_on_almost_valid_answers(text in almost(ALL_SAMPLES)) {
        exercise(&text)?;
    }

    #[test]
    fn no_panic_on_almost_valid_statuses(text in almost(STATUSES)) {
        exercise(&text)?;
    }

    #[test]
    fn no_panic_on_almost_valid_outcomes(text in almost(OUTCOMES)) {
        exercise(&text)?;
    }

    /// Any bytes, any prompt (even empty), any limit, any resume point within the buffer.
    #[test]
    fn framing_matches_its_model(
        buf in prop_oneof![
            vec(any::<u8>(), 0..200),
            vec(select(&b"\n> master"[..]), 0..60),
        ],
        prompt in prop_oneof![
            Just(b"> ".to_vec()),
            Just(b"master> ".to_vec()),
            vec(select(&b"\n> m"[..]), 0..4),
            vec(any::<u8>(), 0..10),
        ],
        max_len in prop_oneof![any::<usize>(), 0..250usize],
        scan in any::<usize>(),
    ) {
        let scan_from = scan % (buf.len() + 1);
        check_frame(&buf, &prompt, max_len, scan_from)?;
        check_frame(&buf, &prompt, max_len, 0)?;
    }
}

// ---------------------------------------------------------------------------------------------
// `show stat`: a generated table parses back to its rows.
// ---------------------------------------------------------------------------------------------

/// The columns whose values the property checks.
const CHECKED: &[&str] = &[
    "pxname", "svname", "type", "status", "weight", "addr", "scur",
];

/// Real column names the property does not check, and `-` (HAProxy 2.6 has one).
const OTHER_COLUMNS: &[&str] = &[
    "qcur",
    "qmax",
    "smax",
    "bin",
    "hrsp_1xx",
    "check_desc",
    "agg_server_status",
    "-",
    "",
    "lastsess",
];

#[derive(Clone, Debug)]
struct StatRowSpec {
    proxy: String,
    name: String,
    kind: u8,
    status: String,
    weight: Option<u32>,
    weight_dash: bool,
    addr: String,
    scur: Option<u64>,
    extra: Vec<String>,
    /// Field i is quoted even when it need not be when bit `i % 16` is set.
    force_quote: u16,
}

/// Field text: may hold commas, quotes, spaces, slashes, non-ASCII; never a line break.
const FIELD: &str = "[a-zA-Z0-9 ,\"_.:/()\\-é]{0,14}";

fn stat_row() -> impl Strategy<Value = StatRowSpec> {
    (
        (
            FIELD,
            FIELD,
            0..4u8,
            prop_oneof![
                Just(String::new()),
                select(STATUSES).prop_map(String::from),
                FIELD.prop_map(String::from)
            ],
        ),
        (
            proptest::option::of(any::<u32>()),
            any::<bool>(),
            FIELD,
            proptest::option::of(any::<u64>()),
        ),
        (vec(FIELD, 12), any::<u16>()),
    )
        .prop_map(
            |(
                (proxy, name, kind, status),
                (weight, weight_dash, addr, scur),
                (extra, force_quote),
            )| {
                StatRowSpec {
                    proxy,
                    name,
                    kind,
                    status,
                    weight,
                    weight_dash,
                    addr,
                    scur,
                    extra,
                    force_quote,
                }
            },
        )
}

#[derive(Clone, Debug)]
struct StatTable {
    header: Vec<String>,
    with_type: bool,
    trailing_comma: bool,
    /// Repeat checked columns at the right end with other values: the first must win.
    duplicate_tail: bool,
    rows: Vec<StatRowSpec>,
}

fn extra_column() -> impl Strategy<Value = String> {
    prop_oneof![
        select(OTHER_COLUMNS).prop_map(String::from),
        "[a-z_]{1,10}".prop_filter("not a checked column", |c| !CHECKED.contains(&c.as_str())),
    ]
}

fn stat_table() -> impl Strategy<Value = StatTable> {
    (
        vec(extra_column(), 0..8),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        vec(stat_row(), 0..8),
    )
        .prop_flat_map(
            |(extras, with_type, trailing_comma, duplicate_tail, rows)| {
                let mut header: Vec<String> = CHECKED
                    .iter()
                    .filter(|c| with_type || **c != "type")
                    .map(|c| c.to_string())
                    .collect();
                header.extend(extras);
                (
                    Just(header).prop_shuffle(),
                    Just((with_type, trailing_comma, duplicate_tail, rows)),
                )
            },
        )
        .prop_map(
            |(header, (with_type, trailing_comma, duplicate_tail, rows))| StatTable {
                header,
                with_type,
                trailing_comma,
                duplicate_tail,
                rows,
            },
        )
}

/// HAProxy's `csv_enc_append(str, 1, ...)` (`tools.c`), which `show stat` uses for every string
/// field: a field holding a line break, a comma or a quote is wrapped in quotes, inner quotes
/// doubled, line breaks kept as they are. `force` quotes anyway (valid CSV too).
fn csv(field: &str, force: bool) -> String {
    if force || field.contains(['\n', '\r', ',', '"']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

fn render_stat(t: &StatTable) -> String {
    let mut header = t.header.clone();
    if t.duplicate_tail {
        header.extend(["pxname", "status", "weight", "addr"].map(String::from));
    }
    let mut out = format!("# {}", header.join(","));
    if t.trailing_comma {
        out.push(',');
    }
    out.push('\n');
    for r in &t.rows {
        let mut extra = r.extra.iter();
        let fields: Vec<String> = header
            .iter()
            .enumerate()
            .map(|(i, col)| {
                let tail = i >= t.header.len();
                let v = match col.as_str() {
                    _ if tail => "dup,\"tail\"".to_string(),
                    "pxname" => r.proxy.clone(),
                    "svname" => r.name.clone(),
                    "type" => r.kind.to_string(),
                    "status" => r.status.clone(),
                    "weight" => match r.weight {
                        Some(w) => w.to_string(),
                        None if r.weight_dash => "-".to_string(),
                        None => String::new(),
                    },
                    "addr" => r.addr.clone(),
                    "scur" => r.scur.map(|v| v.to_string()).unwrap_or_default(),
                    _ => extra.next().cloned().unwrap_or_default(),
                };
                csv(&v, r.force_quote & (1 << (i % 16)) != 0)
            })
            .collect();
        out.push_str(&fields.join(","));
        if t.trailing_comma {
            out.push(',');
        }
        out.push('\n');
    }
    out.push('\n');
    out
}

proptest! {
    #![proptest_config(cfg(300))]

    #[test]
    fn show_stat_reads_generated_tables(t in stat_table()) {
        let text = render_stat(&t);
        let rows = parsed(parse_show_stat(&text), &text)?;
        prop_assert_eq!(rows.len(), t.rows.len(), "{}", text);
        for (got, want) in rows.iter().zip(&t.rows) {
            prop_assert_eq!(&got.proxy, &want.proxy, "{}", text);
            prop_assert_eq!(&got.name, &want.name, "{}", text);
            let kind = if t.with_type {
                [ProxyKind::Frontend, ProxyKind::Backend, ProxyKind::Server, ProxyKind::Listener]
                    [usize::from(want.kind)]
            } else {
                match want.name.as_str() {
                    "FRONTEND" => ProxyKind::Frontend,
                    "BACKEND" => ProxyKind::Backend,
                    _ => ProxyKind::Server,
                }
            };
            prop_assert_eq!(got.kind, kind, "{}", text);
            let status = (!want.status.is_empty()).then_some(want.status.as_str());
            prop_assert_eq!(got.status.as_ref().map(|s| s.text.as_str()), status, "{}", text);
            prop_assert_eq!(got.weight, want.weight, "{}", text);
            let addr = (!want.addr.is_empty() && want.addr != "-").then_some(want.addr.as_str());
            prop_assert_eq!(got.addr.as_deref(), addr, "{}", text);
            prop_assert_eq!(got.sessions_current, want.scur, "{}", text);
        }
    }
}

proptest! {
    #![proptest_config(cfg(100))]

    /// A string field may hold a line break: `csv_enc()` then quotes it and keeps the break, so
    /// one row spans several lines. Reachable from the configuration (HAProxy's config parser
    /// turns `\n` into a line break: a check rule's `comment` shown in `last_chk`, a server's
    /// `cookie`), so a table holding one must still parse.
    #[test]
    fn show_stat_reads_quoted_line_breaks(
        rows in vec(("[a-z_]{1,8}", "[a-z0-9]{1,8}", "[a-z ,\"\r\n]{0,12}"), 1..5),
    ) {
        let mut text = "# pxname,svname,type,desc,scur,\n".to_string();
        for (px, sv, desc) in &rows {
            text.push_str(&format!("{px},{sv},2,{},7,\n", csv(desc, false)));
        }
        text.push('\n');
        let got = parsed(parse_show_stat(&text), &text)?;
        let names: Vec<(&str, &str, Option<u64>)> = got
            .iter()
            .map(|r| (r.proxy.as_str(), r.name.as_str(), r.sessions_current))
            .collect();
        let want: Vec<(&str, &str, Option<u64>)> = rows
            .iter()
            .map(|(px, sv, _)| (px.as_str(), sv.as_str(), Some(7)))
            .collect();
        prop_assert_eq!(names, want, "{:?}", text);
    }
}

// ---------------------------------------------------------------------------------------------
// Other tabular answers: generated answers parse back.
// ---------------------------------------------------------------------------------------------

const OPER_STATES: &[OperState] = &[
    OperState::Stopped,
    OperState::Starting,
    OperState::Running,
    OperState::Stopping,
];

const PROC_HEADER: &str =
    "#<PID>          <type>          <reloads>       <uptime>        <version>      \n";

/// One `show proc` line as HAProxy's `mworker.c` prints it: `"%-15u %-15s %-15s %-15s %-15s\n"`.
fn proc_line(pid: u32, kind: &str, reloads: &str, uptime: &str, version: &str) -> String {
    format!("{pid:<15} {kind:<15} {reloads:<15} {uptime:<15} {version:<15}\n")
}

const ERROR_LINES: &[&str] = &[
    "No such server.",
    "Permission denied",
    "Unknown command",
    "Invalid addr 'x'",
    "Already exists a server",
];

const SS_COLUMNS: &[&str] = &[
    "be_id",
    "be_name",
    "srv_id",
    "srv_name",
    "srv_addr",
    "srv_op_state",
    "srv_admin_state",
    "srv_uweight",
    "srv_iweight",
    "srv_time_since_last_change",
    "srv_check_status",
    "srv_fqdn",
    "srv_port",
    "srvrecord",
    "srv_check_addr",
];

const TOKEN: &str = "[A-Za-z0-9_.:\\-]{1,12}";

#[derive(Clone, Debug)]
struct SsRow {
    backend: String,
    server: String,
    addr: String,
    op: u8,
    admin: u32,
    uweight: u32,
    filler: String,
}

fn ss_row() -> impl Strategy<Value = SsRow> {
    (TOKEN, TOKEN, TOKEN, 0..6u8, any::<u32>(), 0..=256u32, TOKEN).prop_map(
        |(backend, server, addr, op, admin, uweight, filler)| SsRow {
            backend,
            server,
            addr,
            op,
            admin,
            uweight,
            filler,
        },
    )
}

proptest! {
    #![proptest_config(cfg(300))]

    #[test]
    fn servers_state_reads_generated_tables(
        cols in Just(SS_COLUMNS.to_vec()).prop_shuffle(),
        rows in vec(ss_row(), 0..6),
        gap in 1..3usize,
    ) {
        let sep = " ".repeat(gap);
        let mut text = format!("1\n# {}\n", cols.join(" "));
        for r in &rows {
            let fields: Vec<String> = cols
                .iter()
                .map(|c| match *c {
                    "be_name" => r.backend.clone(),
                    "srv_name" => r.server.clone(),
                    "srv_addr" => r.addr.clone(),
                    "srv_op_state" => r.op.to_string(),
                    "srv_admin_state" => r.admin.to_string(),
                    "srv_uweight" => r.uweight.to_string(),
                    _ => r.filler.clone(),
                })
                .collect();
            text.push_str(&fields.join(&sep));
            text.push('\n');
        }
        text.push('\n');
        let got = parsed(parse_servers_state(&text), &text)?;
        prop_assert_eq!(got.len(), rows.len());
        for (g, w) in got.iter().zip(&rows) {
            prop_assert_eq!(&g.backend, &w.backend);
            prop_assert_eq!(&g.server, &w.server);
            let addr = (w.addr != "-").then_some(w.addr.as_str());
            prop_assert_eq!(g.addr.as_deref(), addr);
            let op = OPER_STATES.get(usize::from(w.op)).copied();
            prop_assert_eq!(g.oper_state, op);
            prop_assert_eq!(g.admin.0, w.admin);
            prop_assert_eq!(g.user_weight, Some(w.uweight));
        }
    }

    #[test]
    fn show_info_reads_generated_answers(
        fields in vec(("[A-Za-z_][A-Za-z0-9_ \\-]{0,12}", "[ -~]{0,20}"), 0..10),
        version in "[0-9.]{1,8}(-[a-z0-9+.]{1,10})?",
        at in any::<usize>(),
    ) {
        let mut fields = fields;
        let at = at % (fields.len() + 1);
        fields.insert(at, ("Version".to_string(), version));
        let mut text: String = fields.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
        text.push('\n');
        let info = parsed(parse_show_info(&text), &text)?;
        let want: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        prop_assert_eq!(&info.fields, &want);
        let first_version = want.iter().find(|(k, _)| k == "Version").map(|(_, v)| v.as_str());
        prop_assert_eq!(info.version(), first_version);
    }

    #[test]
    fn show_backend_reads_generated_answers(names in vec("[!-~é]{1,16}", 0..10)) {
        let mut text = "# name\n".to_string();
        for n in &names {
            text.push_str(n);
            text.push('\n');
        }
        text.push('\n');
        let got = parsed(parse_show_backend(&text), &text)?;
        prop_assert_eq!(got, names);
    }

    #[test]
    fn show_proc_reads_generated_answers(
        master in (1..u32::MAX, 0..1000u32, proptest::option::of(0..100u32)),
        workers in vec((1..u32::MAX, 0..1000u32), 0..5),
        old in vec((1..u32::MAX, 0..1000u32), 0..5),
        uptime in "[0-9]{1,3}d[0-9]{2}h[0-9]{2}m[0-9]{2}s",
        version in "[0-9]\\.[0-9]\\.[0-9]{1,2}(-[a-z0-9+.]{1,10})?",
    ) {
        let mut text = PROC_HEADER.to_string();
        let failed = master.2.map(|f| format!(" [failed: {f}]")).unwrap_or_default();
        let reloads = format!("{}{failed}", master.1);
        text.push_str(&proc_line(master.0, "master", &reloads, &uptime, &version));
        text.push_str("# workers\n");
        for (pid, reloads) in &workers {
            text.push_str(&proc_line(*pid, "worker", &reloads.to_string(), &uptime, &version));
        }
        if !old.is_empty() {
            text.push_str("# old workers\n");
        }
        for (pid, reloads) in &old {
            text.push_str(&proc_line(*pid, "worker", &reloads.to_string(), &uptime, &version));
        }
        text.push_str("# programs\n\n");
        let p = parsed(parse_show_proc(&text), &text)?;
        let m = p.master.as_ref().ok_or_else(|| TestCaseError::fail(format!("no master\n{text}")))?;
        prop_assert_eq!((m.pid, m.reloads, m.failed_reloads), (master.0, Some(master.1), master.2));
        prop_assert_eq!(m.uptime.as_deref(), Some(uptime.as_str()));
        prop_assert_eq!(m.version.as_deref(), Some(version.as_str()));
        let pids = |v: &[ProcEntry]| {
            v.iter()
                .map(|e| (e.pid, e.reloads.unwrap_or(u32::MAX)))
                .collect::<Vec<_>>()
        };
        prop_assert_eq!(pids(&p.workers), workers);
        prop_assert_eq!(pids(&p.old_workers), old);
        for e in p.workers.iter().chain(&p.old_workers) {
            prop_assert_eq!(e.uptime.as_deref(), Some(uptime.as_str()));
            prop_assert_eq!(e.version.as_deref(), Some(version.as_str()));
        }
    }

    /// An action's answer fails on an error phrase at the start of any line, whatever
    /// surrounds it; the same phrase in the middle of a line (inside a name) does not count. A
    /// query's answer is told by its shape: one that starts with the command's header is data
    /// even when a row starts with an error phrase (an operator's backend named `Unknown...`),
    /// and one that is the phrase alone is a failure.
    #[test]
    fn outcome_reads_phrases_only_where_they_can_be(
        before in vec("[a-z_ ]{0,10}", 0..4),
        after in vec("[a-z_ ]{0,10}", 0..4),
        phrase in select(ERROR_LINES),
        indent in "[ \t]{0,3}",
        prefix in "[a-z_]{1,6}",
    ) {
        let join = |mid: &str| {
            let mut lines = before.clone();
            lines.push(mid.to_string());
            lines.extend(after.iter().cloned());
            lines.join("\n") + "\n"
        };
        let bad = join(&format!("{indent}{phrase}"));
        prop_assert!(!Outcome::of_action(&bad).is_success(), "{:?}", bad);
        let header = "# name\n";
        let rows = format!("{header}{}", join(&format!("{indent}{phrase}")));
        prop_assert!(Outcome::of_query(header, &rows).is_success(), "{:?}", rows);
        let alone = format!("{indent}{phrase}\n");
        prop_assert!(!Outcome::of_query(header, &alone).is_success(), "{:?}", alone);
        let inner = format!("{header}{}", join(&format!("{prefix}{phrase}")));
        prop_assert!(Outcome::of_query(header, &inner).is_success(), "{:?}", inner);
    }
}

// ---------------------------------------------------------------------------------------------
// Framing over partial reads.
// ---------------------------------------------------------------------------------------------

/// A body that never holds "\n" + prompt and does not start with the prompt.
fn clean_body(raw: String, prompt: &str) -> String {
    let body = raw.replace(&format!("\n{prompt}"), &format!("\nx{prompt}"));
    if body.starts_with(prompt) {
        format!("x{body}")
    } else {
        body
    }
}

proptest! {
    #![proptest_config(cfg(500))]

    #[test]
    fn framing_survives_any_read_split(
        prompt in select(&["> ", "master> "][..]),
        raw in vec("[a\n> mster#]{0,40}", 0..8),
        chunks in vec(1..16usize, 1..64),
    ) {
        let bodies: Vec<String> = raw.into_iter().map(|b| clean_body(b, prompt)).collect();
        let mut stream = Vec::new();
        for b in &bodies {
            stream.extend_from_slice(b.as_bytes());
            stream.extend_from_slice(b"\n");
            stream.extend_from_slice(prompt.as_bytes());
        }
        let prompt = prompt.as_bytes();
        // What Connection::read_answer does, with reads of the given sizes (cycled).
        let mut buf: Vec<u8> = Vec::new();
        let mut scanned = 0;
        let mut pos = 0;
        let mut reads = chunks.iter().cycle();
        let mut got: Vec<Vec<u8>> = Vec::new();
        loop {
            let frame = parse_frame_from(&buf, prompt, 1 << 20, scanned);
            let fresh = parse_frame(&buf, prompt, 1 << 20);
            prop_assert_eq!(&frame, &fresh, "resuming changed the answer");
            match frame {
                Frame::Complete { body_len, consumed } => {
                    got.push(buf[..body_len].to_vec());
                    buf.drain(..consumed);
                    scanned = 0;
                    continue;
                }
                Frame::Invalid(d) => return Err(TestCaseError::fail(d)),
                Frame::Partial => scanned = resume_point(buf.len(), prompt),
            }
            if pos == stream.len() {
                break;
            }
            let n = (*reads.next().unwrap()).min(stream.len() - pos);
            buf.extend_from_slice(&stream[pos..pos + n]);
            pos += n;
        }
        prop_assert!(buf.is_empty(), "left over: {:?}", String::from_utf8_lossy(&buf));
        let want: Vec<Vec<u8>> = bodies.iter().map(|b| format!("{b}\n").into_bytes()).collect();
        prop_assert_eq!(got, want);
    }
}

// ---------------------------------------------------------------------------------------------
// Checked values and the commands built from them.
// ---------------------------------------------------------------------------------------------

/// Characters a name must never hold: command, line and argument separators, escapes.
const FORBIDDEN: &[char] = &[
    ';', '\n', '\r', ' ', '\t', '\\', '/', '\u{a0}', '\u{2028}', '\u{3000}',
];

fn is_haproxy_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
}

const VALID_NAME: &str = "[A-Za-z0-9._:\\-]{1,128}";

fn name() -> impl Strategy<Value = Name> {
    VALID_NAME.prop_map(|s| Name::new("name", &s).unwrap())
}

fn server_ref() -> impl Strategy<Value = ServerRef> {
    (name(), name()).prop_map(|(backend, server)| ServerRef { backend, server })
}

fn ip() -> impl Strategy<Value = IpAddr> {
    any::<IpAddr>()
}

fn options() -> impl Strategy<Value = AddServerOptions> {
    (
        (
            any::<bool>(),
            proptest::option::of(0..=256u16),
            any::<bool>(),
            any::<bool>(),
        ),
        (
            proptest::option::of(1..=u16::MAX),
            proptest::option::of(1..=86_400_000u32),
            proptest::option::of(1..=100u8),
            proptest::option::of(1..=100u8),
            select(&[SendProxy::Off, SendProxy::V1, SendProxy::V2][..]),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (check, weight, disabled, backup),
                (check_port, inter, rise, fall, send_proxy, check_send_proxy),
            )| {
                AddServerOptions {
                    check,
                    check_port,
                    check_interval_ms: inter,
                    rise,
                    fall,
                    send_proxy,
                    check_send_proxy,
                    weight,
                    disabled,
                    backup,
                }
            },
        )
}

fn admin_state() -> impl Strategy<Value = ServerAdminState> {
    select(
        &[
            ServerAdminState::Ready,
            ServerAdminState::Drain,
            ServerAdminState::Maint,
        ][..],
    )
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        Just(Command::ShowInfo),
        Just(Command::ShowStat),
        Just(Command::ShowStatFrontends),
        proptest::option::of(name()).prop_map(Command::ShowServersState),
        Just(Command::ShowBackend),
        (server_ref(), ip(), 1..=u16::MAX, options())
            .prop_map(|(s, a, p, o)| Command::add_server(s, a, p, o).unwrap()),
        server_ref().prop_map(Command::DelServer),
        server_ref().prop_map(Command::ShutdownSessions),
        (server_ref(), ip(), proptest::option::of(1..=u16::MAX))
            .prop_map(|(server, addr, port)| Command::SetServerAddr { server, addr, port }),
        (server_ref(), admin_state()).prop_map(|(s, st)| Command::SetServerState(s, st)),
        (server_ref(), 0..=256u32).prop_map(|(s, w)| Command::set_weight(s, w).unwrap()),
        (server_ref(), 1..=u16::MAX).prop_map(|(s, p)| Command::set_check_port(s, p).unwrap()),
        server_ref().prop_map(Command::EnableHealth),
        server_ref().prop_map(Command::DisableHealth),
        name().prop_map(Command::EnableFrontend),
        name().prop_map(Command::DisableFrontend),
        (name(), any::<u32>()).prop_map(|(n, v)| Command::SetMaxconnFrontend(n, v)),
        Just(Command::ShowProc),
        Just(Command::Reload),
    ]
}

/// How many space-separated words a command's wire form must have: a stray word would be an
/// extra argument.
fn word_count(c: &Command) -> usize {
    match c {
        Command::ShowInfo | Command::ShowStat | Command::ShowBackend | Command::ShowProc => 2,
        Command::ShowStatFrontends => 5,
        Command::ShowServersState(b) => 3 + usize::from(b.is_some()),
        Command::AddServer { options, .. } => {
            4 + usize::from(options.check)
                + 2 * usize::from(options.check_port.is_some())
                + 2 * usize::from(options.check_interval_ms.is_some())
                + 2 * usize::from(options.rise.is_some())
                + 2 * usize::from(options.fall.is_some())
                + usize::from(options.send_proxy != SendProxy::Off)
                + usize::from(options.check_send_proxy)
                + 2 * usize::from(options.weight.is_some())
                + usize::from(options.backup)
                + usize::from(options.disabled)
        }
        Command::DelServer(_)
        | Command::EnableHealth(_)
        | Command::DisableHealth(_)
        | Command::EnableFrontend(_)
        | Command::DisableFrontend(_) => 3,
        Command::SetServerAddr { port, .. } => 5 + 2 * usize::from(port.is_some()),
        Command::SetServerState(..)
        | Command::SetServerWeight(..)
        | Command::SetServerCheckPort(..)
        | Command::SetMaxconnFrontend(..) => 5,
        Command::ShutdownSessions(_) => 4,
        Command::Reload => 1,
    }
}

proptest! {
    #![proptest_config(cfg(1000))]

    #[test]
    fn name_accepts_valid_names(s in VALID_NAME) {
        let n = Name::new("name", &s).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(n.as_str(), s.as_str());
    }

    #[test]
    fn name_accepts_exactly_haproxy_names(s in prop_oneof![
        any::<String>(),
        "[A-Za-z0-9._:\\-;/\\\\ \t\r\n\u{0}é\u{a0}]{0,140}",
        "[a-z]{125,131}",
    ]) {
        prop_assert_eq!(Name::new("name", &s).is_ok(), is_haproxy_name(&s), "{:?}", s);
    }

    #[test]
    fn name_rejects_separators_anywhere(
        valid in "[A-Za-z0-9._:\\-]{0,60}",
        bad in select(FORBIDDEN),
        at in any::<usize>(),
    ) {
        let mut s: Vec<char> = valid.chars().collect();
        let at = at % (s.len() + 1);
        s.insert(at, bad);
        let s: String = s.into_iter().collect();
        prop_assert!(Name::new("name", &s).is_err(), "{:?}", s);
        prop_assert!(ServerRef::new(&s, "x").is_err());
        prop_assert!(ServerRef::new("x", &s).is_err());
    }

    #[test]
    fn server_ref_round_trips(r in server_ref()) {
        prop_assert_eq!(ServerRef::parse(&r.to_string()).ok(), Some(r));
    }

    #[test]
    fn commands_render_to_one_safe_line(c in command()) {
        let line = c.to_string();
        prop_assert!(!line.contains(['\n', '\r', ';']), "{:?}", line);
        prop_assert!(!line.contains(['\\', '#', '\t']), "{:?}", line);
        let words: Vec<&str> = line.split(' ').collect();
        prop_assert!(words.iter().all(|w| !w.is_empty()), "{:?}", line);
        prop_assert_eq!(words.len(), word_count(&c), "{:?}", line);
    }

    #[test]
    fn command_constructors_check_numbers(
        r in server_ref(),
        addr in ip(),
        port in any::<u16>(),
        weight in proptest::option::of(any::<u16>()),
        set_weight in prop_oneof![0..=300u32, any::<u32>()],
    ) {
        let options = AddServerOptions { weight, ..AddServerOptions::default() };
        let ok = port != 0 && weight.is_none_or(|w| w <= 256);
        prop_assert_eq!(Command::add_server(r.clone(), addr, port, options).is_ok(), ok);
        prop_assert_eq!(Command::set_weight(r, set_weight).is_ok(), set_weight <= 256);
    }
}
