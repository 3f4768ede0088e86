//! Guest ABI v1: the module check and the request/response encodings
//! (`docs/guest-abi.md`).

use wasmparser::{
    CompositeInnerType, ExternalKind, Parser, Payload, TypeRef, ValType, Validator, WasmFeatures,
};

use crate::{HttpRequest, HttpResponse};

/// Largest response a guest may return, bytes.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// The imports a guest may use: module `avail`, name, (params, results).
const ALLOWED_IMPORTS: &[(&str, &[ValType], &[ValType])] = &[
    ("log", &[ValType::I32, ValType::I32], &[]),
    ("now_ms", &[], &[ValType::I64]),
    ("random", &[ValType::I32, ValType::I32], &[]),
];

/// The function exports a guest must have: name, (params, results).
const REQUIRED_FUNCS: &[(&str, &[ValType], &[ValType])] = &[
    ("avail_alloc", &[ValType::I32], &[ValType::I32]),
    (
        "avail_handle",
        &[ValType::I32, ValType::I32],
        &[ValType::I64],
    ),
];

/// Check that `bytes` is a valid core wasm module that implements guest ABI v1:
/// the required exports with the right types, and no import outside the `avail` host
/// ABI. The error says what is wrong, for people.
pub fn check_module(bytes: &[u8]) -> Result<(), String> {
    if !bytes.starts_with(b"\0asm") {
        return Err("not a WebAssembly module (no \\0asm header)".into());
    }
    let features = WasmFeatures::default();
    Validator::new_with_features(features)
        .validate_all(bytes)
        .map_err(|e| format!("invalid WebAssembly module: {e}"))?;

    let mut types: Vec<Option<(Vec<ValType>, Vec<ValType>)>> = Vec::new();
    let mut func_types: Vec<u32> = Vec::new();
    let mut exports: Vec<(String, ExternalKind, u32)> = Vec::new();
    let mut memory_count = 0u32;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| format!("invalid WebAssembly module: {e}"))? {
            Payload::Version { encoding, .. } if encoding != wasmparser::Encoding::Module => {
                return Err(
                    "a component, not a core module: avail runs core wasm modules (ABI v1)".into(),
                );
            }
            Payload::TypeSection(r) => {
                for group in r {
                    let group = group.map_err(|e| e.to_string())?;
                    for sub in group.into_types() {
                        types.push(match &sub.composite_type.inner {
                            CompositeInnerType::Func(f) => {
                                Some((f.params().to_vec(), f.results().to_vec()))
                            }
                            _ => None,
                        });
                    }
                }
            }
            Payload::ImportSection(r) => {
                for imp in r.into_imports() {
                    let imp = imp.map_err(|e| e.to_string())?;
                    let TypeRef::Func(ty) = imp.ty else {
                        return Err(format!(
                            "import {}.{} is not a function: guests may only import functions of module `avail`",
                            imp.module, imp.name
                        ));
                    };
                    let allowed = ALLOWED_IMPORTS
                        .iter()
                        .find(|(n, _, _)| imp.module == "avail" && *n == imp.name);
                    let Some((_, params, results)) = allowed else {
                        return Err(format!(
                            "import {}.{} is outside the avail host ABI (allowed: avail.log, avail.now_ms, avail.random)",
                            imp.module, imp.name
                        ));
                    };
                    if types.get(ty as usize).cloned().flatten()
                        != Some((params.to_vec(), results.to_vec()))
                    {
                        return Err(format!("import avail.{} has the wrong type", imp.name));
                    }
                    func_types.push(ty);
                }
            }
            Payload::FunctionSection(r) => {
                for ty in r {
                    func_types.push(ty.map_err(|e| e.to_string())?);
                }
            }
            Payload::MemorySection(r) => memory_count += r.count(),
            Payload::ExportSection(r) => {
                for e in r {
                    let e = e.map_err(|e| e.to_string())?;
                    exports.push((e.name.to_string(), e.kind, e.index));
                }
            }
            _ => {}
        }
    }
    if memory_count == 0
        || !exports
            .iter()
            .any(|(n, k, _)| n == "memory" && *k == ExternalKind::Memory)
    {
        return Err(
            "missing export `memory` (guest ABI v1 needs memory, avail_alloc, avail_handle)".into(),
        );
    }
    for (name, params, results) in REQUIRED_FUNCS {
        let Some((_, _, idx)) = exports
            .iter()
            .find(|(n, k, _)| n == name && *k == ExternalKind::Func)
        else {
            return Err(format!(
                "missing export `{name}` (guest ABI v1 needs memory, avail_alloc, avail_handle)"
            ));
        };
        let ty = func_types
            .get(*idx as usize)
            .and_then(|t| types.get(*t as usize).cloned().flatten());
        if ty != Some((params.to_vec(), results.to_vec())) {
            return Err(format!(
                "export `{name}` has the wrong type (see docs/guest-abi.md)"
            ));
        }
    }
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Encode a request for the guest.
pub fn encode_request(req: &HttpRequest) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + req.path.len() + req.body.len());
    put_bytes(&mut out, req.method.as_bytes());
    put_bytes(&mut out, req.path.as_bytes());
    out.extend_from_slice(&(req.headers.len() as u32).to_le_bytes());
    for (n, v) in &req.headers {
        put_bytes(&mut out, n.to_ascii_lowercase().as_bytes());
        put_bytes(&mut out, v.as_bytes());
    }
    put_bytes(&mut out, &req.body);
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u32(&mut self) -> Result<u32, String> {
        if self.0.len() < 4 {
            return Err("truncated".into());
        }
        let (h, t) = self.0.split_at(4);
        self.0 = t;
        Ok(u32::from_le_bytes([h[0], h[1], h[2], h[3]]))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        if self.0.len() < n {
            return Err(format!("length {n} past the end"));
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "header is not UTF-8".to_string())
    }
}

