//! avail-client: a small typed HTTP client for the avail API, used by the CLI, the
//! agent and the tests. HTTP/1.1 over hyper, with TLS (rustls) for `https://` URLs:
//! the caller gives the rustls configuration (the cluster CA to trust and, for an
//! agent, the node certificate to present). Can bind its outgoing connections to a
//! given local address (agents use their own node address, so a partition can be made
//! by address).
//!
//! **Several servers.** A base may list several servers, comma-separated
//! (`https://a:7400,https://b:7400`). The client sticks to the one that answered last
//! and moves to the next when it cannot be reached, when it answers 503 with the code
//! [`TRY_ANOTHER_SERVER`] (it did nothing and another server may act), or, for a read,
//! when it does not answer in time. A request is sent to another server only when that
//! is safe: always when the connection was never made or the server said it did nothing,
//! and for reads (GET, HEAD) after any failure.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use avail_model::{ApiError, ApiErrorBody};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest reply body read, bytes.
pub const MAX_REPLY_BYTES: usize = 128 << 20;

/// Errors of API calls.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached or the connection failed.
    #[error("cannot reach {url}: {reason}")]
    Connect {
        /// The URL called.
        url: String,
        /// Why.
        reason: String,
        /// Whether the request may have reached the server (false: no connection was
        /// made, so it surely did not).
        sent: bool,
        /// Whether the address refused the connection (nothing listens there).
        refused: bool,
    },
    /// The server answered with an error.
    #[error("{} ({status}){}", error.message, error.field.as_ref().map(|f| format!(" [field: {f}]")).unwrap_or_default())]
    Api {
        /// HTTP status.
        status: u16,
        /// The error body.
        error: ApiError,
    },
    /// The reply was not what was expected.
    #[error("unexpected reply from {url}: {reason}")]
    Decode {
        /// The URL called.
        url: String,
        /// Why.
        reason: String,
    },
    /// No reply in time.
    #[error("no reply from {0} in time")]
    Timeout(String),
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The error code of a 503 that means "this server did nothing; another may act" (a
/// server that cannot reach the leader, say): the client tries the next server.
pub const TRY_ANOTHER_SERVER: &str = "try_another_server";

/// Most servers one client lists.
pub const MAX_SERVERS: usize = 16;

/// A client for a server, or for several that it fails over between.
#[derive(Clone)]
pub struct Client {
    /// The servers' base URLs (at least one), shared by the clones (an agent is told
    /// the current list with each heartbeat answer).
    bases: Arc<std::sync::RwLock<Arc<Vec<String>>>>,
    /// The index of the server used now.
    current: Arc<std::sync::atomic::AtomicUsize>,
    token: Option<String>,
    node: Option<String>,
    http: Arc<std::sync::RwLock<Http>>,
    spec: PoolSpec,
    timeout: Duration,
    /// Whether a write that failed in any way may go to the next server (calls that
    /// are safe to repeat, as an agent's).
    repeatable: bool,
}

type Http = HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// What the connection pool is built from (kept to build a fresh one).
#[derive(Clone)]
struct PoolSpec {
    local: Option<IpAddr>,
    tls: Arc<rustls::ClientConfig>,
}

impl PoolSpec {
    fn build(&self) -> Http {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_local_address(self.local);
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        connector.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*self.tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        HyperClient::builder(TokioExecutor::new()).build(https)
    }
}

/// The header naming the node an agent's request speaks for; the server checks it
/// against the client certificate the connection presented.
pub const NODE_HEADER: &str = "avail-node";

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("bases", &self.bases)
            .finish()
    }
}

