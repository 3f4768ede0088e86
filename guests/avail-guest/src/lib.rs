//! Guest side of the avail wasm ABI v1 (see `docs/guest-abi.md`) for Rust guests.
//!
//! A guest is a `cdylib` built for `wasm32-unknown-unknown` that keeps its state in a
//! `Default` type and exports a handler with [`export!`]:
//!
//! ```
//! use avail_guest::{Request, Response, json};
//!
//! #[derive(Default)]
//! pub struct State { hits: u64 }
//!
//! pub fn handle(state: &mut State, req: Request) -> Response {
//!     state.hits += 1;
//!     Response::json(200, &json::Object::new().u64("hits", state.hits).finish())
//! }
//!
//! avail_guest::export!(State, handle);
//! ```
//!
//! The exports exist only on `wasm32`; on the host the handler is a plain function that
//! tests call directly. The optional host imports are in [`host`]; an import is linked
//! into the module only if the guest calls it.

pub mod host;
pub mod json;

mod codec;

pub use codec::DecodeError;

/// One HTTP request as the host hands it to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `"GET"`, `"POST"`, ...
    pub method: String,
    /// Path relative to the workload, with the query if any: `"/kv/a?x=1"`.
    pub path: String,
    /// Header names are lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// A request without headers (handy in tests).
    pub fn new(method: &str, path: &str, body: impl Into<Vec<u8>>) -> Self {
        Request {
            method: method.to_string(),
            path: path.to_string(),
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// The path without the query: `"/kv/a"` for `"/kv/a?x=1"`.
    pub fn route(&self) -> &str {
        self.path.split_once('?').map_or(&self.path, |(p, _)| p)
    }

    /// The raw (not percent-decoded) value of query parameter `name`; `""` if it has no `=`.
    pub fn query(&self, name: &str) -> Option<&str> {
        let (_, query) = self.path.split_once('?')?;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then_some(v)
        })
    }

    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP response as the guest hands it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// `100..=599`.
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// A response with a `content-type` header.
    pub fn new(status: u32, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            headers: vec![("content-type".to_string(), content_type.to_string())],
            body: body.into(),
        }
    }

    /// A JSON response; `body` must already be JSON.
    pub fn json(status: u32, body: &str) -> Self {
        Self::new(status, "application/json", body)
    }

    /// A raw bytes response (`application/octet-stream`).
    pub fn bytes(status: u32, body: impl Into<Vec<u8>>) -> Self {
        Self::new(status, "application/octet-stream", body)
    }

    /// `{"error": msg}`.
    pub fn error(status: u32, msg: &str) -> Self {
        Self::json(status, &json::Object::new().str("error", msg).finish())
    }

    /// `404 {"error": "no route"}`.
    pub fn no_route() -> Self {
        Self::error(404, "no route")
    }

    /// `405 {"error": "method not allowed"}` with an `allow` header.
    pub fn method_not_allowed(allow: &str) -> Self {
        Self::error(405, "method not allowed").with_header("allow", allow)
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// The body as UTF-8, lossy (handy in tests).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// The glue behind [`export!`]; not part of the API.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod abi {
    use crate::{Request, Response};
    use std::cell::RefCell;

    thread_local! {
        /// Buffers handed out by `avail_alloc` since the last `avail_handle`.
        static INPUTS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
        /// The last encoded response; kept until the next `avail_handle`.
        static OUTPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }

    pub fn alloc(len: i32) -> i32 {
        let mut buf = vec![0u8; len as u32 as usize];
        let ptr = buf.as_mut_ptr() as usize as i32;
        INPUTS.with(|inputs| inputs.borrow_mut().push(buf));
        ptr
    }

    pub fn handle(ptr: i32, len: i32, handler: impl FnOnce(Request) -> Response) -> i64 {
        OUTPUT.with(|out| drop(out.take()));
        let input: &[u8] = if len == 0 {
            &[]
        } else {
            // SAFETY: the host wrote `len` bytes at `ptr`, in a buffer from `alloc`
            // that stays alive until the request is decoded (copied) below.
            unsafe {
                std::slice::from_raw_parts(ptr as u32 as usize as *const u8, len as u32 as usize)
            }
        };
        let request = Request::decode(input);
        INPUTS.with(|inputs| inputs.borrow_mut().clear());
        let response = match request {
            Ok(request) => handler(request),
            Err(_) => Response::error(400, "bad request encoding"),
        };
        OUTPUT.with(|out| {
            let mut out = out.borrow_mut();
            *out = response.encode();
            ((out.as_ptr() as usize as u64) << 32 | out.len() as u64) as i64
        })
    }
}

/// Defines the ABI exports `avail_alloc` and `avail_handle` (on `wasm32` only) for a
/// guest whose state is `$state: Default` and whose handler is
/// `fn(&mut $state, Request) -> Response`. The state lives in linear memory and is
/// created on the first request.
#[macro_export]
macro_rules! export {
    ($state:ty, $handler:path) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            ::std::thread_local! {
                static STATE: ::core::cell::RefCell<$state> =
                    ::core::cell::RefCell::new(<$state as ::core::default::Default>::default());
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn avail_alloc(len: i32) -> i32 {
                $crate::abi::alloc(len)
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn avail_handle(ptr: i32, len: i32) -> i64 {
                $crate::abi::handle(ptr, len, |req| {
                    STATE.with(|state| $handler(&mut state.borrow_mut(), req))
                })
            }
        };
    };
}
