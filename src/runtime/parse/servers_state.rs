//! `show servers state [backend]`: a format-version line (`1`), a `# ` header, then one
//! space-separated row per server, read by the header's column names.
//!
//! The states are HAProxy's internal numbers: `srv_op_state` is `enum srv_state` and
//! `srv_admin_state` is the decimal value of the `SRV_ADMF_*` flags (`include/haproxy/server-t.h`).

use nom::bytes::complete::{tag, take_while1};
use nom::character::complete::{space0, space1};
use nom::combinator::all_consuming;
use nom::multi::separated_list1;
use nom::sequence::{delimited, preceded};
use nom::{IResult, Parser};
use serde::Serialize;

use super::{content_lines, opt_num, opt_str, ParseError};

/// `srv_op_state`: what health checks say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OperState {
    /// 0: down.
    Stopped,
    /// 1: coming up (slowstart or checks passing).
    Starting,
    /// 2: up.
    Running,
    /// 3: going down (soft-stop or checks failing).
    Stopping,
}

impl OperState {
    fn from_code(code: u8) -> Option<OperState> {
        Some(match code {
            0 => OperState::Stopped,
            1 => OperState::Starting,
            2 => OperState::Running,
            3 => OperState::Stopping,
            _ => return None,
        })
    }
}

/// `srv_admin_state`: the `SRV_ADMF_*` flags, as HAProxy prints them (decimal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct AdminFlags(pub u32);

impl AdminFlags {
    /// Forced maintenance (`set server state maint`, and every new dynamic server).
    pub const FMAINT: u32 = 0x01;
    /// Maintenance inherited from a tracked server.
    pub const IMAINT: u32 = 0x02;
    /// Maintenance from the configuration (`disabled`).
    pub const CMAINT: u32 = 0x04;
    /// Forced drain (`set server state drain`).
    pub const FDRAIN: u32 = 0x08;
    /// Drain inherited from a tracked server.
    pub const IDRAIN: u32 = 0x10;
    /// Maintenance because DNS resolution failed.
    pub const RMAINT: u32 = 0x20;
    /// `SRV_ADMF_HMAINT` up to 3.0; 3.2 reuses the bit for "FQDN changed", which is no
    /// maintenance, so [`Self::in_maintenance`] ignores it.
    pub const HMAINT: u32 = 0x40;
    /// HAProxy's own `SRV_ADMF_MAINT` mask: FMAINT | IMAINT | RMAINT. Not CMAINT: HAProxy keeps
    /// that as a marker on a server the config starts `disabled` even after
    /// `set server state ready|drain` lifts the maintenance (2.6: `disabled` shows 5, then
    /// `drain` 12 — `show stat` says DRAIN — and `ready` 4, UP).
    const ANY_MAINT: u32 = Self::FMAINT | Self::IMAINT | Self::RMAINT;
    const ANY_DRAIN: u32 = Self::FDRAIN | Self::IDRAIN;

    pub fn in_maintenance(self) -> bool {
        self.0 & Self::ANY_MAINT != 0
    }

    pub fn draining(self) -> bool {
        self.0 & Self::ANY_DRAIN != 0
    }
}

/// One server's row of `show servers state`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServerState {
    pub backend_id: Option<u32>,
    pub backend: String,
    pub server_id: Option<u32>,
    pub server: String,
    pub addr: Option<String>,
    /// `None` when the number is not one HAProxy defines.
    pub oper_state: Option<OperState>,
    pub admin: AdminFlags,
    /// `srv_uweight`: the weight in use; `srv_iweight`: the configured one.
    pub user_weight: Option<u32>,
    pub initial_weight: Option<u32>,
    pub last_change_s: Option<u64>,
    pub check_status: Option<u32>,
    pub check_result: Option<u32>,
    pub check_health: Option<u32>,
    pub check_state: Option<u32>,
    pub agent_state: Option<u32>,
    pub fqdn: Option<String>,
    pub port: Option<u16>,
    pub use_ssl: Option<bool>,
    pub check_port: Option<u16>,
}

/// `srv_check_state` bits (HAProxy's `CHK_ST_*`).
const CHECK_IN_PROGRESS: u32 = 0x01;
const CHECK_ENABLED: u32 = 0x04;
const CHECK_PAUSED: u32 = 0x08;

/// `srv_check_status` codes (HAProxy's `HCHK_STATUS_*`, the same from 2.6 to 3.2) as `show
/// stat` names them.
const CHECK_STATUS_NAMES: [&str; 21] = [
    "UNK", "INI", "", "CHECKED", "HANA", "SOCKERR", "L4OK", "L4TOUT", "L4CON", "L6OK", "L6TOUT",
    "L6RSP", "L7TOUT", "L7RSP", "", "L7OK", "L7OKC", "L7STS", "PROCERR", "PROCTOUT", "PROCOK",
];

