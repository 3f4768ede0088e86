//! Buffered HTTP requests and replies as drivers see them.

use bytes::Bytes;

/// A request to a workload. `path` is relative to the workload (ingress-stripped) and
/// keeps its query string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRequest {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Path and query, starting with `/`.
    pub path: String,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Bytes,
}

/// A reply from a workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Bytes,
}

impl HttpResponse {
    /// A JSON error reply in the API's shape: `{"error": {"code", "message"}}`.
    pub fn error(status: u16, code: &str, message: &str) -> HttpResponse {
        let body = serde_json::json!({"error": {"code": code, "message": message}});
        HttpResponse {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(body.to_string()),
        }
    }

    /// Value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}
