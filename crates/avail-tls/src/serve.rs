//! The bounded HTTP/1.1 serving loop behind every listener (the API, the ingress, a
//! node's peer port).
//!
//! Bounds, each stated in [`Limits`]:
//! - at most `max_connections` open at once, and `max_per_ip` from one address; past
//!   that a new connection is closed at once (the accept loop never waits, so an
//!   attacker holding sockets cannot stop the loop from accepting and refusing);
//! - a TLS handshake must finish within `handshake_timeout`;
//! - a request's headers must arrive within `header_read_timeout` (hyper's timer);
//! - a connection that moves no byte either way for `idle_timeout` is closed
//!   (slowloris, idle keep-alives). Long polls and event streams stay under it by
//!   answering or sending a keep-alive before it.
//!
//! With TLS, a client certificate verified against the cluster CA is handed to the
//! handlers as a [`PeerCert`] request extension; without one there is none. Handlers
//! decide what a certificate may do; this loop only proves which one was presented.
//! On a peer port ([`serve_peer`]) a connection that asked for the replication protocol
//! by ALPN is handed over after its handshake instead of being served HTTP.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

use rustls::pki_types::CertificateDer;

use crate::cert_digest;
use crate::peer::MovableTcp;

/// The bounds of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once from one IP address (one client holding sockets
    /// cannot take every slot).
    pub max_per_ip: usize,
    /// Longest TLS handshake.
    pub handshake_timeout: Duration,
    /// Longest wait for a request's headers.
    pub header_read_timeout: Duration,
    /// Longest time a connection may move no byte.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    /// 1,024 connections (256 from one address), 5 s handshake, 10 s headers, 60 s
    /// idle.
    fn default() -> Limits {
        Limits {
            max_connections: 1024,
            max_per_ip: 256,
            handshake_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// The client certificate of the connection, verified against the cluster CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCert {
    /// [`cert_digest`] of the leaf certificate.
    pub digest: String,
    /// The leaf certificate.
    pub der: CertificateDer<'static>,
}

impl PeerCert {
    fn of(der: &CertificateDer<'_>) -> PeerCert {
        PeerCert {
            digest: cert_digest(der),
            der: der.clone().into_owned(),
        }
    }

    /// Whether the certificate is node `name`'s ([`crate::peer::names_node`]).
    pub fn names_node(&self, name: &str) -> bool {
        crate::peer::names_node(&self.der, name)
    }

    /// Whether the certificate is server `id`'s ([`crate::peer::names_server`]).
    pub fn names_server(&self, id: &str) -> bool {
        crate::peer::names_server(&self.der, id)
    }
}

/// A connection on a peer port that asked for another protocol than HTTP (a
/// replication link), after its handshake, with its verified certificate.
pub type Handoff = (tokio_rustls::server::TlsStream<MovableTcp>, PeerCert);

/// Serve `app` on `listener` until the listener fails, with TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: axum::Router,
    limits: Limits,
) -> std::io::Result<()> {
    serve_with(listener, tls, app, limits, None).await
}

/// Serve a peer port: TLS with `tls` (which requires a client certificate); HTTP
/// connections go to `app`, [`crate::peer::ALPN_REPLICATION`] ones to `links` (when
/// it is full, the new one is closed).
pub async fn serve_peer(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: axum::Router,
    limits: Limits,
    links: mpsc::Sender<Handoff>,
) -> std::io::Result<()> {
    serve_with(listener, Some(tls), app, limits, Some(links)).await
}

/// Connections open per address.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

/// A connection's place: released when the connection ends.
struct Slot {
    _permit: OwnedSemaphorePermit,
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.per_ip.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

fn take_slot(
    slots: &Arc<Semaphore>,
    per_ip: &Arc<PerIp>,
    ip: IpAddr,
    max_per_ip: usize,
) -> Option<Slot> {
    let permit = slots.clone().try_acquire_owned().ok()?;
    let mut m = per_ip.0.lock().unwrap_or_else(|p| p.into_inner());
    let n = m.entry(ip).or_default();
    if *n >= max_per_ip {
        return None;
    }
    *n += 1;
    Some(Slot {
        _permit: permit,
        per_ip: per_ip.clone(),
        ip,
    })
}

async fn serve_with(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: axum::Router,
    limits: Limits,
    links: Option<mpsc::Sender<Handoff>>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_ip = Arc::new(PerIp::default());
    let acceptor = tls.map(TlsAcceptor::from);
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors, or a connection reset before accept: go on,
                // after a breath so a full table does not spin the loop.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(slot) = take_slot(&slots, &per_ip, remote.ip(), limits.max_per_ip) else {
            tracing::debug!(%remote, "connection refused: {} open (at most {} from one address)", limits.max_connections, limits.max_per_ip);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let acceptor = acceptor.clone();
        let links = links.clone();
        tokio::spawn(async move {
            let Some(acceptor) = acceptor else {
                let _slot = slot;
                let io = IdleIo::new(stream, limits.idle_timeout);
                return serve_connection(io, app, None, remote, limits).await;
            };
            let accept = acceptor.accept(MovableTcp::new(stream));
            let tls = match tokio::time::timeout(limits.handshake_timeout, accept).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, "TLS handshake: {e}");
                    return;
                }
                Err(_) => return,
            };
            let conn = tls.get_ref().1;
            let peer = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(PeerCert::of);
            if conn.alpn_protocol() == Some(crate::peer::ALPN_REPLICATION) {
                // A link lives as long as its replica: it holds no connection slot
                // (the receiver bounds the links waiting for their hello).
                if let (Some(links), Some(peer)) = (links, peer)
                    && links.try_send((tls, peer)).is_err()
                {
                    tracing::debug!(%remote, "replication link refused: too many waiting");
                }
                return;
            }
            let _slot = slot;
            let io = IdleIo::new(tls, limits.idle_timeout);
            serve_connection(io, app, peer, remote, limits).await
        });
    }
}

async fn serve_connection<I>(
    io: I,
    app: axum::Router,
    peer: Option<PeerCert>,
    remote: SocketAddr,
    limits: Limits,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        if let Some(p) = &peer {
            req.extensions_mut().insert(p.clone());
        }
        req.extensions_mut().insert(ConnectInfo(remote));
        let mut app = app.clone();
        tower_service::Service::call(&mut app, req.map(axum::body::Body::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc);
    if let Err(e) = conn.await {
        tracing::debug!(%remote, "connection: {e}");
    }
}

/// A stream that fails with `TimedOut` once no byte has moved either way for `idle`.
pub struct IdleIo<T> {
    inner: T,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<T> IdleIo<T> {
    /// Wrap `inner`.
    pub fn new(inner: T, idle: Duration) -> IdleIo<T> {
        IdleIo {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn moved(&mut self) {
        let at = Instant::now() + self.idle;
        self.deadline.as_mut().reset(at);
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "connection idle")
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.moved();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
