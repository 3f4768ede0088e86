//! The checkpoint frame decoder on arbitrary bytes: it never panics, and whatever it
//! accepts encodes back to the same bytes (so nothing is accepted half-read).
#![no_main]

use avail_statepoint::frame;
use libfuzzer_sys::fuzz_target;

fn check(data: &[u8]) {
    if let Ok(f) = frame::decode(data) {
        let again = frame::encode(&f).expect("a decoded frame encodes");
        assert_eq!(again, data, "decode then encode gives the same bytes");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // The same bytes with the checksum made right, so the fuzzer gets past it into the
    // header and payload parser.
    if data.len() >= 4 {
        let mut fixed = data.to_vec();
        let n = fixed.len();
        let crc = crc32fast::hash(&fixed[..n - 4]);
        fixed[n - 4..].copy_from_slice(&crc.to_le_bytes());
        check(&fixed);
    }
    // A frame that starts the buffer: its length is known or "read more", never a panic.
    let _ = frame::frame_len(data);
});
