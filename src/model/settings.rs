//! A frontend's settings: the PROXY protocol its servers are sent, their health check, the
//! frontend's and backend's timeouts, its connection cap. Plain data, validated once where it
//! comes in ([`RawSettings::validate`], also for what the store reads back), so nothing
//! unchecked reaches the config file or a runtime command.
//!
//! A value left unset is HAProxy's default (an unset timeout is the `defaults` section's);
//! one set to HAProxy's default is stored unset ([`FrontendSettings::normalized`]), so "rise 2"
//! and nothing are the same settings and changing one into the other is no change.
//!
//! How a change of settings reaches HAProxy is decided here too ([`how_to_apply`]): the
//! frontend's `maxconn` and the servers' check port change live; the PROXY version, the check's
//! kind and timing and the timeouts are in the config file only, so they need a reload.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The PROXY protocol header HAProxy sends each server before a connection's bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    None,
    V1,
    V2,
}

impl ProxyProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyProtocol::None => "none",
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        }
    }

    /// The server keyword (`send-proxy`, `send-proxy-v2`), if any.
    pub fn server_keyword(self) -> Option<&'static str> {
        match self {
            ProxyProtocol::None => None,
            ProxyProtocol::V1 => Some("send-proxy"),
            ProxyProtocol::V2 => Some("send-proxy-v2"),
        }
    }

    fn parse(text: &str) -> Option<ProxyProtocol> {
        match text {
            "none" => Some(ProxyProtocol::None),
            "v1" => Some(ProxyProtocol::V1),
            "v2" => Some(ProxyProtocol::V2),
            _ => None,
        }
    }
}

/// A duration setting in whole milliseconds, from 1 ms to 24 h, written the way the sidecar's
/// flags and HAProxy both read it: `500ms`, `2s`, `1m`, `1h` (the largest unit that is exact).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Millis(u32);

impl Millis {
    /// 24 hours.
    pub const MAX: u32 = 24 * 3_600_000;

