//! HAProxy's environment as its configuration sees it while it is read: the process's own,
//! changed by the `setenv`, `presetenv`, `unsetenv` and `resetenv` lines of `global` sections
//! as HAProxy meets them, across files in load order. A `bind "${PORT}"` after `setenv PORT
//! 8443` listens on 8443 whatever the process was started with.

use std::collections::{HashMap, HashSet};

use super::words::{Lookup, Word};

/// The environment while the files are read: the process's (`base`), and what the files
/// changed so far.
pub struct Env<'a> {
    base: &'a dyn Fn(&str) -> Lookup,
    /// Names the files set (`Some`) or unset (`None`).
    changed: HashMap<String, Option<Lookup>>,
    /// After a `resetenv`: the only names of `base` left; every other one is unset.
    kept: Option<HashSet<String>>,
    /// A `resetenv` inside an `.if` block: whether `base`'s names are left is not known.
    reset_maybe: bool,
}

impl<'a> Env<'a> {
    pub fn new(base: &'a dyn Fn(&str) -> Lookup) -> Env<'a> {
        Env {
            base,
            changed: HashMap::new(),
            kept: None,
            reset_maybe: false,
        }
    }

    /// What `name` holds now.
    pub fn get(&self, name: &str) -> Lookup {
        if let Some(changed) = self.changed.get(name) {
            return changed.clone().unwrap_or(Lookup::Unset);
        }
        if self.kept.as_ref().is_some_and(|k| !k.contains(name)) {
            return Lookup::Unset;
        }
        let base = (self.base)(name);
        if !self.reset_maybe {
            return base;
        }
        match base {
            Lookup::Value(v) | Lookup::Guess(v) => Lookup::Guess(v),
            Lookup::Unset | Lookup::Unknown => Lookup::Unknown,
        }
    }

    /// Applies one `global` line whose first word is `keyword`, if it is one that changes the
    /// environment. `conditional`: the line is inside an `.if` block, whose condition the
    /// agent does not evaluate, so what it changes becomes uncertain.
    pub fn apply(&mut self, keyword: &str, words: &[Word], conditional: bool) {
        let args: Vec<&str> = words.iter().skip(1).map(|w| w.text.as_str()).collect();
        let value = || {
            let w = words.get(2)?;
            Some(if w.is_uncertain() || conditional {
                Lookup::Guess(w.text.clone())
            } else {
                Lookup::Value(w.text.clone())
            })
        };
        match keyword {
            "setenv" => {
                if let (Some(name), Some(v)) = (args.first(), value()) {
                    self.changed.insert(name.to_string(), Some(v));
                }
            }
            "presetenv" => {
                // Only when unset; when that is not known, the value is not either.
                if let (Some(name), Some(v)) = (args.first(), value()) {
                    match self.get(name) {
                        Lookup::Unset => {
                            self.changed.insert(name.to_string(), Some(v));
                        }
                        Lookup::Unknown => {
                            let text = words[2].text.clone();
                            self.changed
                                .insert(name.to_string(), Some(Lookup::Guess(text)));
                        }
                        Lookup::Value(_) | Lookup::Guess(_) => {}
                    }
                }
            }
            "unsetenv" => {
                for name in args {
                    let now = if conditional {
                        Some(Lookup::Unknown)
                    } else {
                        None
                    };
                    self.changed.insert(name.to_string(), now);
                }
            }
            "resetenv" => {
                let keep: HashSet<String> = args.iter().map(|a| a.to_string()).collect();
                if conditional {
                    for (name, v) in self.changed.iter_mut() {
                        if !keep.contains(name) {
                            *v = Some(Lookup::Unknown);
                        }
                    }
                    self.reset_maybe = true;
                    return;
                }
                self.changed.retain(|name, _| keep.contains(name));
                let kept = match self.kept.take() {
                    Some(before) => keep.into_iter().filter(|k| before.contains(k)).collect(),
                    None => keep,
                };
                self.kept = Some(kept);
            }
            _ => {}
        }
    }
}
