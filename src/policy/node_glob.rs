//! Node-name patterns of a scoped key (`nodes = "node-*,edge-?"`): comma-separated
//! alternatives of node-name characters with `*` (any run, also empty) and `?` (one character).

use std::fmt;
use std::str::FromStr;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Matched by globset (one automaton for all the alternatives, linear in the name's length);
/// only `*` and `?` are let through to it, so its richer syntax (`[..]`, `{..}`, `\`) never
/// applies and a pattern means the same to an operator reading it as to the matcher.
#[derive(Clone)]
pub struct NodeGlob {
    set: GlobSet,
    text: String,
}

impl NodeGlob {
    /// Whether `node` matches one of the alternatives (case-sensitive, as node names are).
    pub fn is_match(&self, node: &str) -> bool {
        self.set.is_match(node)
    }
}

impl FromStr for NodeGlob {
    type Err = String;
    fn from_str(s: &str) -> Result<NodeGlob, String> {
        let mut set = GlobSetBuilder::new();
        for item in s.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(format!("empty pattern in {s:?}"));
            }
            if item.len() > 63 {
                return Err(format!(
                    "pattern {item:?} is longer than a node name (63 characters)"
                ));
            }
            if let Some(c) = item
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '*' | '?')))
            {
                return Err(format!(
                    "pattern {item:?} contains {c:?}; allowed are node-name characters \
                     (letters, digits, '.', '_', '-'), '*' and '?'"
                ));
            }
            let glob = GlobBuilder::new(item)
                .literal_separator(false)
                .backslash_escape(false)
                .build()
                .map_err(|e| format!("pattern {item:?}: {e}"))?;
            set.add(glob);
        }
        let set = set.build().map_err(|e| format!("{s:?}: {e}"))?;
        Ok(NodeGlob {
            set,
            text: s.to_string(),
        })
    }
}

impl fmt::Display for NodeGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for NodeGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeGlob({:?})", self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn glob(s: &str) -> NodeGlob {
        s.parse().unwrap()
    }

    #[test]
    fn star_question_and_alternatives() {
        let g = glob("node-*");
        assert!(g.is_match("node-a") && g.is_match("node-") && g.is_match("node-a.b_c-d"));
        assert!(!g.is_match("node") && !g.is_match("xnode-a") && !g.is_match("Node-a"));
        let g = glob("edge-?");
        assert!(g.is_match("edge-1") && !g.is_match("edge-") && !g.is_match("edge-12"));
        let g = glob("node-*, edge-?,exact");
        assert!(g.is_match("node-7") && g.is_match("edge-x") && g.is_match("exact"));
        assert!(!g.is_match("exactly") && !g.is_match("edge-xy"));
        assert!(glob("*").is_match("anything.at-all"));
        assert!(glob("a*b*c").is_match("a-b-c") && !glob("a*b*c").is_match("a-c-b"));
        assert_eq!(glob("node-*, edge-?").to_string(), "node-*, edge-?");
    }

    #[test]
    fn refuses_what_is_not_a_node_pattern() {
        for (bad, needle) in [
            ("", "empty"),
            ("a,,b", "empty"),
            ("node-[ab]", "'['"),
            ("node-{a,b}", "'{'"),
            ("node\\*", "'\\\\'"),
            ("node/a", "'/'"),
            ("node a", "' '"),
        ] {
            let e = bad.parse::<NodeGlob>().unwrap_err();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
        assert!("x".repeat(64).parse::<NodeGlob>().is_err());
    }

    /// The plain meaning of `*` and `?`, by dynamic programming, to check globset against.
    fn reference(pattern: &[u8], name: &[u8]) -> bool {
        let mut m = vec![vec![false; name.len() + 1]; pattern.len() + 1];
        m[0][0] = true;
        for i in 1..=pattern.len() {
            m[i][0] = m[i - 1][0] && pattern[i - 1] == b'*';
            for j in 1..=name.len() {
                m[i][j] = match pattern[i - 1] {
                    b'*' => m[i - 1][j] || m[i][j - 1],
                    b'?' => m[i - 1][j - 1],
                    c => m[i - 1][j - 1] && c == name[j - 1],
                };
            }
        }
        m[pattern.len()][name.len()]
    }

    proptest! {
        /// Over node names (`NodeName` wants a letter or digit first). Not over `.` and `..`:
        /// globset takes its candidates as paths, and those two have no file name, so a
        /// pattern such as `?.` does not match `..`; neither is a node name.
        #[test]
        fn matches_like_the_plain_definition(
            pattern in "[ab.*?-]{1,8}",
            name in "[ab][ab.-]{0,9}",
        ) {
            prop_assert_eq!(
                glob(&pattern).is_match(&name),
                reference(pattern.as_bytes(), name.as_bytes()),
                "pattern {:?} name {:?}", pattern, name
            );
        }
    }
}
