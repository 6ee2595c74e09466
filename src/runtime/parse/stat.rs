//! `show stat`: CSV, one row per frontend, backend, server and listener, read by its `# ` header.
//!
//! Each HAProxy version adds columns (2.6 has about 100, 3.x many more), and string fields are
//! CSV-quoted when they hold a comma or a quote (`csv_enc()` in HAProxy's `tools.c`), so the
//! header decides which column is which and quoted fields are unquoted.

use std::borrow::Cow;

use nom::bytes::complete::take_till;
use nom::character::complete::char;
use nom::{IResult, Parser};
use serde::Serialize;

use super::status::{parse_status, Status};
use super::{opt_num, opt_str, ParseError};

/// What a row of `show stat` describes (`type` column: 0, 1, 2, 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyKind {
    Frontend,
    Backend,
    Server,
    Listener,
}

/// One row of `show stat`, typed. A field is `None` when HAProxy left it empty or this
/// version has no such column.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatRow {
    /// `pxname`: the frontend or backend.
    pub proxy: String,
    /// `svname`: `FRONTEND`, `BACKEND`, a server or a listener name.
    pub name: String,
    pub kind: ProxyKind,
    pub status: Option<Status>,
    /// `weight`: the effective weight (for a backend, the sum of its servers').
    pub weight: Option<u32>,
    /// `uweight`: the weight the user set (2.4+).
    pub user_weight: Option<u32>,
    pub sessions_current: Option<u64>,
    pub sessions_max: Option<u64>,
    pub sessions_limit: Option<u64>,
    pub sessions_total: Option<u64>,
    pub bytes_in: Option<u64>,
    pub bytes_out: Option<u64>,
    /// `act` / `bck`: whether the server is active or backup (for a backend, how many are).
    pub active: Option<u32>,
    pub backup: Option<u32>,
    /// `lastchg`: seconds since the last status change.
    pub last_change_s: Option<u64>,
    pub downtime_s: Option<u64>,
    /// `check_status`, e.g. `L4OK`, `L4CON`, `L7STS`; `*` prefix while a check runs.
    pub check_status: Option<String>,
    pub check_code: Option<u32>,
    pub check_desc: Option<String>,
    /// `addr`: `ip:port` of a server (or a listener).
    pub addr: Option<String>,
    pub mode: Option<String>,
    pub algo: Option<String>,
    /// `iid`, `sid`: HAProxy's numeric proxy and server ids.
    pub proxy_id: Option<u32>,
    pub server_id: Option<u32>,
    /// `rate`: sessions per second over the last second.
    pub session_rate: Option<u64>,
}

/// Indexes of the columns we read, found from the header.
#[derive(Default)]
struct Columns {
    pxname: Option<usize>,
    svname: Option<usize>,
    type_: Option<usize>,
    status: Option<usize>,
    weight: Option<usize>,
    uweight: Option<usize>,
    scur: Option<usize>,
    smax: Option<usize>,
    slim: Option<usize>,
    stot: Option<usize>,
    bin: Option<usize>,
    bout: Option<usize>,
    act: Option<usize>,
    bck: Option<usize>,
    lastchg: Option<usize>,
    downtime: Option<usize>,
    check_status: Option<usize>,
    check_code: Option<usize>,
    check_desc: Option<usize>,
    addr: Option<usize>,
    mode: Option<usize>,
    algo: Option<usize>,
    iid: Option<usize>,
    sid: Option<usize>,
    rate: Option<usize>,
}

impl Columns {
    /// How many leading fields of a row hold every column read.
    fn needed(&self) -> usize {
        [
            self.pxname,
            self.svname,
            self.type_,
            self.status,
            self.weight,
            self.uweight,
            self.scur,
            self.smax,
            self.slim,
            self.stot,
            self.bin,
            self.bout,
            self.act,
            self.bck,
            self.lastchg,
            self.downtime,
            self.check_status,
            self.check_code,
            self.check_desc,
            self.addr,
            self.mode,
            self.algo,
            self.iid,
            self.sid,
            self.rate,
        ]
        .into_iter()
        .flatten()
        .max()
        .map_or(0, |i| i + 1)
    }

