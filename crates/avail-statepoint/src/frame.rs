//! The checkpoint frame: how a [`StateDelta`] travels from primary to secondary.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "AVCP"
//!      4     2  format version (1), little-endian like every integer here
//!      6     1  kind: 1 full image, 2 delta
//!      7     1  flags (0; reserved)
//!      8     8  pair generation (the fencing token)
//!     16     8  epoch number
//!     24     2  workload id length w (1..=253)
//!     26     w  workload id, UTF-8
//!   26+w     4  payload length p (<= MAX_PAYLOAD_BYTES)
//!   30+w     p  payload
//! 30+w+p     4  CRC-32 (IEEE) of every byte before it
//!
//! payload:
//!   u32 memory count (<= MAX_MEMORIES)
//!     per memory: u64 size in bytes, u32 page count, then per page u32 index + 4096 bytes
//!   u32 global count (<= MAX_GLOBALS)
//!     per global: u8 type (0 i32, 1 i64, 2 f32, 3 f64, 4 v128) + its bytes
//!   u32 host-state length + bytes
//! ```
//! The decoder checks the checksum before it looks at the payload, bounds every count
//! and length, and refuses trailing bytes: a torn or corrupt frame is rejected whole and
//! nothing of it is applied. It never panics on any input (property-tested, and fuzzed
//! in `fuzz/`).

use crate::PAGE_BYTES;
use crate::state::{GlobalValue, MemoryDelta, StateDelta};

/// Frame magic.
pub const MAGIC: &[u8; 4] = b"AVCP";
/// Format version written and read.
pub const VERSION: u16 = 1;
/// Largest payload accepted: 4 GiB of pages is the wasm32 limit; frames are capped lower.
pub const MAX_PAYLOAD_BYTES: u32 = 1 << 30;
/// Most memories in a frame.
pub const MAX_MEMORIES: u32 = 16;
/// Most globals in a frame.
pub const MAX_GLOBALS: u32 = 100_000;
/// Longest workload id, bytes.
pub const MAX_WORKLOAD_BYTES: usize = 253;
/// Bytes before the payload, without the workload id.
const FIXED_HEADER: usize = 30;

/// One checkpoint frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The workload it belongs to.
    pub workload: String,
    /// Pair generation: a secondary refuses frames of an older one.
    pub generation: u64,
    /// Epoch number: increases by one per checkpoint within a generation.
    pub epoch: u64,
    /// The state it carries.
    pub delta: StateDelta,
}

/// Why a frame was rejected.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the frame says it has (a torn frame).
    #[error("truncated frame: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// Not a checkpoint frame.
    #[error("bad magic")]
    Magic,
    /// A version this build does not read.
    #[error("unsupported frame version {0}")]
    Version(u16),
    /// The checksum does not match: corrupt.
    #[error("checksum mismatch")]
    Checksum,
    /// A field out of its bounds, or bytes left over.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// Too large to encode: the payload would be this many bytes.
    #[error("checkpoint of {0} bytes is larger than a frame may be ({MAX_PAYLOAD_BYTES})")]
    TooLarge(u64),
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn global_bytes(g: &GlobalValue) -> usize {
    1 + match g {
        GlobalValue::I32(_) | GlobalValue::F32(_) => 4,
        GlobalValue::I64(_) | GlobalValue::F64(_) => 8,
        GlobalValue::V128(_) => 16,
    }
}

/// The payload length `f` encodes to.
fn payload_len(f: &Frame) -> u64 {
    let mems: u64 = f
        .delta
        .memories
        .iter()
        .map(|m| 12 + m.pages.len() as u64 * (4 + PAGE_BYTES as u64))
        .sum();
    let globals: u64 = f.delta.globals.iter().map(|g| global_bytes(g) as u64).sum();
    4 + mems + 4 + globals + 4 + f.delta.host.len() as u64
}

/// Encode a frame. Errors only when it would be larger than [`MAX_PAYLOAD_BYTES`];
/// panics only on a caller's bug (a workload id of the wrong length, a page not 4 KiB).
pub fn encode(f: &Frame) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_into(f, &mut out)?;
    Ok(out)
}

