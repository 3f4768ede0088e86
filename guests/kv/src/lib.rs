//! `kv`: a key-value store in linear memory.
//! `PUT /kv/<key>` (value = body) -> `200 {"version": v}`, `GET /kv/<key>` -> the value,
//! `DELETE /kv/<key>` -> `200 {"deleted": bool}`, `GET /stats` -> `{"keys": n, "bytes": b}`.
//!
//! The key is the raw path after `/kv/` (not percent-decoded, query excluded). A key's
//! version counts all writes to it and survives a delete, so it never repeats.
//! `bytes` is the total length of the stored values.

use avail_guest::{Request, Response, json};
use std::collections::BTreeMap;

pub const MAX_KEY: usize = 256;
pub const MAX_VALUE: usize = 1 << 20;

#[derive(Default)]
pub struct Kv {
    entries: BTreeMap<String, Entry>,
    keys: u64,
    bytes: u64,
}

struct Entry {
    version: u64,
    value: Option<Vec<u8>>,
}

pub fn handle(state: &mut Kv, req: Request) -> Response {
    if req.route() == "/stats" {
        return match req.method.as_str() {
            "GET" => ok(json::Object::new()
                .u64("keys", state.keys)
                .u64("bytes", state.bytes)),
            _ => Response::method_not_allowed("GET"),
        };
    }
    let key = match req.route().strip_prefix("/kv/") {
        Some(key) if !key.is_empty() => key,
        _ => return Response::no_route(),
    };
    if !matches!(req.method.as_str(), "GET" | "PUT" | "DELETE") {
        return Response::method_not_allowed("GET, PUT, DELETE");
    }
    if key.len() > MAX_KEY {
        return Response::error(413, "key too large");
    }
    match req.method.as_str() {
        "GET" => match state.entries.get(key).and_then(|e| e.value.as_ref()) {
            Some(value) => Response::bytes(200, value.clone()),
            None => Response::error(404, "not found"),
        },
        "PUT" if req.body.len() > MAX_VALUE => Response::error(413, "value too large"),
        "PUT" => {
            let key = key.to_string();
            let entry = state.entries.entry(key).or_insert(Entry {
                version: 0,
                value: None,
            });
            entry.version += 1;
            state.bytes += req.body.len() as u64;
            match entry.value.replace(req.body) {
                Some(old) => state.bytes -= old.len() as u64,
                None => state.keys += 1,
            }
            ok(json::Object::new().u64("version", entry.version))
        }
        _ => {
            let old = state.entries.get_mut(key).and_then(|e| e.value.take());
            if let Some(old) = &old {
                state.keys -= 1;
                state.bytes -= old.len() as u64;
            }
            ok(json::Object::new().bool("deleted", old.is_some()))
        }
    }
}

fn ok(body: json::Object) -> Response {
    Response::json(200, &body.finish())
}

avail_guest::export!(Kv, handle);

#[cfg(test)]
mod tests {
    use super::*;

    fn call(state: &mut Kv, method: &str, path: &str, body: &[u8]) -> (u32, String) {
        let resp = handle(state, Request::new(method, path, body));
        (resp.status, resp.text())
    }

    fn ok(body: &str) -> (u32, String) {
        (200, body.to_string())
    }

    #[test]
    fn put_get_delete() {
        let s = &mut Kv::default();
        let not_found = (404, r#"{"error":"not found"}"#.to_string());
        assert_eq!(call(s, "GET", "/kv/a", b""), not_found);
        assert_eq!(call(s, "PUT", "/kv/a", b"one"), ok(r#"{"version":1}"#));
        assert_eq!(call(s, "GET", "/kv/a", b""), ok("one"));
        assert_eq!(
            call(s, "PUT", "/kv/a?x=1", b"three"),
            ok(r#"{"version":2}"#)
        );
        assert_eq!(
            call(s, "PUT", "/kv/b/c", b"\x00\xff"),
            ok(r#"{"version":1}"#)
        );
        let resp = handle(s, Request::new("GET", "/kv/b/c", vec![]));
        assert_eq!(resp.body, b"\x00\xff");
        assert_eq!(resp.headers[0].1, "application/octet-stream");
        assert_eq!(call(s, "GET", "/kv/a?v=1", b""), ok("three"));
        assert_eq!(call(s, "GET", "/stats", b""), ok(r#"{"keys":2,"bytes":7}"#));

        assert_eq!(call(s, "DELETE", "/kv/a", b""), ok(r#"{"deleted":true}"#));
        assert_eq!(call(s, "DELETE", "/kv/a", b""), ok(r#"{"deleted":false}"#));
        assert_eq!(call(s, "DELETE", "/kv/zz", b""), ok(r#"{"deleted":false}"#));
        assert_eq!(call(s, "GET", "/kv/a", b""), not_found);
        assert_eq!(call(s, "GET", "/stats", b""), ok(r#"{"keys":1,"bytes":2}"#));
        // The version keeps counting across a delete.
        assert_eq!(call(s, "PUT", "/kv/a", b""), ok(r#"{"version":3}"#));
        assert_eq!(call(s, "GET", "/kv/a", b""), ok(""));
        assert_eq!(call(s, "GET", "/stats", b""), ok(r#"{"keys":2,"bytes":2}"#));
    }

    #[test]
    fn limits() {
        let s = &mut Kv::default();
        let key = "k".repeat(MAX_KEY);
        let long = "k".repeat(MAX_KEY + 1);
        assert_eq!(call(s, "PUT", &format!("/kv/{key}"), b"v").0, 200);
        for method in ["PUT", "GET", "DELETE"] {
            let (status, body) = call(s, method, &format!("/kv/{long}"), b"v");
            assert_eq!(
                (status, body.as_str()),
                (413, r#"{"error":"key too large"}"#)
            );
        }
        let max = vec![7u8; MAX_VALUE];
        assert_eq!(call(s, "PUT", "/kv/big", &max), ok(r#"{"version":1}"#));
        let too_big = vec![7u8; MAX_VALUE + 1];
        let (status, body) = call(s, "PUT", "/kv/big", &too_big);
        assert_eq!(
            (status, body.as_str()),
            (413, r#"{"error":"value too large"}"#)
        );
        assert_eq!(call(s, "PUT", "/kv/big", b"x"), ok(r#"{"version":2}"#));
        assert_eq!(call(s, "GET", "/stats", b""), ok(r#"{"keys":2,"bytes":2}"#));
    }

    #[test]
    fn routing() {
        let s = &mut Kv::default();
        assert_eq!(call(s, "POST", "/kv/a", b"").0, 405);
        assert_eq!(call(s, "PUT", "/stats", b"").0, 405);
        assert_eq!(call(s, "GET", "/kv/", b"").0, 404);
        assert_eq!(
            call(s, "GET", "/kv", b""),
            (404, r#"{"error":"no route"}"#.into())
        );
        assert_eq!(call(s, "GET", "/", b"").0, 404);
        assert_eq!(
            call(s, "GET", "/stats?x", b""),
            ok(r#"{"keys":0,"bytes":0}"#)
        );
    }
}
