//! The `status` column of `show stat`: `UP`, `UP 1/3`, `DOWN 1/2`, `MAINT (via b/s)`, `no check`...
//!
//! The words come from HAProxy's `srv_hlt_st[]` table and `stats_fill_sv_stats()` (servers),
//! and from the proxy and listener fillers (`OPEN`, `STOP`, `FULL`, `WAITING`...).

use nom::branch::alt;
use nom::bytes::complete::{tag, take_till1};
use nom::character::complete::{char, u32 as dec_u32};
use nom::combinator::{all_consuming, opt, value};
use nom::sequence::{delimited, preceded, separated_pair};
use nom::{IResult, Parser};
use serde::Serialize;

/// The main word of a status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StatusState {
    Up,
    Down,
    NoLb,
    Drain,
    Maint,
    /// A server without health checks (`no check`): it takes traffic when not in maintenance.
    NoCheck,
    Open,
    Full,
    Stop,
    /// A frontend stopped by `disable frontend` (2.6 prints `PAUSED`).
    Paused,
    Waiting,
    /// A word this parser does not know; the text is in [`Status::text`].
    Other,
}

/// Why a server is in that state, when HAProxy says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusCause {
    /// `MAINT (via backend/server)`: inherited from a tracked server.
    Via { backend: String, server: String },
    /// `MAINT (resolution)`: DNS resolution failed.
    Resolution,
    /// `DOWN (agent)`, `DRAIN (agent)`: set by the agent check.
    Agent,
}

/// A parsed status, with HAProxy's own text kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Status {
    pub state: StatusState,
    /// `UP 1/3` → `(1, 3)`: a transition in progress (checks counted so far, checks needed).
    pub progress: Option<(u32, u32)>,
    pub cause: Option<StatusCause>,
    pub text: String,
}

impl Status {
    /// The five-way summary an operator reads: UP, DOWN, MAINT, DRAIN, NOLB, plus OPEN, FULL,
    /// STOP, PAUSED, WAITING for frontends and listeners. A server with no check that is not in
    /// maintenance takes traffic, so it is UP; `UP 1/3` is still UP, `DOWN 1/2` still DOWN.
    pub fn summary(&self) -> &str {
        match self.state {
            StatusState::Up | StatusState::NoCheck => "UP",
            StatusState::Down => "DOWN",
            StatusState::NoLb => "NOLB",
            StatusState::Drain => "DRAIN",
            StatusState::Maint => "MAINT",
            StatusState::Open => "OPEN",
            StatusState::Full => "FULL",
            StatusState::Stop => "STOP",
            StatusState::Paused => "PAUSED",
            StatusState::Waiting => "WAITING",
            StatusState::Other => &self.text,
        }
    }
}

fn state_word(i: &str) -> IResult<&str, StatusState> {
    alt((
        value(StatusState::NoCheck, tag("no check")),
        value(StatusState::Maint, tag("MAINT")),
        value(StatusState::Drain, tag("DRAIN")),
        value(StatusState::NoLb, tag("NOLB")),
        value(StatusState::Down, tag("DOWN")),
        value(StatusState::Up, tag("UP")),
        value(StatusState::Open, tag("OPEN")),
        value(StatusState::Full, tag("FULL")),
        value(StatusState::Stop, tag("STOP")),
        value(StatusState::Paused, tag("PAUSED")),
        value(StatusState::Waiting, tag("WAITING")),
    ))
    .parse(i)
}

fn progress(i: &str) -> IResult<&str, (u32, u32)> {
    preceded(char(' '), separated_pair(dec_u32, char('/'), dec_u32)).parse(i)
}

fn cause(i: &str) -> IResult<&str, StatusCause> {
    preceded(
        char(' '),
        delimited(
            char('('),
            alt((
                value(StatusCause::Resolution, tag("resolution")),
                value(StatusCause::Agent, tag("agent")),
                preceded(
                    tag("via "),
                    separated_pair(
                        take_till1(|c| c == '/' || c == ')'),
                        char('/'),
                        take_till1(|c| c == ')'),
                    ),
                )
                .map(|(b, s): (&str, &str)| StatusCause::Via {
                    backend: b.to_string(),
                    server: s.to_string(),
                }),
            )),
            char(')'),
        ),
    )
    .parse(i)
}

/// Parses a status text. Never fails: an unknown text becomes [`StatusState::Other`].
pub fn parse_status(text: &str) -> Status {
    let parsed = all_consuming((state_word, opt(progress), opt(cause))).parse(text);
    match parsed {
        Ok((_, (state, progress, cause))) => Status {
            state,
            progress,
            cause,
            text: text.to_string(),
        },
        Err(_) => Status {
            state: StatusState::Other,
            progress: None,
            cause: None,
            text: text.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_status() {
        type Case = (&'static str, StatusState, Option<(u32, u32)>, &'static str);
        let cases: &[Case] = &[
            ("UP", StatusState::Up, None, "UP"),
            ("UP 1/3", StatusState::Up, Some((1, 3)), "UP"),
            ("DOWN", StatusState::Down, None, "DOWN"),
            ("DOWN 1/2", StatusState::Down, Some((1, 2)), "DOWN"),
            ("NOLB", StatusState::NoLb, None, "NOLB"),
            ("NOLB 2/3", StatusState::NoLb, Some((2, 3)), "NOLB"),
            ("DRAIN", StatusState::Drain, None, "DRAIN"),
            ("MAINT", StatusState::Maint, None, "MAINT"),
            ("no check", StatusState::NoCheck, None, "UP"),
            ("OPEN", StatusState::Open, None, "OPEN"),
            ("STOP", StatusState::Stop, None, "STOP"),
            ("PAUSED", StatusState::Paused, None, "PAUSED"),
            ("FULL", StatusState::Full, None, "FULL"),
            ("WAITING", StatusState::Waiting, None, "WAITING"),
        ];
        for (text, state, progress, summary) in cases {
            let s = parse_status(text);
            assert_eq!(s.state, *state, "{text}");
            assert_eq!(s.progress, *progress, "{text}");
            assert_eq!(s.summary(), *summary, "{text}");
            assert_eq!(s.text, *text);
        }
    }

    #[test]
    fn causes() {
        let s = parse_status("MAINT (via be_app/web1)");
        assert_eq!(s.state, StatusState::Maint);
        assert_eq!(
            s.cause,
            Some(StatusCause::Via {
                backend: "be_app".into(),
                server: "web1".into()
            })
        );
        assert_eq!(
            parse_status("MAINT (resolution)").cause,
            Some(StatusCause::Resolution)
        );
        assert_eq!(
            parse_status("DRAIN (agent)").cause,
            Some(StatusCause::Agent)
        );
        assert_eq!(parse_status("DOWN (agent)").state, StatusState::Down);
    }

    #[test]
    fn unknown_text_is_kept() {
        for t in ["", "UPPER", "UP 1/", "MAINT (via x)", "weird"] {
            let s = parse_status(t);
            assert_eq!(s.state, StatusState::Other, "{t:?}");
            assert_eq!(s.summary(), t);
        }
    }
}
