//! Framing of interactive (`prompt`) mode: where one answer ends in the byte stream.
//!
//! In prompt mode HAProxy ends every answer with a newline and the prompt (`> ` on a worker's
//! socket, `master> ` on the master CLI). Almost every answer's text ends with its own newline
//! too, giving the documented empty line; a few (HAProxy 2.6's `Only servers in maintenance mode
//! can be deleted.`) do not. The body kept is everything before the prompt, so it is the same
//! bytes the command prints in non-interactive mode.

/// What the start of a buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// One whole answer: its body (before the prompt) and how many bytes it took in the buffer.
    Complete { body_len: usize, consumed: usize },
    /// Not all of it has arrived yet.
    Partial,
    /// The bytes cannot be a HAProxy answer (over `max_len` without a prompt).
    Invalid(String),
}

/// Finds the first whole answer at the start of `buf`, given the prompt in use.
///
/// The answer ends at the first newline that is followed by the prompt. An answer that is only
/// the prompt (HAProxy's very first prompt after `prompt` on the master CLI) has an empty body.
pub fn parse_frame(buf: &[u8], prompt: &[u8], max_len: usize) -> Frame {
    parse_frame_from(buf, prompt, max_len, 0)
}

/// [`parse_frame`] that starts looking for the end at `scan_from`, for a caller that already
/// looked at the bytes before it (a long answer arrives in many reads; rescanning from the start
/// each time would make reading it quadratic). Where a scan stopped is [`resume_point`].
pub fn parse_frame_from(buf: &[u8], prompt: &[u8], max_len: usize, scan_from: usize) -> Frame {
    if scan_from == 0 && buf.starts_with(prompt) {
        return Frame::Complete {
            body_len: 0,
            consumed: prompt.len(),
        };
    }
    let mut from = scan_from.min(buf.len());
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]) {
        let nl = from + i;
        let after = &buf[nl + 1..];
        if after.len() < prompt.len() {
            // The prompt may still be on its way; decide when more has arrived, unless what we
            // have already differs from it.
            if prompt.starts_with(after) {
                break;
            }
        } else if after.starts_with(prompt) {
            return Frame::Complete {
                body_len: nl + 1,
                consumed: nl + 1 + prompt.len(),
            };
        }
        from = nl + 1;
    }
    if buf.len() > max_len {
        return Frame::Invalid(format!(
            "no prompt after {} bytes (limit {max_len})",
            buf.len()
        ));
    }
    Frame::Partial
}

/// Where the next [`parse_frame_from`] over a buffer that only grew may resume after a
/// [`Frame::Partial`]: just before the last `prompt.len() + 1` bytes, which may yet turn out to
/// be a terminator.
pub fn resume_point(buf_len: usize, prompt: &[u8]) -> usize {
    buf_len.saturating_sub(prompt.len() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &[u8] = b"> ";

    #[test]
    fn frames_answers_one_by_one() {
        let buf = b"No such server.\n\n> # name\nbe_1\n\n> \n> ";
        let Frame::Complete { body_len, consumed } = parse_frame(buf, P, 1024) else {
            panic!()
        };
        assert_eq!(&buf[..body_len], b"No such server.\n\n");
        let rest = &buf[consumed..];
        let Frame::Complete { body_len, consumed } = parse_frame(rest, P, 1024) else {
            panic!()
        };
        assert_eq!(&rest[..body_len], b"# name\nbe_1\n\n");
        let rest = &rest[consumed..];
        assert_eq!(
            parse_frame(rest, P, 1024),
            Frame::Complete {
                body_len: 1,
                consumed: 3
            }
        );
    }

    #[test]
    fn answer_without_empty_line() {
        let buf = b"Only servers in maintenance mode can be deleted.\n> ";
        let Frame::Complete { body_len, .. } = parse_frame(buf, P, 1024) else {
            panic!()
        };
        assert_eq!(
            &buf[..body_len],
            b"Only servers in maintenance mode can be deleted.\n"
        );
    }

    #[test]
    fn partial_until_prompt_arrives() {
        assert_eq!(parse_frame(b"# name\nbe", P, 1024), Frame::Partial);
        assert_eq!(parse_frame(b"# name\nbe_1\n\n", P, 1024), Frame::Partial);
        assert_eq!(parse_frame(b"# name\nbe_1\n\n>", P, 1024), Frame::Partial);
        assert_eq!(parse_frame(b"", P, 1024), Frame::Partial);
        assert!(matches!(
            parse_frame(&[b'x'; 2000], P, 1024),
            Frame::Invalid(_)
        ));
    }

    #[test]
    fn resuming_finds_the_same_end() {
        let full = b"# name\nbe_1\nbe_2\n\n> ".to_vec();
        for cut in 1..full.len() {
            let first = &full[..cut];
            let from = match parse_frame(first, P, 1024) {
                Frame::Partial => resume_point(first.len(), P),
                other => panic!("cut {cut}: {other:?}"),
            };
            assert_eq!(
                parse_frame_from(&full, P, 1024, from),
                Frame::Complete {
                    body_len: full.len() - 2,
                    consumed: full.len()
                },
                "cut {cut}"
            );
        }
    }

    #[test]
    fn master_prompt() {
        let p = b"master> ";
        assert_eq!(
            parse_frame(b"master> ", p, 64),
            Frame::Complete {
                body_len: 0,
                consumed: 8
            }
        );
        let buf = b"#<PID> <type>\n1 master\n\nmaster> ";
        let Frame::Complete { body_len, consumed } = parse_frame(buf, p, 1024) else {
            panic!()
        };
        assert_eq!(consumed, buf.len());
        assert_eq!(&buf[..body_len], b"#<PID> <type>\n1 master\n\n");
        // A line starting like the prompt but not the prompt is body.
        assert_eq!(parse_frame(b"a\nmaster: x\n", p, 1024), Frame::Partial);
    }
}
