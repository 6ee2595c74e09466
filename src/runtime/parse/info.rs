//! `show info`: one `Key: value` per line, in an order and with a key set that vary by version.

use nom::bytes::complete::{tag, take_till1};
use nom::combinator::rest;
use nom::sequence::separated_pair;
use nom::{IResult, Parser};
use serde::Serialize;

use super::{content_lines, ParseError};

/// `show info` as ordered key/value pairs, with typed accessors for the keys we use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Info {
    pub fields: Vec<(String, String)>,
}

impl Info {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn num(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.trim().parse().ok())
    }

    pub fn version(&self) -> Option<&str> {
        self.get("Version")
    }
    pub fn pid(&self) -> Option<u64> {
        self.num("Pid")
    }
    pub fn uptime_s(&self) -> Option<u64> {
        self.num("Uptime_sec")
    }
    /// When the process started (unix seconds), 2.5+. With the pid it tells a restart apart.
    pub fn start_time(&self) -> Option<u64> {
        self.num("Start_time_sec")
    }
    pub fn current_connections(&self) -> Option<u64> {
        self.num("CurrConns")
    }
    pub fn total_connections(&self) -> Option<u64> {
        self.num("CumConns")
    }
    pub fn connection_rate(&self) -> Option<u64> {
        self.num("ConnRate")
    }
    pub fn session_rate(&self) -> Option<u64> {
        self.num("SessRate")
    }
    pub fn max_connections(&self) -> Option<u64> {
        self.num("Maxconn")
    }
}

fn key_value(i: &str) -> IResult<&str, (&str, &str)> {
    separated_pair(take_till1(|c| c == ':'), tag(":"), rest).parse(i)
}

/// Parses a whole `show info` answer.
pub fn parse_show_info(text: &str) -> Result<Info, ParseError> {
    let mut info = Info::default();
    for (n, line) in content_lines(text) {
        if line.is_empty() {
            continue;
        }
        let (_, (k, v)) = key_value(line)
            .map_err(|_| ParseError::new(n, format!("expected `Key: value`, got {line:?}")))?;
        info.fields
            .push((k.trim().to_string(), v.trim().to_string()));
    }
    if info.version().is_none() {
        return Err(ParseError::new(
            0,
            "no `Version:` line: not a `show info` answer",
        ));
    }
    Ok(info)
}

/// The branch (major, minor) of a version as HAProxy reports it (`show info`'s `Version:`,
/// `show proc`'s version column, `haproxy -v`, the fixture folders): `3.0.11-1+deb13u4`,
/// `3.0-dev13` and `3.0` give (3, 0). After the minor number comes nothing, `.<patch digit>...`
/// or `-...`; anything else is not a version. Compared as numbers, so 3.10 comes after 3.2.
pub fn version_branch(version: &str) -> Option<(u32, u32)> {
    let (major, rest) = version.split_once('.')?;
    let minor_len = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let (minor, after) = rest.split_at(minor_len);
    let patch_ok = after.is_empty()
        || after.starts_with('-')
        || after
            .strip_prefix('.')
            .is_some_and(|p| p.starts_with(|c: char| c.is_ascii_digit()));
    if major.is_empty()
        || !major.bytes().all(|b| b.is_ascii_digit())
        || minor.is_empty()
        || !patch_ok
    {
        return None;
    }
    Some((major.parse().ok()?, minor.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_keys() {
        let info = parse_show_info(
            "Name: HAProxy\nVersion: 2.6.12-1+deb12u4\nPid: 2035\nUptime: 0d 0h00m08s\nUptime_sec: 8\nUnstoppable Jobs: 1\n\n",
        )
        .unwrap();
        assert_eq!(info.version(), Some("2.6.12-1+deb12u4"));
        assert_eq!(info.pid(), Some(2035));
        assert_eq!(info.uptime_s(), Some(8));
        assert_eq!(info.get("Uptime"), Some("0d 0h00m08s"));
        assert_eq!(info.get("Unstoppable Jobs"), Some("1"));
    }

    #[test]
    fn rejects_other_text() {
        assert!(parse_show_info("").is_err());
        assert_eq!(
            parse_show_info("Name: x\nno colon here\n")
                .unwrap_err()
                .line,
            2
        );
        assert!(parse_show_info("Name: HAProxy\n").is_err());
    }
}
