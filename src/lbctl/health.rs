//! `lbctl health`: whether the local agent and its HAProxy are healthy, from its `/healthz`
//! (no key needed), as an exit code for monitoring and keepalived's `vrrp_script`.
//!
//! Exit codes: **0** healthy (200, `"haproxy":"up"` and `"in_sync":true`); **1** unhealthy (the
//! agent answered, but not that: 503 with HAProxy down or out of sync, shutting down, or
//! anything else that answered); **2** a usage or configuration error found before asking (a
//! bad URL or `--timeout`, a list of URLs, an unreadable `--ca-file`); **3** no answer
//! (connection refused, nothing within `--timeout`, a TLS handshake that failed). One line on
//! stdout says why, unless `--quiet`; a usage error is said on stderr even then.

use std::process::ExitCode;
use std::time::Duration;

use super::agent_client::{agent_said, agent_urls, AgentClient};
use crate::clock::DurationSetting;

#[derive(clap::Args, Debug)]
pub struct HealthArgs {
    /// The local agent's URL (one: check each agent with its own `lbctl health`).
    #[arg(long, env = "LBAGENT_URL", default_value = "http://127.0.0.1:9900")]
    pub agent: String,
    /// Deadline for the whole answer: `2s`, `500ms`, or a bare number of seconds.
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    pub timeout: DurationSetting,
    /// Print nothing: the exit code says it all (for keepalived's vrrp_script, run every few
    /// seconds).
    #[arg(long, short)]
    pub quiet: bool,
    /// Healthy when HAProxy is up and serving, even while the agent is out of sync (a reload it
    /// keeps retrying, a store it cannot reach): the question a floating IP asks. Without it,
    /// out of sync is unhealthy too (monitoring). A stuck change on every VM must not take the
    /// floating IP off all of them while their HAProxies serve.
    #[arg(long)]
    pub serving: bool,
    #[command(flatten)]
    pub tls: crate::tls::client::ClientTlsArgs,
}

/// What the check found; its exit code is [`Verdict::code`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    Unhealthy,
    NoAnswer,
}

impl Verdict {
    pub fn code(self) -> u8 {
        match self {
            Verdict::Healthy => 0,
            Verdict::Unhealthy => 1,
            Verdict::NoAnswer => 3,
        }
    }
}

/// The exit code of a usage or configuration error.
const USAGE: u8 = 2;

/// How long a line about an answer may get: a drift list or a stranger's page is cut there.
const LINE_MAX: usize = 300;

/// The verdict on an answer of `/healthz`, and its line.
pub fn judge(status: u16, body: &str) -> (Verdict, String) {
    judge_as(status, body, false)
}

/// [`judge`]; `serving`: HAProxy up is enough (`--serving`), whatever the sync says.
pub fn judge_as(status: u16, body: &str, serving: bool) -> (Verdict, String) {
    let json = serde_json::from_str::<serde_json::Value>(body).ok();
    // The agent's health has both fields; anything else (its error JSON while it shuts down,
    // another program on the port) is judged by its status.
    let Some(h) = json.filter(|v| v.get("haproxy").is_some() && v.get("in_sync").is_some()) else {
        let (head, message) = agent_said(status, body);
        let line = if message.is_empty() {
            format!("unhealthy: the agent answered {head}")
        } else {
            format!("unhealthy: the agent answered {head}: {message}")
        };
        return (Verdict::Unhealthy, one_line(&line));
    };
    let up = h["haproxy"] == "up";
    let in_sync = h["in_sync"] == true;
    let error = h["error"].as_str();
    let line = if status == 200 && up && in_sync {
        return match h["generation"].as_u64() {
            Some(g) => (Verdict::Healthy, format!("healthy: generation {g}")),
            None => (Verdict::Healthy, "healthy".into()),
        };
    } else if serving && up {
        let why = error.map_or_else(String::new, |e| format!(": {e}"));
        return (
            Verdict::Healthy,
            one_line(&format!("serving: haproxy up, the agent not in sync{why}")),
        );
    } else if !up {
        match error {
            Some(e) => format!("unhealthy: haproxy down: {e}"),
            None => "unhealthy: haproxy down".into(),
        }
    } else if !in_sync {
        let drift: Vec<&str> = h["drift"]
            .as_array()
            .map(|d| d.iter().filter_map(|l| l.as_str()).collect())
            .unwrap_or_default();
        match (error, drift.is_empty()) {
            (Some(e), _) => format!("unhealthy: not in sync: {e}"),
            (None, false) => format!("unhealthy: not in sync: {}", drift.join("; ")),
            (None, true) => "unhealthy: not in sync".into(),
        }
    } else {
        format!("unhealthy: the agent answered {status} with haproxy up and in sync")
    };
    (Verdict::Unhealthy, one_line(&line))
}

