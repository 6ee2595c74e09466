//! Feeds any bytes to every runtime-API parser and to the framing parser. A panic anywhere is a
//! bug (the parsers promise never to panic); so is framing that finds a different answer when
//! resumed after a partial read.

#![no_main]

use libfuzzer_sys::fuzz_target;

use lbagent::runtime::parse::{
    parse_frame, parse_frame_from, parse_servers_state, parse_show_backend, parse_show_info,
    parse_show_proc, parse_show_stat, parse_status, resume_point, Frame,
};
use lbagent::runtime::{Name, Outcome, ServerRef};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();

    let _ = parse_show_stat(text);
    let _ = parse_servers_state(text);
    let _ = parse_show_info(text);
    let _ = parse_show_backend(text);
    let _ = parse_show_proc(text);
    let status = parse_status(text);
    assert_eq!(status.text, text);
    let _ = status.summary();
    assert_eq!(Outcome::of_action(text).text, text);
    assert_eq!(Outcome::of_query("# name\n", text).text, text);
    let _ = Name::new("name", text);
    let _ = ServerRef::parse(text);

    for prompt in [&b"> "[..], b"master> "] {
        let whole = parse_frame(data, prompt, 1 << 20);
        if let Frame::Complete { body_len, consumed } = whole {
            assert!(body_len <= consumed && consumed <= data.len());
            assert_eq!(&data[body_len..consumed], prompt);
        }
        // Resuming after a partial read at any cut must find the same answer.
        for cut in [
            1,
            data.len() / 3,
            data.len() / 2,
            data.len().saturating_sub(1),
        ] {
            let cut = cut.min(data.len());
            if parse_frame(&data[..cut], prompt, 1 << 20) == Frame::Partial {
                let from = resume_point(cut, prompt);
                assert_eq!(parse_frame_from(data, prompt, 1 << 20, from), whole);
            }
        }
        let _ = parse_frame(data, prompt, data.len() / 2);
    }
});