    /// Parses `text` in [`crate::clock::parse_duration`]'s forms, with a unit: a bare number
    /// means seconds to lbagent's flags but milliseconds to HAProxy, so it is refused rather
    /// than guessed.
    pub fn parse(text: &str) -> Result<Millis, String> {
        let t = text.trim();
        if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(format!(
                "{text:?} has no unit: write it like 500ms, 2s, 1m or 1h"
            ));
        }
        let d = crate::clock::parse_duration(t)?;
        let ms = d.as_millis();
        if d != std::time::Duration::from_millis(ms as u64) {
            return Err(format!("{text:?} is not a whole number of milliseconds"));
        }
        if ms == 0 || ms > u128::from(Millis::MAX) {
            return Err(format!("{text:?} must be from 1ms to 24h"));
        }
        Ok(Millis(ms as u32))
    }

    pub fn as_millis(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
            if ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for Millis {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The path of an HTTP health check: `/` then up to 254 characters a URL path and query may
/// hold, without `;`, quotes, `#`, `$`, backslashes, spaces or control characters, so it is one
/// word of HAProxy's config with nothing for its parser to interpret.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "String")]
pub struct HttpPath(String);

impl HttpPath {
    pub fn new(value: &str) -> Result<HttpPath, String> {
        if !value.starts_with('/') || value.len() > 255 {
            return Err(format!(
                "{value:?} must start with '/' and be at most 255 characters"
            ));
        }
        if let Some(c) = value.chars().find(|c| {
            !(c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    '/' | '-'
                        | '.'
                        | '_'
                        | '~'
                        | '?'
                        | '&'
                        | '='
                        | '%'
                        | ':'
                        | '@'
                        | '+'
                        | ','
                        | '!'
                        | '*'
                ))
        }) {
            return Err(format!(
                "{value:?} contains {c:?}; allowed are letters, digits and / - . _ ~ ? & = % : @ + , ! *"
            ));
        }
        Ok(HttpPath(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<HttpPath> for String {
    fn from(p: HttpPath) -> String {
        p.0
    }
}

/// HAProxy's defaults for a check's timing, which an unset value means.
pub const DEFAULT_INTERVAL: Millis = Millis(2000);
pub const DEFAULT_RISE: u8 = 2;
pub const DEFAULT_FALL: u8 = 3;

/// How HAProxy health-checks a frontend's servers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct HealthCheck {
    /// Where to check; unset: the server's traffic port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// An HTTP check (`GET` this path, 2xx or 3xx is up); unset: a TCP connect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_path: Option<HttpPath>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rise: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fall: Option<u8>,
}

impl HealthCheck {
    fn is_default(&self) -> bool {
        *self == HealthCheck::default()
    }

    /// `tcp` or `http`, as `lbctl` shows it.
    pub fn kind(&self) -> &'static str {
        if self.http_path.is_some() {
            "http"
        } else {
            "tcp"
        }
    }

    pub fn effective_interval(&self) -> Millis {
        self.interval.unwrap_or(DEFAULT_INTERVAL)
    }

    pub fn effective_rise(&self) -> u8 {
        self.rise.unwrap_or(DEFAULT_RISE)
    }

    pub fn effective_fall(&self) -> u8 {
        self.fall.unwrap_or(DEFAULT_FALL)
    }
}

/// The frontend's and backend's timeouts; unset: the `defaults` section's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Timeouts {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<Millis>,
}

impl Timeouts {
    fn is_default(&self) -> bool {
        *self == Timeouts::default()
    }
}

/// Most connections a frontend may be given.
pub const MAX_MAXCONN: u32 = 1_000_000;

/// A frontend's settings, as stored (normalized) and as a request gives them. In a request
/// inline in a server's PUT, a field left out is "not given" ([`Self::first_difference`]); in
/// `PUT /v1/frontends/{port}` and in the store it is the default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawSettings")]
pub struct FrontendSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    #[serde(skip_serializing_if = "HealthCheck::is_default")]
    pub check: HealthCheck,
    #[serde(skip_serializing_if = "Timeouts::is_default")]
    pub timeouts: Timeouts,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maxconn: Option<u32>,
}

/// A field whose given value differs from the frontend's: `field` by its path
/// (`check.port`), both values as shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    pub field: &'static str,
    pub existing: String,
    pub requested: String,
}

/// How a change of settings reaches HAProxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingsChange {
    Unchanged,
    /// Through the runtime API: `set maxconn frontend`, `set server check-port`.
    Runtime,
    /// Only a config file can say it: a reload, because of this field.
    Reload(&'static str),
}

fn shown<T: fmt::Display>(value: &Option<T>, unset: &str) -> String {
    value
        .as_ref()
        .map_or_else(|| unset.to_string(), |v| v.to_string())
}

impl FrontendSettings {
    pub fn is_default(&self) -> bool {
        *self == FrontendSettings::default()
    }

    pub fn proxy(&self) -> ProxyProtocol {
        self.proxy_protocol.unwrap_or_default()
    }

    /// The same settings with every value equal to HAProxy's default unset: the stored form.
    pub fn normalized(mut self) -> FrontendSettings {
        if self.proxy_protocol == Some(ProxyProtocol::None) {
            self.proxy_protocol = None;
        }
        let c = &mut self.check;
        if c.interval == Some(DEFAULT_INTERVAL) {
            c.interval = None;
        }
        if c.rise == Some(DEFAULT_RISE) {
            c.rise = None;
        }
        if c.fall == Some(DEFAULT_FALL) {
            c.fall = None;
        }
        self
    }