    fn from_header(names: &[Cow<'_, str>]) -> Columns {
        let mut c = Columns::default();
        for (i, name) in names.iter().enumerate() {
            let slot = match name.as_ref() {
                "pxname" => &mut c.pxname,
                "svname" => &mut c.svname,
                "type" => &mut c.type_,
                "status" => &mut c.status,
                "weight" => &mut c.weight,
                "uweight" => &mut c.uweight,
                "scur" => &mut c.scur,
                "smax" => &mut c.smax,
                "slim" => &mut c.slim,
                "stot" => &mut c.stot,
                "bin" => &mut c.bin,
                "bout" => &mut c.bout,
                "act" => &mut c.act,
                "bck" => &mut c.bck,
                "lastchg" => &mut c.lastchg,
                "downtime" => &mut c.downtime,
                "check_status" => &mut c.check_status,
                "check_code" => &mut c.check_code,
                "check_desc" => &mut c.check_desc,
                "addr" => &mut c.addr,
                "mode" => &mut c.mode,
                "algo" => &mut c.algo,
                "iid" => &mut c.iid,
                "sid" => &mut c.sid,
                "rate" => &mut c.rate,
                _ => continue,
            };
            // First occurrence wins: some versions repeat a name (or use `-`) further right.
            if slot.is_none() {
                *slot = Some(i);
            }
        }
        c
    }
}

/// A quoted CSV field: `"a ""b"", c"` → `a "b", c`.
fn quoted_field(i: &str) -> IResult<&str, String> {
    let (mut rest, _) = char('"').parse(i)?;
    let mut out = String::new();
    loop {
        let (r, chunk) = take_till(|c| c == '"').parse(rest)?;
        out.push_str(chunk);
        let (r, _) = char('"').parse(r)?;
        match r.strip_prefix('"') {
            // A doubled quote is a quote inside the field.
            Some(r) => {
                out.push('"');
                rest = r;
            }
            None => return Ok((r, out)),
        }
    }
}

/// Splits one CSV line into `out`. Unquoted fields borrow from the line.
///
/// Stops after `limit` fields: a 2.6 row has 129 fields, mostly empty, and the ones read are
/// all in the first hundred.
fn split_fields<'a>(
    line: &'a str,
    out: &mut Vec<Cow<'a, str>>,
    limit: usize,
) -> Result<(), String> {
    out.clear();
    let bytes = line.as_bytes();
    if memchr::memchr(b'"', bytes).is_none() {
        // The common case, and the hot loop of the parser: memchr finds the commas.
        let mut start = 0;
        for comma in memchr::memchr_iter(b',', bytes) {
            if out.len() + 1 >= limit {
                break;
            }
            out.push(Cow::Borrowed(&line[start..comma]));
            start = comma + 1;
        }
        if out.len() < limit {
            let end = memchr::memchr(b',', &bytes[start..]).map_or(line.len(), |i| start + i);
            out.push(Cow::Borrowed(&line[start..end]));
        }
        return Ok(());
    }
    let mut rest = line;
    loop {
        if out.len() >= limit {
            return Ok(());
        }
        if rest.starts_with('"') {
            let (after, field) = quoted_field(rest)
                .map_err(|_| format!("unterminated quoted field at {:?}", excerpt(rest)))?;
            out.push(Cow::Owned(field));
            rest = after;
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            out.push(Cow::Borrowed(&rest[..end]));
            rest = &rest[end..];
        }
        match rest.strip_prefix(',') {
            Some(r) => rest = r,
            None if rest.is_empty() => return Ok(()),
            None => return Err(format!("text after a quoted field: {:?}", excerpt(rest))),
        }
    }
}

