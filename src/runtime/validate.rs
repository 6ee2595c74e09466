//! Checked values for runtime commands: nothing from outside reaches the socket unchecked.
//!
//! HAProxy's CLI splits a line on `;`, ends a command at a newline, splits arguments on spaces
//! and unescapes backslashes. A name carrying any of those could smuggle a second command, so
//! names are checked against what HAProxy itself accepts for proxy and server names
//! (`invalid_char()` in HAProxy's `tools.c`: letters, digits, `-`, `_`, `.`, `:`), and numbers and
//! addresses are parsed into typed values before they are written back out.

use std::fmt;
use std::net::IpAddr;

use super::error::{Error, Result};

/// Longest name accepted. HAProxy has no hard limit, but every name we send must fit easily in
/// one CLI line, and names from outside longer than this are surely a mistake.
pub const MAX_NAME_LEN: usize = 128;

/// A proxy (frontend, backend) or server name that is safe to write into a command.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    /// Checks `value` as the name of a `field` (used in the error message).
    pub fn new(field: &'static str, value: &str) -> Result<Name> {
        let reject = |reason| {
            Err(Error::InvalidArgument {
                field,
                value: value.to_string(),
                reason,
            })
        };
        if value.is_empty() {
            return reject("must not be empty");
        }
        if value.len() > MAX_NAME_LEN {
            return reject("is longer than 128 characters");
        }
        for c in value.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' | ':' => {}
                ';' => return reject("contains `;`, which separates runtime commands"),
                '\n' | '\r' => {
                    return reject("contains a line break, which ends a runtime command")
                }
                '\\' => return reject("contains a backslash, which escapes in runtime commands"),
                '/' => return reject("contains `/`, which separates backend and server"),
                c if c.is_whitespace() => {
                    return reject("contains whitespace, which separates arguments")
                }
                _ => {
                    return reject(
                        "may only contain letters, digits, `-`, `_`, `.` and `:` (HAProxy's rule)",
                    )
                }
            }
        }
        Ok(Name(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `backend/server`, the way the runtime API names a server.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServerRef {
    pub backend: Name,
    pub server: Name,
}

impl ServerRef {
    pub fn new(backend: &str, server: &str) -> Result<ServerRef> {
        Ok(ServerRef {
            backend: Name::new("backend name", backend)?,
            server: Name::new("server name", server)?,
        })
    }

    /// Parses `backend/server`.
    pub fn parse(value: &str) -> Result<ServerRef> {
        match value.split_once('/') {
            Some((b, s)) => ServerRef::new(b, s),
            None => Err(Error::InvalidArgument {
                field: "server",
                value: value.to_string(),
                reason: "must be written backend/server",
            }),
        }
    }
}

impl fmt::Display for ServerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.backend, self.server)
    }
}

/// A TCP port, 1–65535: the one check of a port from outside, in whatever form it came (a URL
/// path segment, a JSON number or string, a flag, an item of a port list). `value` is read
/// through its text, so `443`, `"443"` and `443u32` mean the same and every refusal reads
/// `invalid FIELD "VALUE": must be a port from 1 to 65535`.
pub fn port(field: &'static str, value: impl fmt::Display) -> Result<u16> {
    let text = value.to_string();
    match text.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(Error::InvalidArgument {
            field,
            value: text,
            reason: "must be a port from 1 to 65535",
        }),
    }
}

/// A number `add server` takes within `low..=high`; `reason` says the range in words.
pub fn in_range(
    field: &'static str,
    value: u64,
    (low, high): (u64, u64),
    reason: &'static str,
) -> Result<u64> {
    if (low..=high).contains(&value) {
        Ok(value)
    } else {
        Err(Error::InvalidArgument {
            field,
            value: value.to_string(),
            reason,
        })
    }
}

/// A server weight as `set server weight` and `add server weight` take it: 0–256.
pub fn weight(value: u32) -> Result<u16> {
    if value <= 256 {
        Ok(value as u16)
    } else {
        Err(Error::InvalidArgument {
            field: "weight",
            value: value.to_string(),
            reason: "must be from 0 to 256",
        })
    }
}

/// Parses an IPv4 or IPv6 address (no hostnames: a name would make HAProxy resolve at runtime).
pub fn ip(value: &str) -> Result<IpAddr> {
    value.parse().map_err(|_| Error::InvalidArgument {
        field: "address",
        value: value.to_string(),
        reason: "must be an IPv4 or IPv6 address",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_haproxy_names() {
        for ok in ["be_443", "node-a", "n.1", "a:b", "X"] {
            assert_eq!(Name::new("n", ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_injection_and_junk_with_a_reason() {
        let cases = [
            ("", "empty"),
            ("a;b", "`;`"),
            ("a\nshow info", "line break"),
            ("a\rb", "line break"),
            ("a b", "whitespace"),
            ("a\tb", "whitespace"),
            ("a\\;b", "backslash"),
            ("a/b", "`/`"),
            ("é", "letters"),
            ("a\u{0}", "letters"),
        ];
        for (bad, why) in cases {
            let err = Name::new("server name", bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(err.contains("server name"), "{err}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert!(Name::new("n", &long).is_err());
        assert!(Name::new("n", &long[1..]).is_ok());
    }

    #[test]
    fn numbers_and_addresses() {
        assert!(port("port", 0).is_err());
        assert!(port("port", 65536).is_err());
        assert_eq!(port("port", 443).unwrap(), 443);
        assert_eq!(port("port", " 443 ").unwrap(), 443);
        for bad in ["0", "65536", "-1", "x", "", "4.5", "1e3"] {
            let e = port("frontend_port", bad).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("invalid frontend_port {bad:?}: must be a port from 1 to 65535")
            );
        }
        assert!(port("port", -1i64).is_err());
        assert!(port("port", u64::MAX).is_err());
        assert!(weight(257).is_err());
        assert_eq!(weight(256).unwrap(), 256);
        assert!(ip("203.0.113.7").is_ok());
        assert!(ip("2001:db8::1").is_ok());
        assert!(ip("1.2.3.4;show info").is_err());
        assert!(ip("example.com").is_err());
    }

    #[test]
    fn server_ref_parse() {
        let r = ServerRef::parse("be_1/s1").unwrap();
        assert_eq!(r.to_string(), "be_1/s1");
        assert!(ServerRef::parse("be_1").is_err());
        assert!(ServerRef::parse("be/s/x").is_err());
    }
}