/// `text` on one line of at most [`LINE_MAX`] characters.
fn one_line(text: &str) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match flat.char_indices().nth(LINE_MAX) {
        Some((cut, _)) => format!("{} ...", &flat[..cut]),
        None => flat,
    }
}

/// The one URL `lbctl health` takes: the local agent's.
fn one_agent(flag: &str) -> Result<&str, String> {
    match agent_urls(flag)?[..] {
        [url] => Ok(url),
        _ => Err(format!(
            "lbctl health checks one agent, the local one: --agent {flag:?} is a list; run one \
             lbctl health per agent"
        )),
    }
}

/// The range of `--timeout`: above zero, at most a minute (a health check that waits longer
/// is no health check).
const TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(60);

/// Runs `lbctl health`.
pub async fn run(args: HealthArgs) -> ExitCode {
    let usage = |e: String| {
        eprintln!("lbctl: {e}");
        ExitCode::from(USAGE)
    };
    let url = match one_agent(&args.agent) {
        Ok(u) => u,
        Err(e) => return usage(e),
    };
    let timeout = match args.timeout.within("--timeout", TIMEOUT_RANGE) {
        Ok(t) => t,
        Err(e) => return usage(e),
    };
    let client = match AgentClient::new(url, &args.tls) {
        Ok(c) => c,
        Err(e) => return usage(e.to_string()),
    };
    let (verdict, line) = match client.get("/healthz", timeout).await {
        Ok((status, body)) => judge_as(status, &body, args.serving),
        Err(why) => (
            Verdict::NoAnswer,
            one_line(&format!("no answer from {}: {why}", client.url())),
        ),
    };
    if !args.quiet {
        println!("{line}");
    }
    ExitCode::from(verdict.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--serving`: out of sync with HAProxy up is serving; HAProxy down is not, either way.
    #[test]
    fn serving_asks_only_whether_haproxy_serves() {
        let stuck = r#"{"haproxy":"up","in_sync":false,"error":"a reload failed","generation":3}"#;
        assert_eq!(judge(503, stuck).0, Verdict::Unhealthy);
        let (v, line) = judge_as(503, stuck, true);
        assert_eq!(v, Verdict::Healthy);
        assert!(
            line.starts_with("serving: ") && line.contains("a reload failed"),
            "{line}"
        );
        let down = r#"{"haproxy":"down","in_sync":false,"generation":3}"#;
        assert_eq!(judge_as(503, down, true).0, Verdict::Unhealthy);
        assert_eq!(judge_as(503, "not json", true).0, Verdict::Unhealthy);
    }

    #[test]
    fn exit_codes_tell_healthy_unhealthy_and_no_answer_apart() {
        assert_eq!(Verdict::Healthy.code(), 0);
        assert_eq!(Verdict::Unhealthy.code(), 1);
        assert_eq!(Verdict::NoAnswer.code(), 3);
        assert!(![0, 1, 3].contains(&USAGE));
    }

    #[test]
    fn answers_are_judged_by_haproxy_and_in_sync() {
        let healthy = r#"{"generation":12,"haproxy":"up","in_sync":true}"#;
        assert_eq!(
            judge(200, healthy),
            (Verdict::Healthy, "healthy: generation 12".into())
        );
        // Draining servers and suspended leases do not make it unhealthy.
        let busy = r#"{"generation":3,"haproxy":"up","in_sync":true,"draining":["be_443/n"],
                       "leases_suspended":"7 of 10 registrations late"}"#;
        assert_eq!(judge(200, busy).0, Verdict::Healthy);
        for (status, body, line) in [
            (
                503,
                r#"{"generation":4,"haproxy":"down","in_sync":false,"error":"connect admin.sock: No such file or directory"}"#,
                "unhealthy: haproxy down: connect admin.sock: No such file or directory",
            ),
            (
                503,
                r#"{"generation":4,"haproxy":"down","in_sync":false}"#,
                "unhealthy: haproxy down",
            ),
            (
                503,
                r#"{"generation":4,"haproxy":"up","in_sync":false,"drift":["be_443/a: addr 10.0.0.1, want 10.0.0.2","be_443/b: missing"]}"#,
                "unhealthy: not in sync: be_443/a: addr 10.0.0.1, want 10.0.0.2; be_443/b: missing",
            ),
            (
                503,
                r#"{"generation":4,"haproxy":"up","in_sync":false,"error":"store: disk full"}"#,
                "unhealthy: not in sync: store: disk full",
            ),
            (
                503,
                r#"{"error":"shutting_down","message":"the agent is shutting down"}"#,
                "unhealthy: the agent answered 503 shutting_down: the agent is shutting down",
            ),
            // Whatever else answers on the port is not a healthy agent, whatever its status.
            (
                200,
                "<html>hello</html>\n",
                "unhealthy: the agent answered 200: <html>hello</html>",
            ),
            (404, "", "unhealthy: the agent answered 404"),
            // A 200 that says otherwise is believed on what it says, and the reverse.
            (
                200,
                r#"{"generation":4,"haproxy":"down","in_sync":false}"#,
                "unhealthy: haproxy down",
            ),
            (
                503,
                healthy,
                "unhealthy: the agent answered 503 with haproxy up and in sync",
            ),
            (
                200,
                r#"{"haproxy":"up","in_sync":"true"}"#,
                "unhealthy: not in sync",
            ),
        ] {
            assert_eq!(
                judge(status, body),
                (Verdict::Unhealthy, line.to_string()),
                "{status} {body}"
            );
        }
    }

    #[test]
    fn a_long_answer_is_one_cut_line() {
        let drift: Vec<String> = (0..100).map(|i| format!("be_443/n{i}: missing")).collect();
        let body = serde_json::json!({"haproxy":"up","in_sync":false,"drift":drift}).to_string();
        let (_, line) = judge(503, &body);
        assert!(line.starts_with("unhealthy: not in sync: be_443/n0: missing; "));
        assert!(line.ends_with(" ..."), "{line}");
        assert_eq!(line.chars().count(), LINE_MAX + 4);
        let (_, line) = judge(500, "a\nb\r\nc");
        assert_eq!(line, "unhealthy: the agent answered 500: a b  c");
    }

    #[test]
    fn flags_take_one_url_a_short_default_timeout_and_quiet() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: HealthArgs,
        }
        let parse = |extra: &[&str]| {
            Cli::try_parse_from(["lbctl"].iter().chain(extra))
                .map(|c| c.args)
                .map_err(|e| e.to_string())
        };
        let a = parse(&[]).unwrap();
        assert_eq!(a.timeout.0, Duration::from_secs(2));
        assert!(!a.quiet);
        let a = parse(&["-q", "--timeout", "300ms", "--agent", "https://lb:9900"]).unwrap();
        assert_eq!((a.quiet, a.timeout.0), (true, Duration::from_millis(300)));
        assert_eq!(one_agent(&a.agent).unwrap(), "https://lb:9900");
        let e = parse(&["--timeout", "2m"])
            .unwrap()
            .timeout
            .within("--timeout", TIMEOUT_RANGE)
            .unwrap_err();
        assert!(
            e.starts_with("--timeout ") && e.contains("out of range"),
            "{e}"
        );
        let e = one_agent("http://a:9900,http://b:9900").unwrap_err();
        assert!(
            e.contains("one agent") && e.contains("\"http://a:9900,http://b:9900\" is a list"),
            "{e}"
        );
        assert!(one_agent("http://a,").unwrap_err().contains("empty URL"));
    }
}
