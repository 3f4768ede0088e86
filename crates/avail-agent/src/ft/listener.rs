//! The replication side of the peer port (7481): takes the links primaries dial (after
//! their mutual-TLS handshake, from `avail_tls::serve::serve_peer`), reads each link's
//! `Hello`, and hands the link to the secondary replica it names, when the link's
//! certificate is that secondary's primary's.
//!
//! ```text
//!  TLS (ALPN avail-repl/1) --> hello task: one Hello (<= 4 KiB) within 2 s
//!     --> find the secondary, check the certificate names its peer --> link
//!  at most 256 links waiting for their hello; one more closes the oldest
//! ```
//!
//! Hellos are read concurrently, each with its own deadline, so a connection that says
//! nothing (idle, or a slow sender) never delays another link's hello. Links waiting for
//! a hello are bounded; past the bound the one that has waited longest is closed: a
//! primary sends its hello as soon as it connects, so it is read long before a flood of
//! silent connections could push it out. A link that does not start with a hello, or
//! names no secondary of this node, is closed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use avail_tls::serve::{Handoff, PeerCert};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use super::{FtReplica, Hello};
use crate::peers::Link;

/// How long a new link has to say hello.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(2);
/// Links waiting for their hello, at most (one more closes the oldest).
pub const MAX_PENDING_HELLOS: usize = 256;
/// Largest hello message, bytes.
const MAX_HELLO_BYTES: usize = 4096;

/// Why a link's hello was not read.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// Nothing complete within the deadline.
    #[error("no hello within {0:?}")]
    Deadline(Duration),
    /// The connection failed or closed.
    #[error("reading the hello: {0}")]
    Read(#[from] std::io::Error),
    /// The first message's length is 0 or above the bound.
    #[error("a first message of {0} bytes is not a hello (at most {MAX_HELLO_BYTES})")]
    Length(usize),
    /// The first message is of another kind.
    #[error("the first message is of kind {0}, not a hello (1)")]
    Kind(u8),
    /// The hello's body does not parse.
    #[error("a hello that does not parse: {0}")]
    Body(serde_json::Error),
}

/// Read the hello that opens a link on `stream` (any byte stream: TCP now, TLS later),
/// within `deadline`; the stream is given back after it, ready for the link's messages.
pub async fn handshake<S: AsyncRead + Unpin>(
    mut stream: S,
    deadline: Duration,
) -> Result<(Hello, S), HelloError> {
    let read = async {
        let len = stream.read_u32_le().await? as usize;
        if len == 0 || len > MAX_HELLO_BYTES {
            return Err(HelloError::Length(len));
        }
        let mut buf = vec![0u8; len];
        stream.read_exact(&mut buf).await?;
        if buf[0] != 1 {
            return Err(HelloError::Kind(buf[0]));
        }
        serde_json::from_slice::<Hello>(&buf[1..]).map_err(HelloError::Body)
    };
    let hello = tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| HelloError::Deadline(deadline))??;
    Ok((hello, stream))
}

/// Links waiting between the peer port's handshake and their hello task, at most.
pub const LINK_QUEUE: usize = 64;

/// Take replication links from `links` and hand each to its secondary replica:
/// `find(hello, certificate)` names the replica only when the certificate is its
/// primary's.
pub async fn serve_replication(
    links: mpsc::Receiver<Handoff>,
    find: impl Fn(&Hello, &PeerCert) -> Option<Arc<FtReplica>> + Send + 'static,
) {
    serve_hellos(
        links,
        HELLO_DEADLINE,
        MAX_PENDING_HELLOS,
        |h, stream, cert| match find(&h, &cert) {
            Some(r) => r.link(Link::Server(stream)),
            None => {
                tracing::debug!(workload = %h.workload, "replication link for no local secondary of that peer")
            }
        },
    )
    .await
}

/// A link's hello, the link and what came with it, or why there is none.
type HelloResult<S, C> = Result<(Hello, S, C), HelloError>;

