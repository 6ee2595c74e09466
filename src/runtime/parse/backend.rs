//! `show backend`: a `# name` header and one backend name per line.

use super::{content_lines, ParseError};

/// Parses a whole `show backend` answer into backend names.
pub fn parse_show_backend(text: &str) -> Result<Vec<String>, ParseError> {
    let mut lines = content_lines(text);
    match lines.next() {
        Some((_, "# name")) => {}
        Some((n, other)) => {
            return Err(ParseError::new(
                n,
                format!("expected the `# name` header, got {other:?}"),
            ))
        }
        None => return Err(ParseError::new(0, "empty answer, expected `# name`")),
    }
    let mut names = Vec::new();
    for (n, line) in lines {
        if line.is_empty() {
            continue;
        }
        if line.contains(char::is_whitespace) {
            return Err(ParseError::new(
                n,
                format!("a backend name has no spaces: {line:?}"),
            ));
        }
        names.push(line.to_string());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            parse_show_backend("# name\nbe_1\nbe_2\n\n").unwrap(),
            vec!["be_1", "be_2"]
        );
        assert!(parse_show_backend("# name\n\n").unwrap().is_empty());
        assert!(parse_show_backend("No such\n").is_err());
        assert!(parse_show_backend("# name\na b\n").is_err());
    }
}