/// A raw reply.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: hyper::HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Client {
    /// A client for `base` (e.g. `http://127.0.0.1:7480`, or several comma-separated:
    /// see the crate docs), with a bearer token, binding outgoing connections to `local`
    /// if given. It trusts no certificate: an `https://` base needs [`Client::with_tls`].
    pub fn new(base: &str, token: Option<String>, local: Option<IpAddr>) -> Client {
        Client::with_tls(base, token, local, None)
    }

    /// A client for `base`, `https://` verified by `tls` (the cluster CA, and the node
    /// certificate an agent presents).
    pub fn with_tls(
        base: &str,
        token: Option<String>,
        local: Option<IpAddr>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Client {
        let tls = tls.unwrap_or_else(avail_tls::config::trusting_nothing);
        let spec = PoolSpec { local, tls };
        let mut bases: Vec<String> = base
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_string())
            .filter(|b| !b.is_empty())
            .take(MAX_SERVERS)
            .collect();
        if bases.is_empty() {
            bases.push(String::new());
        }
        Client {
            bases: Arc::new(std::sync::RwLock::new(Arc::new(bases))),
            current: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            token,
            node: None,
            http: Arc::new(std::sync::RwLock::new(spec.build())),
            spec,
            timeout: Duration::from_secs(30),
            repeatable: false,
        }
    }

    /// Open new connections from now on, for this client and every clone of it: the
    /// pooled ones close once idle. An agent calls it when its certificate changed, so
    /// that no connection goes on presenting the old one.
    pub fn renew_connections(&self) {
        let fresh = self.spec.build();
        *self.http.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    }

    /// The same client speaking for node `name` (an agent: its requests carry
    /// [`NODE_HEADER`], which the server checks against the node's certificate).
    pub fn for_node(&self, name: &str) -> Client {
        Client {
            node: Some(name.to_string()),
            ..self.clone()
        }
    }

    /// The same client, its calls all safe to repeat on another server (an agent's:
    /// heartbeats, reports, leases by compare-and-swap): a write that failed in any
    /// way moves on like a read.
    pub fn repeatable(&self) -> Client {
        Client {
            repeatable: true,
            ..self.clone()
        }
    }

    /// The same client with another token.
    pub fn with_token(&self, token: Option<String>) -> Client {
        Client {
            token,
            ..self.clone()
        }
    }

    /// The same client with another per-request timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            timeout,
            ..self.clone()
        }
    }

    /// The base URL of the server used now.
    pub fn base(&self) -> String {
        let bases = self.snapshot();
        bases[self.current() % bases.len()].clone()
    }

    /// Every server's base URL.
    pub fn bases(&self) -> Vec<String> {
        self.snapshot().to_vec()
    }

    /// Speak to these servers from now on (this client and its clones), unless the
    /// list is empty or the same; the one in use stays first choice when it is among
    /// them.
    pub fn set_bases(&self, bases: &[String]) {
        let new: Vec<String> = bases
            .iter()
            .map(|b| b.trim().trim_end_matches('/').to_string())
            .filter(|b| !b.is_empty())
            .take(MAX_SERVERS)
            .collect();
        if new.is_empty() || new == *self.snapshot() {
            return;
        }
        let now = self.base();
        let at = new.iter().position(|b| *b == now).unwrap_or(0);
        *self.bases.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        self.current.store(at, std::sync::atomic::Ordering::Relaxed);
    }

    fn snapshot(&self) -> Arc<Vec<String>> {
        self.bases.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn current(&self) -> usize {
        self.current.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Send a request; any status is returned as a reply. With several servers, moves
    /// to the next one as the crate docs say.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &str)>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, ClientError> {
        let bases = self.snapshot();
        let n = bases.len();
        let start = self.current() % n;
        let read = self.repeatable || matches!(method, Method::GET | Method::HEAD);
        let mut tried = 0;
        loop {
            let at = (start + tried) % n;
            let r = self
                .raw_at(&bases[at], method.clone(), path, body.clone(), headers)
                .await;
            tried += 1;
            if tried >= n || !move_on(&r, read) {
                return r;
            }
            // The next server from now on (unless another call moved already).
            let _ = self.current.compare_exchange(
                at,
                (at + 1) % n,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }

    /// [`Client::raw`] on server `at`, a read sent once more on a fresh connection
    /// when a pooled one closed under it.
    async fn raw_at(
        &self,
        at: &str,
        method: Method,
        path: &str,
        body: Option<(Bytes, &str)>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, ClientError> {
        let first = self
            .raw_once(at, method.clone(), path, body.clone(), headers)
            .await;
        // A pooled keep-alive connection may close under a request just sent on it: a
        // read (GET, HEAD) is safe to send once more on a fresh connection.
        match first {
            Err(ClientError::Connect { sent: true, .. })
                if matches!(method, Method::GET | Method::HEAD) =>
            {
                self.raw_once(at, method, path, body, headers).await
            }
            r => r,
        }
    }

    async fn raw_once(
        &self,
        at: &str,
        method: Method,
        path: &str,
        body: Option<(Bytes, &str)>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, ClientError> {
        let url = format!("{at}{path}");
        let mut b = hyper::Request::builder().method(method).uri(&url);
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        if let Some(n) = &self.node {
            b = b.header(NODE_HEADER, n.as_str());
        }
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let body = match body {
            Some((bytes, ct)) => {
                b = b.header("content-type", ct);
                bytes
            }
            None => Bytes::new(),
        };
        let req = b.body(Full::new(body)).map_err(|e| ClientError::Decode {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let fut = async {
            let http = self.http.read().unwrap_or_else(|p| p.into_inner()).clone();
            let resp = http.request(req).await.map_err(|e| ClientError::Connect {
                url: url.clone(),
                reason: error_chain(&e),
                sent: !e.is_connect(),
                refused: e.is_connect() && refused(&e),
            })?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = Limited::new(resp.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await
                .map_err(|e| ClientError::Connect {
                    url: url.clone(),
                    reason: e.to_string(),
                    sent: true,
                    refused: false,
                })?
                .to_bytes();
            Ok(Reply {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout(url.clone()))?
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &str)>,
    ) -> Result<T, ClientError> {
        let r = self.raw(method, path, body, &[]).await?;
        let url = format!("{}{}", self.base(), path);
        if !r.status.is_success() {
            return Err(api_error(&r));
        }
        serde_json::from_slice(&r.body).map_err(|e| ClientError::Decode {
            url,
            reason: e.to_string(),
        })
    }

    /// GET a JSON value.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None).await
    }

    /// POST a JSON body, read a JSON reply.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = Bytes::from(serde_json::to_vec(body).expect("request serialises"));
        self.call(Method::POST, path, Some((bytes, "application/json")))
            .await
    }

    /// PUT a JSON body, read a JSON reply.
    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = Bytes::from(serde_json::to_vec(body).expect("request serialises"));
        self.call(Method::PUT, path, Some((bytes, "application/json")))
            .await
    }

    /// PATCH a JSON body, read a JSON reply.
    pub async fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = Bytes::from(serde_json::to_vec(body).expect("request serialises"));
        self.call(Method::PATCH, path, Some((bytes, "application/json")))
            .await
    }

    /// POST raw bytes as JSON text (already encoded), read a JSON reply.
    pub async fn post_raw<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Bytes,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some((body, "application/json")))
            .await
    }

    /// PUT raw bytes, read a JSON reply.
    pub async fn put_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Bytes,
    ) -> Result<T, ClientError> {
        self.call(Method::PUT, path, Some((body, "application/octet-stream")))
            .await
    }

    /// DELETE, read a JSON reply.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::DELETE, path, None).await
    }

    /// GET raw bytes (2xx only).
    pub async fn get_bytes(&self, path: &str) -> Result<Bytes, ClientError> {
        let r = self.raw(Method::GET, path, None, &[]).await?;
        if !r.status.is_success() {
            return Err(api_error(&r));
        }
        Ok(r.body)
    }
}