impl ServerState {
    /// What `show stat`'s `status` column would sum up to ([`super::Status::summary`]): MAINT,
    /// DOWN, DRAIN, NOLB or UP. From this row alone, so a reader can skip `show stat`, which
    /// at 10,000 servers is about four times the bytes and HAProxy's time.
    pub fn status_summary(&self) -> &'static str {
        if self.admin.in_maintenance() {
            "MAINT"
        } else if self.oper_state == Some(OperState::Stopped) {
            "DOWN"
        } else if self.admin.draining() {
            "DRAIN"
        } else if self.oper_state == Some(OperState::Stopping) {
            "NOLB"
        } else {
            "UP"
        }
    }

    /// `show stat`'s `check_status` column: the last check's result (`L4OK`, `L4CON`...), with
    /// `* ` while a check runs; `None` for a server without checks, or with them disabled
    /// (a new dynamic server before `enable health`) or paused (maintenance).
    pub fn check_status_name(&self) -> Option<String> {
        let state = self.check_state?;
        if state & CHECK_ENABLED == 0 || state & CHECK_PAUSED != 0 {
            return None;
        }
        let name = CHECK_STATUS_NAMES.get(self.check_status? as usize)?;
        Some(if state & CHECK_IN_PROGRESS != 0 {
            format!("* {name}")
        } else {
            name.to_string()
        })
    }
}

fn format_version(i: &str) -> IResult<&str, &str> {
    all_consuming(delimited(
        space0,
        take_while1(|c: char| c.is_ascii_digit()),
        space0,
    ))
    .parse(i)
}

fn header(i: &str) -> IResult<&str, Vec<&str>> {
    all_consuming(delimited(
        preceded(tag("#"), space0),
        separated_list1(space1, take_while1(|c: char| !c.is_whitespace())),
        space0,
    ))
    .parse(i)
}

/// Parses a whole `show servers state` answer (all backends, or one).
pub fn parse_servers_state(text: &str) -> Result<Vec<ServerState>, ParseError> {
    let mut lines = content_lines(text);
    let Some((n, first)) = lines.next() else {
        return Err(ParseError::new(
            0,
            "empty answer, expected the format version line `1`",
        ));
    };
    let version = format_version(first).map(|(_, v)| v).map_err(|_| {
        ParseError::new(
            n,
            format!("expected the format version line, got {first:?}"),
        )
    })?;
    if version != "1" {
        return Err(ParseError::new(
            n,
            format!("format version {version} is not supported (only 1)"),
        ));
    }
    let Some((n, head)) = lines.next() else {
        // Version line alone: no backend has servers.
        return Ok(Vec::new());
    };
    let (_, names) = header(head).map_err(|_| {
        ParseError::new(n, format!("expected a `# be_id ...` header, got {head:?}"))
    })?;
    let col = |name: &str| names.iter().position(|c| *c == name);
    let (Some(be_name), Some(srv_name), Some(admin)) =
        (col("be_name"), col("srv_name"), col("srv_admin_state"))
    else {
        return Err(ParseError::new(
            n,
            "header lacks be_name, srv_name or srv_admin_state",
        ));
    };
    let idx = ServerStateColumns {
        be_id: col("be_id"),
        srv_id: col("srv_id"),
        srv_addr: col("srv_addr"),
        op: col("srv_op_state"),
        uweight: col("srv_uweight"),
        iweight: col("srv_iweight"),
        lastchg: col("srv_time_since_last_change"),
        check_status: col("srv_check_status"),
        check_result: col("srv_check_result"),
        check_health: col("srv_check_health"),
        check_state: col("srv_check_state"),
        agent_state: col("srv_agent_state"),
        fqdn: col("srv_fqdn"),
        port: col("srv_port"),
        use_ssl: col("srv_use_ssl"),
        check_port: col("srv_check_port"),
    };

    let mut out = Vec::new();
    let mut fields: Vec<&str> = Vec::with_capacity(names.len());
    for (n, line) in lines {
        if line.is_empty() {
            continue;
        }
        fields.clear();
        fields.extend(line.split(' ').filter(|f| !f.is_empty()));
        if fields.len() < names.len() {
            return Err(ParseError::new(
                n,
                format!(
                    "row has {} fields, the header names {}",
                    fields.len(),
                    names.len()
                ),
            ));
        }
        let get = |i: Option<usize>| i.and_then(|i| fields.get(i).copied()).unwrap_or("");
        let admin_raw = fields[admin];
        let admin_flags = admin_raw.parse::<u32>().map_err(|_| {
            ParseError::new(
                n,
                format!("srv_admin_state {admin_raw:?} is not a decimal number"),
            )
        })?;
        out.push(ServerState {
            backend_id: opt_num(get(idx.be_id)),
            backend: fields[be_name].to_string(),
            server_id: opt_num(get(idx.srv_id)),
            server: fields[srv_name].to_string(),
            addr: opt_str(get(idx.srv_addr)),
            oper_state: opt_num::<u8>(get(idx.op)).and_then(OperState::from_code),
            admin: AdminFlags(admin_flags),
            user_weight: opt_num(get(idx.uweight)),
            initial_weight: opt_num(get(idx.iweight)),
            last_change_s: opt_num(get(idx.lastchg)),
            check_status: opt_num(get(idx.check_status)),
            check_result: opt_num(get(idx.check_result)),
            check_health: opt_num(get(idx.check_health)),
            check_state: opt_num(get(idx.check_state)),
            agent_state: opt_num(get(idx.agent_state)),
            fqdn: opt_str(get(idx.fqdn)),
            port: opt_num(get(idx.port)),
            use_ssl: opt_num::<u8>(get(idx.use_ssl)).map(|v| v != 0),
            check_port: opt_num(get(idx.check_port)),
        });
    }
    Ok(out)
}

