//! The cost of TLS on the replication link: checkpoint frames and their acks between two
//! endpoints over loopback, over plain TCP and over the peer port's mutual TLS (node
//! certificates of a real cluster CA, ALPN `avail-repl/1`, the configurations the agents
//! use), alternating rounds in the same run.
//!
//! Each frame is encoded by the real encoder and decoded (checksum included) by the
//! receiver, which answers an ack, as a secondary does. Two loads:
//! - ping-pong: one checkpoint in flight (output commit at low concurrency: each reply
//!   waits for its checkpoint's ack), checkpoints per second;
//! - pipelined: 8 in flight (the primary's bound), MiB per second.
//!
//! `cargo build --release -p avail-bench && target/release/link_tls [rounds] [seconds]`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use avail_bench::{machine, median};
use avail_statepoint::frame::{self, Frame};
use avail_statepoint::state::StateDelta;
use avail_tls::peer::{self, ALPN_REPLICATION};
use avail_tls::{ClusterCa, NodeCert, NodeKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};

const KIND_FRAME: u8 = 2;
const KIND_ACK: u8 = 3;

trait Link: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Link for T {}

/// Read one message: its kind and body.
async fn read_msg<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<u8> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let n = u32::from_le_bytes(len) as usize;
    buf.resize(n, 0);
    r.read_exact(buf).await?;
    Ok(buf[0])
}

async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, kind: u8, body: &[u8]) -> std::io::Result<()> {
    w.write_all(&((body.len() + 1) as u32).to_le_bytes())
        .await?;
    w.write_all(&[kind]).await?;
    w.write_all(body).await?;
    w.flush().await
}

/// The secondary's side: decode every frame, ack its epoch.
async fn secondary<S: Link>(s: S) {
    let (r, w) = tokio::io::split(s);
    let (mut r, mut w) = (BufReader::with_capacity(256 << 10, r), BufWriter::new(w));
    let mut buf = Vec::new();
    while let Ok(kind) = read_msg(&mut r, &mut buf).await {
        if kind != KIND_FRAME {
            return;
        }
        let f = frame::decode(&buf[1..]).expect("a good frame");
        if write_msg(&mut w, KIND_ACK, &f.epoch.to_le_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

fn frame_bytes(size: usize, epoch: u64) -> Vec<u8> {
    frame::encode(&Frame {
        workload: "bench".into(),
        generation: 1,
        epoch,
        delta: StateDelta {
            full: false,
            host: vec![0x5a; size],
            ..StateDelta::default()
        },
    })
    .expect("encodes")
}

/// The primary's side for `d`: frames of `size` bytes, at most `inflight` unacked.
/// Returns acked frames per second.
async fn primary<S: Link>(s: S, size: usize, inflight: u64, d: Duration) -> f64 {
    let (r, w) = tokio::io::split(s);
    let (mut r, mut w) = (BufReader::new(r), BufWriter::with_capacity(256 << 10, w));
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sem = Arc::new(tokio::sync::Semaphore::new(inflight as usize));
    let reader = {
        let (acked, sem) = (acked.clone(), sem.clone());
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Ok(KIND_ACK) = read_msg(&mut r, &mut buf).await {
                acked.fetch_add(1, Ordering::Relaxed);
                sem.add_permits(1);
            }
        })
    };
    // One frame sent over and over: a real link's epochs differ, the bytes cost the same.
    let body = frame_bytes(size, 1);
    let start = Instant::now();
    while start.elapsed() < d && !stop.load(Ordering::Relaxed) {
        let Ok(p) = tokio::time::timeout(Duration::from_secs(5), sem.acquire()).await else {
            break;
        };
        p.expect("open").forget();
        if write_msg(&mut w, KIND_FRAME, &body).await.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
    }
    let n = acked.load(Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    reader.abort();
    n as f64 / secs
}

struct Tls {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    _dir: tempfile::TempDir,
}

fn tls() -> Tls {
    let dir = tempfile::tempdir().expect("a temp dir");
    let ca = ClusterCa::load_or_create(dir.path()).expect("a CA");
    let node = |name: &str| {
        let key = NodeKey::load_or_create(&dir.path().join(format!("{name}.key"))).expect("key");
        let issued = ca.issue_node(name, key.public_raw(), 3600).expect("issued");
        let cert = NodeCert::new();
        cert.set(&issued.cert_pem, &key.private_pem()).expect("set");
        cert
    };
    Tls {
        server: peer::server_config(ca.cert_pem(), node("b")).expect("server config"),
        client: peer::client_config(ca.cert_pem(), node("a"), Some(ALPN_REPLICATION))
            .expect("client config"),
        _dir: dir,
    }
}

/// One round over a fresh connection (set up before the clock starts).
async fn round(tls: Option<&Tls>, size: usize, inflight: u64, d: Duration) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(t.server.clone()));
    let server = tokio::spawn(async move {
        let (s, _) = l.accept().await.expect("accept");
        s.set_nodelay(true).expect("nodelay");
        match acceptor {
            Some(a) => secondary(a.accept(s).await.expect("server handshake")).await,
            None => secondary(s).await,
        }
    });
    let s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let rate = match tls {
        Some(t) => {
            let s = tokio_rustls::TlsConnector::from(t.client.clone())
                .connect(peer::server_name("b").expect("name"), s)
                .await
                .expect("client handshake");
            primary(s, size, inflight, d).await
        }
        None => primary(s, size, inflight, d).await,
    };
    server.abort();
    rate
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let secs: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(2);
    let d = Duration::from_secs(secs);
    let t = tls();
    println!("machine: {}", machine());
    println!("rounds: {rounds} x {secs} s, alternating plain and TLS; medians");
    println!("| load | frame | plain | TLS | TLS / plain |");
    println!("|---|---|---|---|---|");
    for (inflight, size) in [
        (1u64, 4usize << 10),
        (1, 64 << 10),
        (8, 64 << 10),
        (8, 1 << 20),
    ] {
        let (mut plain, mut secure) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            plain.push(round(None, size, inflight, d).await);
            secure.push(round(Some(&t), size, inflight, d).await);
        }
        let (p, s) = (median(plain), median(secure));
        let mib = |r: f64| r * size as f64 / (1 << 20) as f64;
        let (load, pv, sv) = if inflight == 1 {
            (
                "ping-pong",
                format!("{p:.0} ckpt/s"),
                format!("{s:.0} ckpt/s"),
            )
        } else {
            (
                "8 in flight",
                format!("{:.0} MiB/s", mib(p)),
                format!("{:.0} MiB/s", mib(s)),
            )
        };
        println!(
            "| {load} | {} KiB | {pv} | {sv} | {:.1}% |",
            size >> 10,
            100.0 * s / p
        );
    }
}