/// Whether a call that ended in `r` may go to the next server: one that surely did
/// nothing (never connected, or said so), or any failure of a read.
fn move_on(r: &Result<Reply, ClientError>, read: bool) -> bool {
    match r {
        Err(ClientError::Connect { sent: false, .. }) => true,
        Err(ClientError::Connect { .. } | ClientError::Timeout(_)) => read,
        Ok(reply) if reply.status == StatusCode::SERVICE_UNAVAILABLE => {
            read || serde_json::from_slice::<ApiErrorBody>(&reply.body)
                .is_ok_and(|b| b.error.code == TRY_ANOTHER_SERVER)
        }
        _ => false,
    }
}

/// The error of a non-2xx reply: the API's JSON error body, or the text of another body.
fn api_error(r: &Reply) -> ClientError {
    let error = serde_json::from_slice::<ApiErrorBody>(&r.body)
        .map(|b| b.error)
        .unwrap_or_else(|_| ApiError {
            code: "http".into(),
            message: String::from_utf8_lossy(&r.body).trim().to_string(),
            field: None,
        });
    ClientError::Api {
        status: r.status.as_u16(),
        error,
    }
}

/// Whether an OS "connection refused" is among the causes of `e`.
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cur = c.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server on loopback that answers every request with `status` and `body`,
    /// counting the requests.
    async fn answering(
        status: u16,
        body: &'static str,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        (format!("http://{addr}"), seen)
    }

    /// A loopback address where nothing listens.
    async fn closed() -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_server_that_cannot_be_reached_is_passed_over_and_the_next_one_kept() {
        let dead = closed().await;
        let (live, seen) = answering(200, "{}").await;
        let c = Client::new(&format!("{dead}, {live}/"), None, None);
        assert_eq!(c.bases().len(), 2);
        // Told a new list that keeps the server in use: it stays in use.
        c.set_bases(&[live.clone(), dead.clone()]);
        assert_eq!(c.bases(), vec![live.clone(), dead.clone()]);
        c.set_bases(&[dead.clone(), live.clone()]);
        // A write is sent on: the first server was never reached.
        let e = Client::new(&dead, None, None)
            .get::<serde_json::Value>("/x")
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::Connect {
                    refused: true,
                    sent: false,
                    ..
                }
            ),
            "{e:?}"
        );
        let _: serde_json::Value = c.post("/x", &1).await.unwrap();
        assert_eq!(c.base(), live);
        let _: serde_json::Value = c.get("/x").await.unwrap();
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_write_moves_on_only_when_the_server_said_it_did_nothing() {
        let (elsewhere, first) = answering(
            503,
            r#"{"error":{"code":"try_another_server","message":"no leader"}}"#,
        )
        .await;
        let (live, second) = answering(200, "{}").await;
        let c = Client::new(&format!("{elsewhere},{live}"), None, None);
        let _: serde_json::Value = c.post("/x", &1).await.unwrap();
        assert_eq!(first.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(second.load(std::sync::atomic::Ordering::SeqCst), 1);

        // Another 503 (the store is away): the write is not sent twice.
        let (busy, busy_seen) =
            answering(503, r#"{"error":{"code":"unavailable","message":"store"}}"#).await;
        let c = Client::new(&format!("{busy},{live}"), None, None);
        let e = c.post::<_, serde_json::Value>("/x", &1).await.unwrap_err();
        assert_eq!(e.status(), Some(503));
        assert_eq!(busy_seen.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(second.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A read goes on to the next server.
        let _: serde_json::Value = c.get("/x").await.unwrap();
        assert_eq!(second.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