struct ServerStateColumns {
    be_id: Option<usize>,
    srv_id: Option<usize>,
    srv_addr: Option<usize>,
    op: Option<usize>,
    uweight: Option<usize>,
    iweight: Option<usize>,
    lastchg: Option<usize>,
    check_status: Option<usize>,
    check_result: Option<usize>,
    check_health: Option<usize>,
    check_state: Option<usize>,
    agent_state: Option<usize>,
    fqdn: Option<usize>,
    port: Option<usize>,
    use_ssl: Option<usize>,
    check_port: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n3 be_1 1 s1 127.0.0.1 0 8 1 1 102 8 2 0 6 0 0 0 - 18999 - 0 0 - - 0\n3 be_1 3 s3 ::1 2 1 10 1 117 1 0 0 2 0 0 0 - 1 - 0 0 - - 0\n\n";

    #[test]
    fn reads_rows() {
        let rows = parse_servers_state(SAMPLE).unwrap();
        assert_eq!(rows.len(), 2);
        let s1 = &rows[0];
        assert_eq!((s1.backend.as_str(), s1.server.as_str()), ("be_1", "s1"));
        assert_eq!(s1.oper_state, Some(OperState::Stopped));
        assert!(s1.admin.draining() && !s1.admin.in_maintenance());
        assert_eq!(s1.port, Some(18999));
        assert_eq!(s1.fqdn, None);
        let s3 = &rows[1];
        assert_eq!(s3.addr.as_deref(), Some("::1"));
        assert!(s3.admin.in_maintenance());
        assert_eq!(s3.user_weight, Some(10));
        assert_eq!(s3.oper_state, Some(OperState::Running));
    }

    #[test]
    fn config_disabled_marker_alone_is_not_maintenance() {
        assert!(AdminFlags(5).in_maintenance()); // `disabled` in the config
        assert!(!AdminFlags(4).in_maintenance()); // then `set server state ready`
        assert!(!AdminFlags(12).in_maintenance() && AdminFlags(12).draining()); // then `drain`
        assert!(AdminFlags(2).in_maintenance()); // tracking a server in maintenance
        assert!(AdminFlags(0x20).in_maintenance()); // DNS resolution
        assert!(!AdminFlags(0x40).in_maintenance()); // 3.2: FQDN changed
    }

    #[test]
    fn rejects_wrong_shapes() {
        assert_eq!(parse_servers_state("").unwrap_err().line, 0);
        assert!(parse_servers_state("2\n# be_id\n")
            .unwrap_err()
            .detail
            .contains("version 2"));
        assert!(parse_servers_state("# be_id\n").is_err());
        assert!(parse_servers_state("1\nbe_id be_name\n").is_err());
        let short = "1\n# be_name srv_name srv_admin_state\nbe s\n";
        assert_eq!(parse_servers_state(short).unwrap_err().line, 3);
        let hex = "1\n# be_name srv_name srv_admin_state\nbe s 0x1\n";
        assert!(parse_servers_state(hex)
            .unwrap_err()
            .detail
            .contains("decimal"));
        assert!(parse_servers_state("1\n").unwrap().is_empty());
    }
}