/// Take links from `links`, read their hellos concurrently (each within `deadline`,
/// at most `max_pending` waiting), and give each link with its hello to `linked`. A
/// link dropped by `linked` is closed.
async fn serve_hellos<S, C>(
    mut links: mpsc::Receiver<(S, C)>,
    deadline: Duration,
    max_pending: usize,
    mut linked: impl FnMut(Hello, S, C),
) where
    S: AsyncRead + Unpin + Send + 'static,
    C: Send + 'static,
{
    assert!(max_pending > 0, "room for one hello at least");
    let mut hellos: JoinSet<(u64, HelloResult<S, C>)> = JoinSet::new();
    // The links waiting for their hello, oldest first (at most `max_pending` live ones).
    let mut waiting: VecDeque<(u64, AbortHandle)> = VecDeque::with_capacity(max_pending + 1);
    let mut next: u64 = 0;
    loop {
        tokio::select! {
            link = links.recv() => {
                let Some((stream, with)) = link else { return };
                waiting.retain(|(_, h)| !h.is_finished());
                if waiting.len() >= max_pending
                    && let Some((_, oldest)) = waiting.pop_front()
                {
                    tracing::debug!("replication: {max_pending} links without a hello; closing the oldest");
                    oldest.abort();
                }
                next += 1;
                let id = next;
                let handle = hellos.spawn(async move {
                    (id, handshake(stream, deadline).await.map(|(h, s)| (h, s, with)))
                });
                waiting.push_back((id, handle));
            }
            Some(joined) = hellos.join_next(), if !hellos.is_empty() => {
                // A task aborted (closed for a newer link) has nothing to say.
                let Ok((id, result)) = joined else { continue };
                waiting.retain(|(i, _)| *i != id);
                match result {
                    Ok((hello, stream, with)) => linked(hello, stream, with),
                    Err(e) => tracing::debug!("replication link closed: {e}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    fn hello_bytes(workload: &str) -> Vec<u8> {
        let body = serde_json::to_vec(&Hello {
            workload: workload.into(),
            uid: "u".into(),
            generation: 1,
        })
        .unwrap();
        let mut m = ((body.len() + 1) as u32).to_le_bytes().to_vec();
        m.push(1);
        m.extend_from_slice(&body);
        m
    }

    /// A listener on a free loopback port whose hellos arrive on the receiver.
    async fn listening(
        deadline: Duration,
        max_pending: usize,
    ) -> (std::net::SocketAddr, mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The peer port hands over accepted links (plain TCP here: the hello logic does
        // not depend on the stream).
        let (links_tx, links) = mpsc::channel(LINK_QUEUE);
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let _ = links_tx.send((s, ())).await;
            }
        });
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(serve_hellos(
            links,
            deadline,
            max_pending,
            move |h, _, ()| {
                let _ = tx.try_send(h.workload);
            },
        ));
        (addr, rx)
    }

    async fn say_hello(addr: std::net::SocketAddr, workload: &str) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&hello_bytes(workload)).await.unwrap();
        s
    }

    /// Whether the listener closed `s` within `limit` (a generous liveness bound).
    async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(limit, s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    /// 100 silent connections, each held for the whole deadline, do not delay the
    /// hello of a link that arrives after them (each used to wait its turn: 100 x 2 s).
    #[tokio::test]
    async fn silent_connections_do_not_delay_a_hello() {
        let (addr, mut hellos) = listening(Duration::from_secs(30), 200).await;
        let mut idle = Vec::new();
        for _ in 0..100 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let _s = say_hello(addr, "w").await;
        let got = tokio::time::timeout(Duration::from_secs(10), hellos.recv()).await;
        assert_eq!(got.ok().flatten().as_deref(), Some("w"));
    }

    /// A connection that says nothing is closed at its deadline.
    #[tokio::test]
    async fn a_silent_connection_is_closed_at_its_deadline() {
        let (addr, _hellos) = listening(Duration::from_millis(200), 8).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(10)).await);
    }

    /// Past the bound of links waiting for a hello, the one that has waited longest is
    /// closed, and a hello that comes after still gets through.
    #[tokio::test]
    async fn past_the_bound_the_oldest_silent_link_is_closed() {
        let (addr, mut hellos) = listening(Duration::from_secs(60), 4).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut rest = Vec::new();
        for _ in 0..4 {
            rest.push(TcpStream::connect(addr).await.unwrap());
        }
        assert!(closed_within(&mut first, Duration::from_secs(10)).await);
        let _s = say_hello(addr, "late").await;
        let got = tokio::time::timeout(Duration::from_secs(10), hellos.recv()).await;
        assert_eq!(got.ok().flatten().as_deref(), Some("late"));
    }

    /// A first message that is not a hello, or too long for one, closes the link.
    #[tokio::test]
    async fn a_link_that_does_not_open_with_a_hello_is_closed() {
        let (addr, mut hellos) = listening(Duration::from_secs(30), 8).await;
        for bytes in [
            // Kind 5 (a heartbeat) first.
            vec![9, 0, 0, 0, 5, 1, 0, 0, 0, 0, 0, 0, 0],
            // A "hello" announcing 1 GiB.
            vec![0, 0, 0, 64, 1],
            // A hello whose JSON does not parse.
            vec![3, 0, 0, 0, 1, b'{', b'x'],
        ] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&bytes).await.unwrap();
            assert!(
                closed_within(&mut s, Duration::from_secs(10)).await,
                "{bytes:?}"
            );
        }
        let _s = say_hello(addr, "ok").await;
        let got = tokio::time::timeout(Duration::from_secs(10), hellos.recv()).await;
        assert_eq!(got.ok().flatten().as_deref(), Some("ok"));
    }
}
