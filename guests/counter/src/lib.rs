//! `counter`: one number in linear memory.
//! `POST /incr` -> `200 {"value": n}` (after the increment), `GET /value` -> `200 {"value": n}`.

use avail_guest::{Request, Response, json};

#[derive(Default)]
pub struct Counter {
    value: u64,
}

pub fn handle(state: &mut Counter, req: Request) -> Response {
    match (req.route(), req.method.as_str()) {
        ("/incr", "POST") => state.value += 1,
        ("/value", "GET") => {}
        ("/incr", _) => return Response::method_not_allowed("POST"),
        ("/value", _) => return Response::method_not_allowed("GET"),
        _ => return Response::no_route(),
    }
    Response::json(200, &json::Object::new().u64("value", state.value).finish())
}

avail_guest::export!(Counter, handle);

#[cfg(test)]
mod tests {
    use super::*;

    fn call(state: &mut Counter, method: &str, path: &str) -> (u32, String) {
        let resp = handle(state, Request::new(method, path, vec![]));
        (resp.status, resp.text())
    }

    #[test]
    fn counts() {
        let s = &mut Counter::default();
        assert_eq!(call(s, "GET", "/value"), (200, r#"{"value":0}"#.into()));
        assert_eq!(call(s, "POST", "/incr"), (200, r#"{"value":1}"#.into()));
        assert_eq!(call(s, "POST", "/incr?x=1"), (200, r#"{"value":2}"#.into()));
        assert_eq!(call(s, "GET", "/value"), (200, r#"{"value":2}"#.into()));
    }

    #[test]
    fn errors() {
        let s = &mut Counter::default();
        assert_eq!(call(s, "GET", "/incr").0, 405);
        assert_eq!(call(s, "POST", "/value").0, 405);
        assert_eq!(
            call(s, "GET", "/nope"),
            (404, r#"{"error":"no route"}"#.into())
        );
        assert_eq!(call(s, "GET", "/value/").0, 404);
        assert_eq!(call(s, "GET", "/value"), (200, r#"{"value":0}"#.into()));
    }
}
