//! Time as lbagent reads and writes it: the wall clock in whole Unix seconds (request timestamps,
//! the agent's start time), and durations as flags and settings give them. One home each, so a
//! clock set before 1970 means the same (0) everywhere, and every duration flag takes the same
//! forms.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch; 0 if the system clock is set before it.
pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Now as Unix milliseconds: when a heartbeat was received, as agents tell each other.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Parses a duration as every flag and setting takes it: humantime text (`90s`, `1m30s`,
/// `500ms`, `2h`) or, for settings files and scripts written before durations had units, a
/// bare number of seconds (`300`, `0.5`). The error quotes the text; the caller (clap, the
/// settings file) adds which flag or key it was.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let bare_seconds = !t.is_empty()
        && t.chars().all(|c| c.is_ascii_digit() || c == '.')
        && t.chars().filter(|&c| c == '.').count() <= 1
        && t != ".";
    let parsed = if bare_seconds {
        // As f64 read them before: `2.` and `.5` are numbers too.
        let (whole, fraction) = t.split_once('.').unwrap_or((t, ""));
        let whole = if whole.is_empty() { "0" } else { whole };
        let fraction = if fraction.is_empty() { "0" } else { fraction };
        humantime::parse_duration(&format!("{whole}.{fraction}s"))
    } else {
        humantime::parse_duration(t)
    };
    parsed.map_err(|e| {
        format!("{text:?} is not a duration ({e}): write it like 90s, 1m30s or 500ms, or as a number of seconds")
    })
}

/// A duration flag or setting: [`parse_duration`]'s forms, on the command line (clap uses its
/// [`FromStr`]) and in the TOML settings file (a string, `"90s"`, or a number of seconds, `90`
/// or `0.5`). Shown the way humantime writes it (`1m 30s`).
///
/// A new duration flag is an `Option<DurationSetting>` field of the daemon's `Settings` (named
/// in its `merge`), resolved with [`DurationSetting::within`] and a default:
///
/// ```
/// # use std::time::Duration;
/// # use lbagent::clock::DurationSetting;
/// let given: Option<DurationSetting> = Some("1m30s".parse().unwrap());
/// let lease = given
///     .unwrap_or(DurationSetting(Duration::from_secs(60)))
///     .within("--lease", Duration::from_secs(1)..=Duration::from_secs(3600))
///     .unwrap();
/// assert_eq!(lease, Duration::from_secs(90));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DurationSetting(pub Duration);

impl DurationSetting {
    /// The duration if it lies in `range`; else an error naming the setting (`name`, e.g.
    /// `--auth-window`), the value and the range.
    pub fn within(
        self,
        name: &str,
        range: std::ops::RangeInclusive<Duration>,
    ) -> Result<Duration, String> {
        if range.contains(&self.0) {
            Ok(self.0)
        } else {
            Err(format!(
                "{name} {self} is out of range: it must be from {} to {}",
                DurationSetting(*range.start()),
                DurationSetting(*range.end())
            ))
        }
    }
}

impl FromStr for DurationSetting {
    type Err = String;
    fn from_str(text: &str) -> Result<DurationSetting, String> {
        parse_duration(text).map(DurationSetting)
    }
}

impl fmt::Display for DurationSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl From<DurationSetting> for Duration {
    fn from(d: DurationSetting) -> Duration {
        d.0
    }
}

impl<'de> serde::Deserialize<'de> for DurationSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurationVisitor)
    }
}

struct DurationVisitor;

impl DurationVisitor {
    fn seconds<E: serde::de::Error>(
        n: f64,
        shown: &dyn fmt::Display,
    ) -> Result<DurationSetting, E> {
        Duration::try_from_secs_f64(n)
            .map(DurationSetting)
            .map_err(|_| {
                E::custom(format!(
                    "{shown} is not a duration: a number of seconds must be 0 or more"
                ))
            })
    }
}

impl serde::de::Visitor<'_> for DurationVisitor {
    type Value = DurationSetting;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration like \"90s\", \"1m30s\" or \"500ms\", or a number of seconds")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DurationSetting, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<DurationSetting, E> {
        Ok(DurationSetting(Duration::from_secs(v)))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<DurationSetting, E> {
        match u64::try_from(v) {
            Ok(s) => Ok(DurationSetting(Duration::from_secs(s))),
            Err(_) => Self::seconds(v as f64, &v),
        }
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<DurationSetting, E> {
        Self::seconds(v, &v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humantime_forms_and_bare_seconds() {
        let cases = [
            ("90s", Duration::from_secs(90)),
            ("1m30s", Duration::from_secs(90)),
            ("1m 30s", Duration::from_secs(90)),
            ("500ms", Duration::from_millis(500)),
            ("2h", Duration::from_secs(7200)),
            ("1.5s", Duration::from_millis(1500)),
            ("300", Duration::from_secs(300)),
            ("0.5", Duration::from_millis(500)),
            ("2.", Duration::from_secs(2)),
            (".5", Duration::from_millis(500)),
            (" 2 ", Duration::from_secs(2)),
            ("0", Duration::ZERO),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text:?}");
            assert_eq!(text.parse::<DurationSetting>(), Ok(DurationSetting(want)));
        }
    }

    #[test]
    fn bad_text_is_quoted() {
        for bad in ["", "x", "5x", "-1", "-1s", "1..2", ".", "1,5s", "s"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.starts_with(&format!("{bad:?} is not a duration")), "{e}");
            assert!(e.contains("90s"), "{e}");
        }
    }

    #[test]
    fn toml_strings_and_numbers() {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "kebab-case")]
        struct S {
            window: Option<DurationSetting>,
        }
        let of = |text: &str| toml::from_str::<S>(text).map(|s| s.window);
        assert_eq!(
            of("window = \"90s\"").unwrap(),
            Some(DurationSetting(Duration::from_secs(90)))
        );
        assert_eq!(
            of("window = 300").unwrap(),
            Some(DurationSetting(Duration::from_secs(300)))
        );
        assert_eq!(
            of("window = 2.5").unwrap(),
            Some(DurationSetting(Duration::from_millis(2500)))
        );
        assert_eq!(of("").unwrap(), None);
        for (bad, says) in [
            ("window = \"5x\"", "\"5x\" is not a duration"),
            ("window = -1", "-1 is not a duration"),
            ("window = -0.5", "-0.5 is not a duration"),
            ("window = true", "a duration like"),
        ] {
            let e = of(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
            // toml shows the line, so the message names the key.
            assert!(e.contains("window"), "{bad}: {e}");
        }
    }

    #[test]
    fn within_names_the_setting() {
        let d: DurationSetting = "50ms".parse().unwrap();
        assert_eq!(
            d.within(
                "--reconcile-interval",
                Duration::from_millis(100)..=Duration::from_secs(3600)
            ),
            Err(
                "--reconcile-interval 50ms is out of range: it must be from 100ms to 1h"
                    .to_string()
            )
        );
        assert_eq!(
            d.within("--x", Duration::ZERO..=Duration::from_secs(1)),
            Ok(Duration::from_millis(50))
        );
        assert_eq!(
            DurationSetting(Duration::from_secs(90)).to_string(),
            "1m 30s"
        );
    }
}
