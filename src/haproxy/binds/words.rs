//! HAProxy's line tokenizer, as its configuration manual's section 2.2 and 2.3 describe it:
//! words split on unprotected spaces and tabs, `#` starts a comment, backslash escapes, weak
//! (`"..."`, environment variables expanded) and strong (`'...'`) quoting.

use std::ops::Range;

/// One word of a line, unquoted and unescaped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Word {
    pub text: String,
    /// Where in `text` (byte ranges, empty for a variable expanded to nothing) an environment
    /// variable could not be resolved for sure: what HAProxy made of those parts is unknown.
    pub uncertain: Vec<Range<usize>>,
}

impl Word {
    pub fn is_uncertain(&self) -> bool {
        !self.uncertain.is_empty()
    }
}

/// What an environment variable holds, as far as the caller knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Value(String),
    /// Not set in HAProxy's environment: HAProxy expands it to nothing (or to its default).
    Unset,
    /// HAProxy's environment could not be read; the agent's own has this value, which may or
    /// may not be HAProxy's: used, and the word marked unresolved.
    Guess(String),
    /// Not known: HAProxy's environment could not be read and the agent's lacks it (a default,
    /// `${NAME-default}`, is used, and the word marked unresolved: HAProxy may have a value).
    Unknown,
}

/// Splits one line into words, expanding the variables in double quotes with `env`. A quote
/// left open takes the rest of the line, as HAProxy refuses such a line anyway.
pub fn split(line: &str, env: &dyn Fn(&str) -> Lookup) -> Vec<Word> {
    let mut words = Vec::new();
    let mut cur: Option<Word> = None;
    let mut chars = line.chars().peekable();
    #[derive(PartialEq)]
    enum Quote {
        None,
        Weak,
        Strong,
    }
    let mut quote = Quote::None;
    fn word(cur: &mut Option<Word>) -> &mut Word {
        cur.get_or_insert_with(|| Word {
            text: String::new(),
            uncertain: Vec::new(),
        })
    }
    while let Some(c) = chars.next() {
        match (c, &quote) {
            ('\'', Quote::Strong) => quote = Quote::None,
            (c, Quote::Strong) => word(&mut cur).text.push(c),
            ('\'', Quote::None) => {
                word(&mut cur);
                quote = Quote::Strong;
            }
            ('"', Quote::Weak) => quote = Quote::None,
            ('"', Quote::None) => {
                word(&mut cur);
                quote = Quote::Weak;
            }
            ('#', Quote::None) => break,
            (' ' | '\t' | '\r' | '\n', Quote::None) => {
                if let Some(w) = cur.take() {
                    words.push(w);
                }
            }
            ('\\', _) => {
                let w = word(&mut cur);
                match chars.next() {
                    Some('n') => w.text.push('\n'),
                    Some('r') => w.text.push('\r'),
                    Some('t') => w.text.push('\t'),
                    Some('x') => {
                        let hex: String = chars.clone().take(2).collect();
                        match u8::from_str_radix(&hex, 16) {
                            Ok(b) if hex.len() == 2 => {
                                chars.next();
                                chars.next();
                                w.text.push(char::from(b));
                            }
                            _ => w.text.push_str("\\x"),
                        }
                    }
                    Some(c @ (' ' | '\t' | '#' | '\\' | '\'' | '"' | '$')) => w.text.push(c),
                    Some(c) => {
                        w.text.push('\\');
                        w.text.push(c);
                    }
                    None => w.text.push('\\'),
                }
            }
            ('$', Quote::Weak) if starts_variable(chars.peek().copied()) => {
                let (name, default, split_list) = variable(&mut chars);
                let (value, unresolved) = match env(&name) {
                    Lookup::Value(v) => (v, false),
                    Lookup::Guess(v) => (v, true),
                    Lookup::Unset => (default.unwrap_or_default(), false),
                    Lookup::Unknown => (default.unwrap_or_default(), true),
                };
                let push = |w: &mut Word, text: &str| {
                    let start = w.text.len();
                    w.text.push_str(text);
                    if unresolved {
                        w.uncertain.push(start..w.text.len());
                    }
                };
                let w = word(&mut cur);
                if split_list {
                    // `${LIST[*]}`: one word per space-separated item.
                    let mut items = value.split_whitespace().peekable();
                    if items.peek().is_none() {
                        push(w, "");
                    }
                    while let Some(item) = items.next() {
                        push(word(&mut cur), item);
                        if items.peek().is_some() {
                            words.extend(cur.take());
                        }
                    }
                } else {
                    push(w, &value);
                }
            }
            (c, _) => word(&mut cur).text.push(c),
        }
    }
    words.extend(cur);
    words
}

fn starts_variable(c: Option<char>) -> bool {
    c.is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '{' || c == '.')
}

/// Reads a variable after its `$`: its name, its default (`${NAME-default}`) and whether it
/// is a list to split (`${NAME[*]}`).
fn variable(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
) -> (String, Option<String>, bool) {
    let braced = chars.next_if_eq(&'{').is_some();
    let mut name = String::new();
    while let Some(c) = chars.next_if(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.') {
        name.push(c);
    }
    if !braced {
        return (name, None, false);
    }
    let mut default = None;
    let mut split_list = false;
    if chars.next_if_eq(&'-').is_some() {
        let mut d = String::new();
        while let Some(c) = chars.next_if(|c| *c != '}') {
            d.push(c);
        }
        default = Some(d);
    } else if chars.clone().take(3).collect::<String>() == "[*]" {
        chars.nth(2);
        split_list = true;
    }
    chars.next_if_eq(&'}');
    (name, default, split_list)
}