    /// The first field given in `self` (settings inline in a server's PUT) whose value
    /// differs from `current`'s, the frontend's. Unset values compare as their defaults.
    pub fn first_difference(&self, current: &FrontendSettings) -> Option<Difference> {
        let diff = |field, existing: String, requested: String| {
            (existing != requested).then_some(Difference {
                field,
                existing,
                requested,
            })
        };
        let (g, c) = (self, current);
        let traffic = "unset (the traffic port)";
        let tcp = "unset (a TCP check)";
        let inherited = "unset (the defaults section's)";
        let checks = [
            g.proxy_protocol.and_then(|p| {
                diff(
                    "proxy_protocol",
                    c.proxy().as_str().into(),
                    p.as_str().into(),
                )
            }),
            g.check
                .port
                .and_then(|p| diff("check.port", shown(&c.check.port, traffic), p.to_string())),
            g.check.http_path.as_ref().and_then(|p| {
                diff(
                    "check.http_path",
                    shown(&c.check.http_path.as_ref().map(|p| p.as_str()), tcp),
                    p.as_str().into(),
                )
            }),
            g.check.interval.and_then(|i| {
                diff(
                    "check.interval",
                    c.check.effective_interval().to_string(),
                    i.to_string(),
                )
            }),
            g.check.rise.and_then(|r| {
                diff(
                    "check.rise",
                    c.check.effective_rise().to_string(),
                    r.to_string(),
                )
            }),
            g.check.fall.and_then(|f| {
                diff(
                    "check.fall",
                    c.check.effective_fall().to_string(),
                    f.to_string(),
                )
            }),
            g.timeouts.client.and_then(|t| {
                diff(
                    "timeouts.client",
                    shown(&c.timeouts.client, inherited),
                    t.to_string(),
                )
            }),
            g.timeouts.server.and_then(|t| {
                diff(
                    "timeouts.server",
                    shown(&c.timeouts.server, inherited),
                    t.to_string(),
                )
            }),
            g.timeouts.tunnel.and_then(|t| {
                diff(
                    "timeouts.tunnel",
                    shown(&c.timeouts.tunnel, inherited),
                    t.to_string(),
                )
            }),
            g.timeouts.connect.and_then(|t| {
                diff(
                    "timeouts.connect",
                    shown(&c.timeouts.connect, inherited),
                    t.to_string(),
                )
            }),
            g.maxconn.and_then(|m| {
                diff(
                    "maxconn",
                    shown(&c.maxconn, "unset (HAProxy's default)"),
                    m.to_string(),
                )
            }),
        ];
        checks.into_iter().flatten().next()
    }
}

/// How going from `old` to `new` (both normalized) reaches HAProxy: live when only what the
/// runtime API can set differs (the frontend's `maxconn` to a value, the servers' check port
/// from one port to another), else a reload, naming the first field that needs it.
pub fn how_to_apply(old: &FrontendSettings, new: &FrontendSettings) -> SettingsChange {
    if old == new {
        return SettingsChange::Unchanged;
    }
    let reload_for = [
        ("proxy_protocol", old.proxy_protocol != new.proxy_protocol),
        (
            "check.http_path",
            old.check.http_path != new.check.http_path,
        ),
        ("check.interval", old.check.interval != new.check.interval),
        ("check.rise", old.check.rise != new.check.rise),
        ("check.fall", old.check.fall != new.check.fall),
        // To or from the traffic port: HAProxy keeps a check port set once (it follows the
        // traffic port only while never set), so only a change between two ports is live.
        (
            "check.port",
            old.check.port != new.check.port
                && (old.check.port.is_none() || new.check.port.is_none()),
        ),
        (
            "timeouts.client",
            old.timeouts.client != new.timeouts.client,
        ),
        (
            "timeouts.server",
            old.timeouts.server != new.timeouts.server,
        ),
        (
            "timeouts.tunnel",
            old.timeouts.tunnel != new.timeouts.tunnel,
        ),
        (
            "timeouts.connect",
            old.timeouts.connect != new.timeouts.connect,
        ),
        // Unset means "as the config says", which no runtime command can restore.
        (
            "maxconn",
            old.maxconn != new.maxconn && new.maxconn.is_none(),
        ),
    ];
    match reload_for.into_iter().find(|(_, differs)| *differs) {
        Some((field, _)) => SettingsChange::Reload(field),
        None => SettingsChange::Runtime,
    }
}

/// Why a settings value was refused: the field by its path and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidSetting {
    pub field: String,
    pub message: String,
}