/// Encode a frame at the end of `out` (which may already hold a transport's header):
/// one buffer, no intermediate copy. On error `out` is left as it was.
pub fn encode_into(f: &Frame, out: &mut Vec<u8>) -> Result<(), FrameError> {
    assert!(
        !f.workload.is_empty() && f.workload.len() <= MAX_WORKLOAD_BYTES,
        "workload id length"
    );
    let len = payload_len(f);
    if len > u64::from(MAX_PAYLOAD_BYTES) {
        return Err(FrameError::TooLarge(len));
    }
    let start = out.len();
    out.reserve(FIXED_HEADER + f.workload.len() + len as usize + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(if f.delta.full { 1 } else { 2 });
    out.push(0);
    out.extend_from_slice(&f.generation.to_le_bytes());
    out.extend_from_slice(&f.epoch.to_le_bytes());
    out.extend_from_slice(&(f.workload.len() as u16).to_le_bytes());
    out.extend_from_slice(f.workload.as_bytes());
    put_u32(out, len as u32);
    let payload_start = out.len();
    put_u32(out, f.delta.memories.len() as u32);
    for m in &f.delta.memories {
        out.extend_from_slice(&m.size_bytes.to_le_bytes());
        put_u32(out, m.pages.len() as u32);
        for (idx, data) in &m.pages {
            assert_eq!(data.len(), PAGE_BYTES, "page size");
            put_u32(out, *idx);
            out.extend_from_slice(data);
        }
    }
    put_u32(out, f.delta.globals.len() as u32);
    for g in &f.delta.globals {
        match g {
            GlobalValue::I32(v) => {
                out.push(0);
                out.extend_from_slice(&v.to_le_bytes());
            }
            GlobalValue::I64(v) => {
                out.push(1);
                out.extend_from_slice(&v.to_le_bytes());
            }
            GlobalValue::F32(v) => {
                out.push(2);
                out.extend_from_slice(&v.to_le_bytes());
            }
            GlobalValue::F64(v) => {
                out.push(3);
                out.extend_from_slice(&v.to_le_bytes());
            }
            GlobalValue::V128(v) => {
                out.push(4);
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    put_u32(out, f.delta.host.len() as u32);
    out.extend_from_slice(&f.delta.host);
    debug_assert_eq!((out.len() - payload_start) as u64, len, "payload length");
    let crc = crc32fast::hash(&out[start..]);
    put_u32(out, crc);
    Ok(())
}

/// The total length of the frame that starts `buf`, once enough of its header is there
/// (`Ok(None)`: read more). For reading frames off a stream.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    if buf.len() < 26 {
        return Ok(None);
    }
    if &buf[..4] != MAGIC {
        return Err(FrameError::Magic);
    }
    let w = u16::from_le_bytes([buf[24], buf[25]]) as usize;
    if w == 0 || w > MAX_WORKLOAD_BYTES {
        return Err(FrameError::Malformed(format!("workload id length {w}")));
    }
    if buf.len() < FIXED_HEADER + w {
        return Ok(None);
    }
    let at = 26 + w;
    let p = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    if p > MAX_PAYLOAD_BYTES {
        return Err(FrameError::Malformed(format!("payload length {p}")));
    }
    Ok(Some(FIXED_HEADER + w + p as usize + 4))
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Malformed(format!(
                "field of {n} bytes past the end of the payload"
            )));
        }
        let (h, t) = self.buf.split_at(n);
        self.buf = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

/// Decode and check a frame; it must be exactly one frame.
pub fn decode(buf: &[u8]) -> Result<Frame, FrameError> {
    let total = match frame_len(buf)? {
        Some(t) => t,
        None => {
            return Err(FrameError::Truncated {
                need: buf.len().max(26) + 1,
                have: buf.len(),
            });
        }
    };
    if buf.len() < total {
        return Err(FrameError::Truncated {
            need: total,
            have: buf.len(),
        });
    }
    if buf.len() > total {
        return Err(FrameError::Malformed(format!(
            "{} bytes after the frame",
            buf.len() - total
        )));
    }
    let version = u16::from_le_bytes([buf[4], buf[5]]);
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    let body = &buf[..total - 4];
    let crc = u32::from_le_bytes(buf[total - 4..].try_into().expect("4 bytes"));
    if crc32fast::hash(body) != crc {
        return Err(FrameError::Checksum);
    }
    let full = match buf[6] {
        1 => true,
        2 => false,
        k => return Err(FrameError::Malformed(format!("kind {k}"))),
    };
    if buf[7] != 0 {
        return Err(FrameError::Malformed(format!("flags {:#x}", buf[7])));
    }
    let generation = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    let epoch = u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes"));
    let w = u16::from_le_bytes([buf[24], buf[25]]) as usize;
    let workload = std::str::from_utf8(&buf[26..26 + w])
        .map_err(|_| FrameError::Malformed("workload id is not UTF-8".into()))?
        .to_string();
    let mut r = Reader {
        buf: &buf[FIXED_HEADER + w..total - 4],
    };
    let n_mem = r.u32()?;
    if n_mem > MAX_MEMORIES {
        return Err(FrameError::Malformed(format!("{n_mem} memories")));
    }
    let mut memories = Vec::with_capacity(n_mem as usize);
    for _ in 0..n_mem {
        let size_bytes = r.u64()?;
        let n_pages = r.u32()? as usize;
        // Each page takes 4 + 4096 bytes: a count the payload cannot hold is refused
        // before anything is allocated for it.
        if n_pages > r.buf.len() / (4 + PAGE_BYTES) {
            return Err(FrameError::Malformed(format!(
                "{n_pages} pages do not fit the payload"
            )));
        }
        let mut pages = Vec::with_capacity(n_pages);
        for _ in 0..n_pages {
            let idx = r.u32()?;
            pages.push((idx, r.take(PAGE_BYTES)?.to_vec()));
        }
        memories.push(MemoryDelta { size_bytes, pages });
    }
    let n_glob = r.u32()?;
    if n_glob > MAX_GLOBALS || n_glob as usize > r.buf.len() / 5 {
        return Err(FrameError::Malformed(format!("{n_glob} globals")));
    }
    let mut globals = Vec::with_capacity(n_glob as usize);
    for _ in 0..n_glob {
        globals.push(match r.u8()? {
            0 => GlobalValue::I32(r.u32()? as i32),
            1 => GlobalValue::I64(r.u64()? as i64),
            2 => GlobalValue::F32(r.u32()?),
            3 => GlobalValue::F64(r.u64()?),
            4 => GlobalValue::V128(u128::from_le_bytes(
                r.take(16)?.try_into().expect("16 bytes"),
            )),
            t => return Err(FrameError::Malformed(format!("global type {t}"))),
        });
    }
    let host_len = r.u32()? as usize;
    let host = r.take(host_len)?.to_vec();
    if !r.buf.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} bytes left in the payload",
            r.buf.len()
        )));
    }
    Ok(Frame {
        workload,
        generation,
        epoch,
        delta: StateDelta {
            full,
            memories,
            globals,
            host,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Frame {
        Frame {
            workload: "ledger".into(),
            generation: 3,
            epoch: 42,
            delta: StateDelta {
                full: false,
                memories: vec![MemoryDelta {
                    size_bytes: 131072,
                    pages: vec![(1, vec![7; PAGE_BYTES]), (30, vec![9; PAGE_BYTES])],
                }],
                globals: vec![
                    GlobalValue::I32(-1),
                    GlobalValue::I64(1 << 40),
                    GlobalValue::F32(1),
                    GlobalValue::F64(2),
                    GlobalValue::V128(u128::MAX),
                ],
                host: b"reply log".to_vec(),
            },
        }
    }

    #[test]
    fn round_trip() {
        let f = sample();
        let bytes = encode(&f).unwrap();
        assert_eq!(frame_len(&bytes).unwrap(), Some(bytes.len()));
        assert_eq!(decode(&bytes).unwrap(), f);
    }

    #[test]
    fn too_large_is_an_error_not_a_panic() {
        let mut f = sample();
        // calloc'd and never touched: no real memory.
        f.delta.host = vec![0; MAX_PAYLOAD_BYTES as usize];
        let mut out = b"hdr".to_vec();
        assert!(
            matches!(encode_into(&f, &mut out), Err(FrameError::TooLarge(n)) if n > u64::from(MAX_PAYLOAD_BYTES))
        );
        assert_eq!(out, b"hdr", "nothing written");
    }

    #[test]
    fn encode_into_appends_one_frame() {
        let mut out = b"hdr".to_vec();
        encode_into(&sample(), &mut out).unwrap();
        assert_eq!(&out[..3], b"hdr");
        assert_eq!(decode(&out[3..]).unwrap(), sample());
    }

    #[test]
    fn every_torn_prefix_and_every_flipped_bit_is_rejected() {
        let bytes = encode(&sample()).unwrap();
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "prefix of {cut}");
        }
        // Flip one bit in each byte (a sample of bits, all bytes).
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1 << (i % 8);
            assert!(decode(&b).is_err(), "flip in byte {i}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode(&bytes);
            let _ = frame_len(&bytes);
        }

        #[test]
        fn decoder_never_panics_on_valid_headers(mut tail in prop::collection::vec(any::<u8>(), 0..512), w in 1usize..20) {
            // A valid header with a correct checksum over garbage: the payload parser is
            // reached and must refuse cleanly.
            let mut b = Vec::new();
            b.extend_from_slice(MAGIC);
            b.extend_from_slice(&VERSION.to_le_bytes());
            b.extend_from_slice(&[2, 0]);
            b.extend_from_slice(&[0; 16]);
            b.extend_from_slice(&(w as u16).to_le_bytes());
            b.extend(std::iter::repeat_n(b'a', w));
            b.extend_from_slice(&(tail.len() as u32).to_le_bytes());
            b.append(&mut tail);
            let crc = crc32fast::hash(&b);
            b.extend_from_slice(&crc.to_le_bytes());
            let _ = decode(&b);
        }

        #[test]
        fn round_trips(generation in any::<u64>(), epoch in any::<u64>(), pages in prop::collection::vec((any::<u32>(), any::<u8>()), 0..4), host in prop::collection::vec(any::<u8>(), 0..64), full in any::<bool>()) {
            let f = Frame {
                workload: "w".into(), generation, epoch,
                delta: StateDelta { full, memories: vec![MemoryDelta { size_bytes: 65536, pages: pages.iter().map(|(i, b)| (*i, vec![*b; PAGE_BYTES])).collect() }], globals: vec![GlobalValue::I32(generation as i32)], host },
            };
            prop_assert_eq!(decode(&encode(&f).unwrap()).unwrap(), f);
        }
    }
}