/// Decode a guest's response; the error says what is malformed.
pub fn decode_response(buf: &[u8]) -> Result<HttpResponse, String> {
    let mut r = Reader(buf);
    let status = r.u32()?;
    if !(100..=599).contains(&status) {
        return Err(format!("status {status} out of range"));
    }
    let count = r.u32()?;
    if count as usize > buf.len() / 8 {
        return Err(format!("header count {count} impossible for the length"));
    }
    let mut headers = Vec::with_capacity(count as usize);
    for _ in 0..count {
        headers.push((r.string()?, r.string()?));
    }
    let body = bytes::Bytes::copy_from_slice(r.bytes()?);
    if !r.0.is_empty() {
        return Err(format!("{} trailing bytes", r.0.len()));
    }
    Ok(HttpResponse {
        status: status as u16,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_round_trip_and_garbage() {
        let mut b = Vec::new();
        b.extend_from_slice(&200u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        put_bytes(&mut b, b"content-type");
        put_bytes(&mut b, b"application/json");
        put_bytes(&mut b, b"{}");
        let r = decode_response(&b).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        assert_eq!(&r.body[..], b"{}");
        for cut in 0..b.len() {
            assert!(decode_response(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = b.clone();
        extra.push(0);
        assert!(decode_response(&extra).is_err());
        let mut bad = b.clone();
        bad[..4].copy_from_slice(&42u32.to_le_bytes());
        assert!(decode_response(&bad).is_err());
    }

    #[test]
    fn empty_module_lacks_exports() {
        let e = check_module(b"\0asm\x01\0\0\0").unwrap_err();
        assert!(e.contains("missing export `memory`"), "{e}");
        assert!(
            check_module(b"hello")
                .unwrap_err()
                .contains("not a WebAssembly module")
        );
        assert!(
            check_module(b"\0asm\x01\0\0\0\x99")
                .unwrap_err()
                .contains("invalid")
        );
    }
}