/// Settings as JSON gives them: numbers wide and durations as text, so a wrong value is refused
/// by [`Self::validate`] with a message naming its field instead of a type error.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    #[serde(default)]
    pub proxy_protocol: Option<String>,
    #[serde(default)]
    pub check: Option<RawCheck>,
    #[serde(default)]
    pub timeouts: Option<RawTimeouts>,
    #[serde(default)]
    pub maxconn: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub http_path: Option<String>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub rise: Option<i64>,
    #[serde(default)]
    pub fall: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    #[serde(default)]
    pub client: Option<String>,
    #[serde(default)]
    pub server: Option<String>,
    #[serde(default)]
    pub tunnel: Option<String>,
    #[serde(default)]
    pub connect: Option<String>,
}

impl RawSettings {
    /// Checks every field; `prefix` goes before the field paths in messages (`frontend.` for
    /// settings inline in a server's PUT). Not normalized: a value given equal to its default
    /// is still given.
    pub fn validate(self, prefix: &str) -> Result<FrontendSettings, InvalidSetting> {
        let bad = |field: &str, message: String| InvalidSetting {
            field: format!("{prefix}{field}"),
            message,
        };
        let duration = |field: &str, text: Option<String>| {
            text.map(|t| Millis::parse(&t).map_err(|m| bad(field, m)))
                .transpose()
        };
        let in_range = |field: &str, value: Option<i64>, low: i64, high: i64| {
            value
                .map(|v| {
                    if (low..=high).contains(&v) {
                        Ok(v)
                    } else {
                        Err(bad(field, format!("{v} must be from {low} to {high}")))
                    }
                })
                .transpose()
        };
        let proxy_protocol = self
            .proxy_protocol
            .map(|p| {
                ProxyProtocol::parse(&p)
                    .ok_or_else(|| bad("proxy_protocol", format!("{p:?} must be none, v1 or v2")))
            })
            .transpose()?;
        let c = self.check.unwrap_or_default();
        let check = HealthCheck {
            port: in_range("check.port", c.port, 1, 65535)?.map(|p| p as u16),
            http_path: c
                .http_path
                .map(|p| HttpPath::new(&p).map_err(|m| bad("check.http_path", m)))
                .transpose()?,
            interval: duration("check.interval", c.interval)?,
            rise: in_range("check.rise", c.rise, 1, 100)?.map(|r| r as u8),
            fall: in_range("check.fall", c.fall, 1, 100)?.map(|f| f as u8),
        };
        let t = self.timeouts.unwrap_or_default();
        let timeouts = Timeouts {
            client: duration("timeouts.client", t.client)?,
            server: duration("timeouts.server", t.server)?,
            tunnel: duration("timeouts.tunnel", t.tunnel)?,
            connect: duration("timeouts.connect", t.connect)?,
        };
        let maxconn =
            in_range("maxconn", self.maxconn, 1, i64::from(MAX_MAXCONN))?.map(|m| m as u32);
        Ok(FrontendSettings {
            proxy_protocol,
            check,
            timeouts,
            maxconn,
        })
    }
}

impl TryFrom<RawSettings> for FrontendSettings {
    type Error = InvalidSetting;
    /// What the store reads back: checked like a request. (Not normalized: a change's inline
    /// settings are replayed as they were given; the state holds them normalized already.)
    fn try_from(raw: RawSettings) -> Result<FrontendSettings, InvalidSetting> {
        raw.validate("")
    }
}

