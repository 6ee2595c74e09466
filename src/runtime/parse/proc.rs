//! Master CLI `show proc`: the master, its current workers, old workers still finishing
//! connections after a reload, and external programs. Columns are separated by runs of spaces;
//! the master's reload count carries `[failed: N]` (2.6+).

use nom::bytes::complete::tag;
use nom::character::complete::{char, space0, u32 as dec_u32};
use nom::sequence::{delimited, preceded};
use nom::Parser;
use serde::Serialize;

use super::{content_lines, ParseError};

/// One process line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcEntry {
    pub pid: u32,
    /// `master`, `worker` or a program's name.
    pub kind: String,
    /// How many reloads this process has seen.
    pub reloads: Option<u32>,
    /// The master's count of failed reloads (`[failed: N]`).
    pub failed_reloads: Option<u32>,
    pub uptime: Option<String>,
    pub version: Option<String>,
}

/// The whole process list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProcList {
    pub master: Option<ProcEntry>,
    pub workers: Vec<ProcEntry>,
    pub old_workers: Vec<ProcEntry>,
    pub programs: Vec<ProcEntry>,
}

#[derive(Clone, Copy)]
enum Section {
    Top,
    Workers,
    OldWorkers,
    Programs,
    Unknown,
}

fn failed_marker(i: &str) -> nom::IResult<&str, u32> {
    delimited(
        char('['),
        preceded((tag("failed:"), space0), dec_u32),
        char(']'),
    )
    .parse(i)
}

fn entry(line: &str) -> Result<ProcEntry, String> {
    let mut words = line.split_whitespace().peekable();
    let pid = words
        .next()
        .and_then(|w| w.parse::<u32>().ok())
        .ok_or_else(|| format!("expected a pid first, got {line:?}"))?;
    let kind = words
        .next()
        .ok_or_else(|| format!("no process type after pid {pid}"))?
        .to_string();
    let reloads = words.peek().and_then(|w| w.parse::<u32>().ok());
    if reloads.is_some() {
        words.next();
    }
    let mut failed_reloads = None;
    if let Some(w) = words.peek().copied() {
        if w.starts_with('[') {
            // `[failed: 0]` spans two words.
            let mut joined = words.next().unwrap_or_default().to_string();
            if !joined.ends_with(']') {
                if let Some(next) = words.next() {
                    joined.push(' ');
                    joined.push_str(next);
                }
            }
            let (_, n) = failed_marker(&joined)
                .map_err(|_| format!("expected `[failed: N]`, got {joined:?}"))?;
            failed_reloads = Some(n);
        }
    }
    let uptime = words.next().map(str::to_string);
    let version = words.next().map(str::to_string);
    Ok(ProcEntry {
        pid,
        kind,
        reloads,
        failed_reloads,
        uptime,
        version,
    })
}

/// Parses a whole master CLI `show proc` answer.
pub fn parse_show_proc(text: &str) -> Result<ProcList, ParseError> {
    let mut list = ProcList::default();
    let mut section = Section::Top;
    let mut saw_header = false;
    for (n, line) in content_lines(text) {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if let Some(title) = trimmed.strip_prefix('#') {
            let title = title.trim();
            if title.starts_with("<PID>") {
                saw_header = true;
                continue;
            }
            section = match title {
                "workers" => Section::Workers,
                "old workers" => Section::OldWorkers,
                "programs" => Section::Programs,
                // Newer versions may add sections; skip their rows rather than misfile them.
                _ => Section::Unknown,
            };
            continue;
        }
        if !saw_header {
            return Err(ParseError::new(
                n,
                format!("expected the `#<PID> <type> ...` header, got {line:?}"),
            ));
        }
        let e = entry(trimmed).map_err(|d| ParseError::new(n, d))?;
        match section {
            Section::Top if e.kind == "master" => list.master = Some(e),
            Section::Top | Section::Unknown => {}
            Section::Workers => list.workers.push(e),
            Section::OldWorkers => list.old_workers.push(e),
            Section::Programs => list.programs.push(e),
        }
    }
    if !saw_header {
        return Err(ParseError::new(
            0,
            "no `#<PID>` header: not a `show proc` answer",
        ));
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "#<PID>          <type>          <reloads>       <uptime>        <version>      \n2034            master          1 [failed: 0]   0d00h00m16s     2.6.12-1+deb12u4\n# workers\n2090            worker          0               0d00h00m02s     2.6.12-1+deb12u4\n# old workers\n2035            worker          1               0d00h00m16s     2.6.12-1+deb12u4\n# programs\n\n";

    #[test]
    fn reads_sections() {
        let p = parse_show_proc(SAMPLE).unwrap();
        let m = p.master.unwrap();
        assert_eq!(
            (m.pid, m.reloads, m.failed_reloads),
            (2034, Some(1), Some(0))
        );
        assert_eq!(m.uptime.as_deref(), Some("0d00h00m16s"));
        assert_eq!(p.workers.len(), 1);
        assert_eq!(p.workers[0].pid, 2090);
        assert_eq!(p.workers[0].version.as_deref(), Some("2.6.12-1+deb12u4"));
        assert_eq!(p.old_workers[0].pid, 2035);
        assert!(p.programs.is_empty());
    }

    #[test]
    fn rejects_other_text() {
        assert!(parse_show_proc("").is_err());
        assert!(parse_show_proc("Unknown command\n").is_err());
        assert!(parse_show_proc("#<PID> <type>\nabc worker\n").is_err());
        assert!(parse_show_proc("#<PID> <type>\n1 master 0 [failed: x] 0d 2.6\n").is_err());
    }
}