fn excerpt(s: &str) -> &str {
    let mut end = s.len().min(40);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The CSV records of an answer with their first line numbers. A record ends at a newline
/// outside quotes: HAProxy quotes a string field holding a line break (`csv_enc()`) and keeps
/// the break inside the quotes, so a record can span lines.
struct Records<'a> {
    rest: &'a str,
    line: usize,
}

impl<'a> Iterator for Records<'a> {
    type Item = (usize, &'a str);

    fn next(&mut self) -> Option<(usize, &'a str)> {
        if self.rest.is_empty() {
            return None;
        }
        let bytes = self.rest.as_bytes();
        let mut end = 0;
        let mut quotes = 0;
        loop {
            match memchr::memchr(b'\n', &bytes[end..]) {
                Some(i) => {
                    let piece = &bytes[end..end + i];
                    if memchr::memchr(b'"', piece).is_some() {
                        quotes += memchr::memchr_iter(b'"', piece).count();
                    }
                    end += i;
                    if quotes % 2 == 0 {
                        break;
                    }
                    // Inside a quoted field: the newline belongs to it.
                    end += 1;
                }
                None => {
                    end = bytes.len();
                    break;
                }
            }
        }
        let record = &self.rest[..end];
        let line = self.line;
        self.line += 1 + memchr::memchr_iter(b'\n', record.as_bytes()).count();
        self.rest = &self.rest[(end + 1).min(self.rest.len())..];
        Some((line, record.strip_suffix('\r').unwrap_or(record)))
    }
}

/// Parses a whole `show stat` answer.
pub fn parse_show_stat(text: &str) -> Result<Vec<StatRow>, ParseError> {
    let mut lines = Records {
        rest: text,
        line: 1,
    }
    .filter(|(_, r)| !r.is_empty());
    let header = match lines.next() {
        Some((_, l)) => l,
        None => {
            return Err(ParseError::new(
                0,
                "empty answer, expected a `# pxname,...` header",
            ))
        }
    };
    let header = header.strip_prefix("# ").ok_or_else(|| {
        ParseError::new(
            1,
            format!(
                "expected a `# pxname,...` header, got {:?}",
                excerpt(header)
            ),
        )
    })?;
    let mut names = Vec::new();
    split_fields(header, &mut names, usize::MAX).map_err(|e| ParseError::new(1, e))?;
    let cols = Columns::from_header(&names);
    let (Some(px_i), Some(sv_i)) = (cols.pxname, cols.svname) else {
        return Err(ParseError::new(1, "header has no pxname or svname column"));
    };
    let limit = cols.needed();

    let mut rows = Vec::new();
    let mut fields = Vec::with_capacity(names.len());
    for (n, line) in lines {
        if line.is_empty() {
            continue;
        }
        split_fields(line, &mut fields, limit).map_err(|e| ParseError::new(n, e))?;
        let get = |i: Option<usize>| -> &str {
            match i {
                Some(i) => fields.get(i).map(|f| f.as_ref()).unwrap_or(""),
                None => "",
            }
        };
        let (Some(proxy), Some(name)) = (fields.get(px_i), fields.get(sv_i)) else {
            return Err(ParseError::new(
                n,
                format!(
                    "row has {} fields, fewer than the header names",
                    fields.len()
                ),
            ));
        };
        let kind = match get(cols.type_) {
            "0" => ProxyKind::Frontend,
            "1" => ProxyKind::Backend,
            "2" => ProxyKind::Server,
            "3" => ProxyKind::Listener,
            "" => match name.as_ref() {
                "FRONTEND" => ProxyKind::Frontend,
                "BACKEND" => ProxyKind::Backend,
                _ => ProxyKind::Server,
            },
            other => {
                return Err(ParseError::new(n, format!("unknown row type {other:?}")));
            }
        };
        let status = get(cols.status);
        rows.push(StatRow {
            proxy: proxy.to_string(),
            name: name.to_string(),
            kind,
            status: if status.is_empty() {
                None
            } else {
                Some(parse_status(status))
            },
            weight: opt_num(get(cols.weight)),
            user_weight: opt_num(get(cols.uweight)),
            sessions_current: opt_num(get(cols.scur)),
            sessions_max: opt_num(get(cols.smax)),
            sessions_limit: opt_num(get(cols.slim)),
            sessions_total: opt_num(get(cols.stot)),
            bytes_in: opt_num(get(cols.bin)),
            bytes_out: opt_num(get(cols.bout)),
            active: opt_num(get(cols.act)),
            backup: opt_num(get(cols.bck)),
            last_change_s: opt_num(get(cols.lastchg)),
            downtime_s: opt_num(get(cols.downtime)),
            check_status: opt_str(get(cols.check_status)),
            check_code: opt_num(get(cols.check_code)),
            check_desc: opt_str(get(cols.check_desc)),
            addr: opt_str(get(cols.addr)),
            mode: opt_str(get(cols.mode)),
            algo: opt_str(get(cols.algo)),
            proxy_id: opt_num(get(cols.iid)),
            server_id: opt_num(get(cols.sid)),
            session_rate: opt_num(get(cols.rate)),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::parse::StatusState;

    #[test]
    fn reads_by_header_not_position() {
        // Columns in an unusual order, one quoted field with a comma and a quote.
        let text = "# svname,status,pxname,type,weight,check_desc,addr\n\
                    FRONTEND,OPEN,fe_1,0,,,\n\
                    s1,UP 1/3,be_1,2,7,\"Layer7 \"\"wrong\"\", status\",10.0.0.1:80\n\
                    BACKEND,UP,be_1,1,7,,\n\n";
        let rows = parse_show_stat(text).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].kind, ProxyKind::Frontend);
        assert_eq!(rows[0].proxy, "fe_1");
        let s1 = &rows[1];
        assert_eq!(s1.name, "s1");
        assert_eq!(s1.kind, ProxyKind::Server);
        assert_eq!(s1.weight, Some(7));
        assert_eq!(s1.check_desc.as_deref(), Some("Layer7 \"wrong\", status"));
        assert_eq!(s1.addr.as_deref(), Some("10.0.0.1:80"));
        let st = s1.status.as_ref().unwrap();
        assert_eq!((st.state, st.progress), (StatusState::Up, Some((1, 3))));
        assert_eq!(rows[2].kind, ProxyKind::Backend);
        assert_eq!(rows[1].sessions_current, None);
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(parse_show_stat("").unwrap_err().line, 0);
        assert_eq!(parse_show_stat("pxname,svname\n").unwrap_err().line, 1);
        assert!(parse_show_stat("# a,b\nx,y\n").is_err());
        let e = parse_show_stat("# pxname,svname,type\nfe,FRONTEND,0\n\"bad,x\n").unwrap_err();
        assert_eq!(e.line, 3);
        let e = parse_show_stat("# pxname,svname,type\nfe\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = parse_show_stat("# pxname,svname,type\nfe,x,9\n").unwrap_err();
        assert!(e.detail.contains("type"));
    }

    #[test]
    fn quoted_line_break_stays_in_its_field() {
        let text = "# pxname,svname,type,check_desc,scur\nbe,s1,2,\"two\nlines\",7\nbe,s2,2,,1\n\n";
        let rows = parse_show_stat(text).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].check_desc.as_deref(), Some("two\nlines"));
        assert_eq!(rows[0].sessions_current, Some(7));
        assert_eq!(rows[1].name, "s2");
        // Line numbers still count physical lines.
        let bad = "# pxname,svname,type\nbe,s1,2\nbe,\"x\ny\",2\nbe,s3,9\n";
        assert_eq!(parse_show_stat(bad).unwrap_err().line, 5);
    }

    #[test]
    fn header_only_is_no_rows() {
        assert!(parse_show_stat("# pxname,svname\n\n").unwrap().is_empty());
    }
}