/// Settings as `GET /v1/frontends` shows them: every value, defaults filled in where HAProxy's
/// are known (a check's timing), `null` where the `defaults` section decides.
#[derive(Clone, Debug, Serialize)]
pub struct SettingsView {
    pub proxy_protocol: ProxyProtocol,
    pub check: CheckView,
    pub timeouts: Timeouts,
    pub maxconn: Option<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckView {
    pub kind: &'static str,
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_path: Option<HttpPath>,
    pub interval: Millis,
    pub rise: u8,
    pub fall: u8,
}

impl From<&FrontendSettings> for SettingsView {
    fn from(s: &FrontendSettings) -> SettingsView {
        SettingsView {
            proxy_protocol: s.proxy(),
            check: CheckView {
                kind: s.check.kind(),
                port: s.check.port,
                http_path: s.check.http_path.clone(),
                interval: s.check.effective_interval(),
                rise: s.check.effective_rise(),
                fall: s.check.effective_fall(),
            },
            timeouts: s.timeouts.clone(),
            maxconn: s.maxconn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> RawSettings {
        serde_json::from_str(json).unwrap()
    }

    fn settings(json: &str) -> FrontendSettings {
        raw(json).validate("").unwrap().normalized()
    }

    #[test]
    fn durations_in_the_sidecars_forms() {
        for (text, ms, shown) in [
            ("500ms", 500, "500ms"),
            ("2s", 2000, "2s"),
            ("1m", 60_000, "1m"),
            ("1h", 3_600_000, "1h"),
            ("90s", 90_000, "90s"),
            ("1m30s", 90_000, "90s"),
            ("1500ms", 1500, "1500ms"),
            ("24h", Millis::MAX, "24h"),
            ("1ms", 1, "1ms"),
        ] {
            let m = Millis::parse(text).unwrap();
            assert_eq!(
                (m.as_millis(), m.to_string().as_str()),
                (ms, shown),
                "{text}"
            );
            assert_eq!(Millis::parse(&m.to_string()), Ok(m));
        }
        for bad in [
            "",
            "5",
            "0.5",
            "0ms",
            "25h",
            "1us",
            "x",
            "-1s",
            "2s;show info",
        ] {
            assert!(Millis::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn http_paths_are_one_plain_word() {
        for ok in [
            "/",
            "/healthz",
            "/ping?full=1&x=%20",
            "/a/b-c_d.e~f:g@h+i,j!k*",
        ] {
            assert!(HttpPath::new(ok).is_ok(), "{ok}");
        }
        let long = format!("/{}", "a".repeat(255));
        for bad in [
            "", "healthz", "/a b", "/a;b", "/a\nb", "/a#b", "/a\"b", "/a'b", "/a\\b", "/${X}",
            "/é", &long,
        ] {
            assert!(HttpPath::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_bad_value_names_its_field_by_path() {
        let cases = [
            (r#"{"proxy_protocol":"v3"}"#, "proxy_protocol"),
            (r#"{"check":{"port":0}}"#, "check.port"),
            (r#"{"check":{"port":65536}}"#, "check.port"),
            (r#"{"check":{"rise":0}}"#, "check.rise"),
            (r#"{"check":{"fall":101}}"#, "check.fall"),
            (r#"{"check":{"interval":"0ms"}}"#, "check.interval"),
            (r#"{"check":{"http_path":"healthz"}}"#, "check.http_path"),
            (r#"{"timeouts":{"client":"25h"}}"#, "timeouts.client"),
            (r#"{"timeouts":{"tunnel":"1"}}"#, "timeouts.tunnel"),
            (r#"{"maxconn":0}"#, "maxconn"),
            (r#"{"maxconn":1000001}"#, "maxconn"),
        ];
        for (json, field) in cases {
            let e = raw(json).validate("frontend.").unwrap_err();
            assert_eq!(e.field, format!("frontend.{field}"), "{json}: {e}");
            assert!(
                e.to_string().starts_with(&format!("frontend.{field}: ")),
                "{e}"
            );
        }
        for unknown in [
            r#"{"proxy":"v1"}"#,
            r#"{"check":{"path":"/"}}"#,
            r#"{"timeouts":{"idle":"1s"}}"#,
        ] {
            assert!(
                serde_json::from_str::<RawSettings>(unknown).is_err(),
                "{unknown}"
            );
        }
    }

    #[test]
    fn defaults_are_stored_unset_and_round_trip() {
        let s =
            settings(r#"{"proxy_protocol":"none","check":{"interval":"2s","rise":2,"fall":3}}"#);
        assert!(s.is_default(), "{s:?}");
        let s = settings(
            r#"{"proxy_protocol":"v2","check":{"port":32123,"http_path":"/healthz","interval":"500ms","rise":1,"fall":5},"timeouts":{"client":"1m","server":"1m","tunnel":"1h","connect":"5s"},"maxconn":1000}"#,
        );
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(
            text,
            r#"{"proxy_protocol":"v2","check":{"port":32123,"http_path":"/healthz","interval":"500ms","rise":1,"fall":5},"timeouts":{"client":"1m","server":"1m","tunnel":"1h","connect":"5s"},"maxconn":1000}"#
        );
        assert_eq!(serde_json::from_str::<FrontendSettings>(&text).unwrap(), s);
        // The store's copy is checked like a request.
        assert!(serde_json::from_str::<FrontendSettings>(r#"{"check":{"rise":0}}"#).is_err());
        assert_eq!(
            serde_json::to_string(&FrontendSettings::default()).unwrap(),
            "{}"
        );
    }

    #[test]
    fn inline_settings_compare_only_what_is_given() {
        let current = settings(r#"{"proxy_protocol":"v1","check":{"port":32123}}"#);
        let given = |json: &str| raw(json).validate("").unwrap();
        assert_eq!(given("{}").first_difference(&current), None);
        assert_eq!(
            given(r#"{"proxy_protocol":"v1"}"#).first_difference(&current),
            None
        );
        // A default given compares with the default unset.
        assert_eq!(
            given(r#"{"check":{"rise":2}}"#).first_difference(&current),
            None
        );
        let d = given(r#"{"proxy_protocol":"v2"}"#)
            .first_difference(&current)
            .unwrap();
        assert_eq!(
            (d.field, d.existing.as_str(), d.requested.as_str()),
            ("proxy_protocol", "v1", "v2")
        );
        let d = given(r#"{"timeouts":{"tunnel":"1h"}}"#)
            .first_difference(&current)
            .unwrap();
        assert_eq!(d.field, "timeouts.tunnel");
        assert!(d.existing.contains("defaults"), "{d:?}");
        let d = given(r#"{"check":{"port":32124}}"#)
            .first_difference(&current)
            .unwrap();
        assert_eq!((d.field, d.existing.as_str()), ("check.port", "32123"));
    }

    #[test]
    fn what_changes_live_and_what_needs_a_reload() {
        let base = settings(r#"{"check":{"port":32123},"maxconn":100}"#);
        let with = |json: &str| settings(json);
        assert_eq!(how_to_apply(&base, &base), SettingsChange::Unchanged);
        assert_eq!(
            how_to_apply(&base, &with(r#"{"check":{"port":32123},"maxconn":200}"#)),
            SettingsChange::Runtime
        );
        assert_eq!(
            how_to_apply(&base, &with(r#"{"check":{"port":32124},"maxconn":100}"#)),
            SettingsChange::Runtime
        );
        for (json, field) in [
            (
                r#"{"check":{"port":32123},"maxconn":100,"proxy_protocol":"v2"}"#,
                "proxy_protocol",
            ),
            (
                r#"{"check":{"port":32123,"http_path":"/"},"maxconn":100}"#,
                "check.http_path",
            ),
            (
                r#"{"check":{"port":32123,"rise":1},"maxconn":100}"#,
                "check.rise",
            ),
            (r#"{"maxconn":100}"#, "check.port"),
            (r#"{"check":{"port":32123}}"#, "maxconn"),
            (
                r#"{"check":{"port":32123},"maxconn":100,"timeouts":{"tunnel":"1h"}}"#,
                "timeouts.tunnel",
            ),
        ] {
            assert_eq!(
                how_to_apply(&base, &with(json)),
                SettingsChange::Reload(field),
                "{json}"
            );
        }
        assert_eq!(
            how_to_apply(&FrontendSettings::default(), &with(r#"{"maxconn":5}"#)),
            SettingsChange::Runtime
        );
    }

    #[test]
    fn the_view_fills_in_haproxys_defaults() {
        let v = serde_json::to_value(SettingsView::from(&FrontendSettings::default())).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"proxy_protocol":"none","check":{"kind":"tcp","port":null,"interval":"2s","rise":2,"fall":3},"timeouts":{},"maxconn":null})
        );
    }
}
