//! `faulty`: a test guest for the host's fault handling (traps, runaway handlers,
//! memory limits) and for the `log` and `now_ms` imports.

use avail_guest::{Request, Response, host, json};

#[derive(Default)]
pub struct Faulty {
    /// Calls of `/count` since this instance was created.
    count: u64,
    /// Memory allocated by `/grow`, held until the instance goes away.
    grown: Vec<Vec<u8>>,
}

pub fn handle(state: &mut Faulty, req: Request) -> Response {
    let body = json::Object::new();
    let body = match (req.route(), req.method.as_str()) {
        ("/ok", "GET") => body.bool("ok", true),
        ("/trap", "GET") => trap(),
        ("/spin", "GET") => spin(),
        ("/grow", "POST") => match req.query("mib").and_then(|n| n.parse::<u32>().ok()) {
            Some(mib) => {
                state.grown.push(grow(mib));
                body.u64("grown_mib", mib.into())
            }
            None => return Response::error(400, "want ?mib=N"),
        },
        ("/log", "GET") => {
            host::log("hello from faulty");
            body.bool("logged", true)
        }
        ("/now", "GET") => body.i64("now_ms", host::now_ms()),
        ("/count", "GET") => {
            state.count += 1;
            body.u64("count", state.count)
        }
        ("/grow", _) => return Response::method_not_allowed("POST"),
        ("/ok" | "/trap" | "/spin" | "/log" | "/now" | "/count", _) => {
            return Response::method_not_allowed("GET");
        }
        _ => return Response::no_route(),
    };
    Response::json(200, &body.finish())
}

fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    panic!("trap");
}

fn spin() -> ! {
    let mut i = 0u64;
    loop {
        i = std::hint::black_box(i.wrapping_add(1));
    }
}

/// Allocates `mib` MiB and writes every page, so the memory is really there; an
/// allocation past the memory limit (or past 4 GiB) aborts, which is a trap.
fn grow(mib: u32) -> Vec<u8> {
    let len = (mib as usize)
        .checked_mul(1 << 20)
        .expect("grow: too large");
    let mut buf = Vec::with_capacity(len);
    buf.resize(len, 1u8);
    std::hint::black_box(&mut buf);
    buf
}

avail_guest::export!(Faulty, handle);

#[cfg(test)]
mod tests {
    use super::*;

    fn call(state: &mut Faulty, method: &str, path: &str) -> (u32, String) {
        let resp = handle(state, Request::new(method, path, vec![]));
        (resp.status, resp.text())
    }

    #[test]
    fn routes() {
        let s = &mut Faulty::default();
        assert_eq!(call(s, "GET", "/ok"), (200, r#"{"ok":true}"#.into()));
        assert_eq!(call(s, "GET", "/count"), (200, r#"{"count":1}"#.into()));
        assert_eq!(call(s, "GET", "/count"), (200, r#"{"count":2}"#.into()));
        assert_eq!(call(s, "GET", "/log"), (200, r#"{"logged":true}"#.into()));
        let (status, body) = call(s, "GET", "/now");
        assert_eq!(status, 200);
        assert!(body.starts_with(r#"{"now_ms":1"#), "{body}");
        assert_eq!(
            call(s, "POST", "/grow?mib=2"),
            (200, r#"{"grown_mib":2}"#.into())
        );
        assert_eq!(s.grown[0].len(), 2 << 20);
        assert_eq!(
            call(s, "POST", "/grow?mib=0"),
            (200, r#"{"grown_mib":0}"#.into())
        );
        assert_eq!(call(s, "POST", "/grow").0, 400);
        assert_eq!(call(s, "POST", "/grow?mib=x").0, 400);
        assert_eq!(call(s, "GET", "/grow?mib=1").0, 405);
        assert_eq!(call(s, "POST", "/ok").0, 405);
        assert_eq!(call(s, "GET", "/nope").0, 404);
    }

    #[test]
    #[should_panic(expected = "trap")]
    fn trap_traps() {
        call(&mut Faulty::default(), "GET", "/trap");
    }
}
