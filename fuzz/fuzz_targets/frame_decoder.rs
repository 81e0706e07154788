//! Feeds arbitrary bytes to the frame parser and to every body decoder, the
//! way the server reads a socket: frame after frame until the bytes run out
//! or the framing breaks. Any panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stockd_protocol::{parse_frame, Request, Response, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((h, body))) = parse_frame(rest) {
        if let Ok(req) = Request::decode(h.opcode, body) {
            // What decodes must encode back to the same bytes.
            let mut again = Vec::new();
            req.encode(h.request_id, &mut again);
            assert_eq!(&again[HEADER_LEN..], body);
        }
        let _ = Response::decode(h.opcode | 0x80, body);
        rest = &rest[HEADER_LEN + h.body_len..];
    }
});
