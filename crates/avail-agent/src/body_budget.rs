//! Bytes of request bodies the node's ingress holds at once, bounded.
//!
//! The ingress buffers a request's body (it may send it again: a retry across a
//! failover, a forward). Each body is at most [`MAX_BODY_BYTES`] (`413` past it), and
//! all the bodies held at once on the node at most [`MAX_BODY_BYTES_IN_FLIGHT`]: a
//! semaphore of bytes. A request with a `Content-Length` takes its bytes before reading
//! anything (a declared body that does not fit is refused at once); a chunked one takes
//! them chunk by chunk. When the budget is spent the request is answered `503` with
//! `Retry-After` and its body is not read further. The bytes come back when the request
//! is answered (the permit is dropped with it).

use std::sync::LazyLock;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::sync::{Semaphore, SemaphorePermit};

/// Largest request body accepted by the ingress, bytes.
pub const MAX_BODY_BYTES: usize = 16 << 20;
/// Bytes of request bodies the ingress holds at once, node-wide (four bodies of the
/// largest size).
pub const MAX_BODY_BYTES_IN_FLIGHT: usize = 64 << 20;

static BUDGET: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(MAX_BODY_BYTES_IN_FLIGHT));

/// Why a body was not taken.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Larger than [`MAX_BODY_BYTES`].
    #[error("request body larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    /// The node's budget of bytes in flight is spent.
    #[error("this node holds {MAX_BODY_BYTES_IN_FLIGHT} bytes of request bodies already; retry")]
    Busy,
    /// The body could not be read (the client went away, a malformed chunk).
    #[error("request body: {0}")]
    Read(String),
}

/// Bytes of the budget held by one request (returned on drop).
#[derive(Default)]
pub struct Held(Option<SemaphorePermit<'static>>);

impl Held {
    /// Take `n` more bytes of the budget, or [`BodyError::Busy`].
    fn take(&mut self, n: usize) -> Result<(), BodyError> {
        if n == 0 {
            return Ok(());
        }
        let n = u32::try_from(n).map_err(|_| BodyError::TooLarge)?;
        let p = BUDGET.try_acquire_many(n).map_err(|_| BodyError::Busy)?;
        match &mut self.0 {
            Some(h) => h.merge(p),
            None => self.0 = Some(p),
        }
        Ok(())
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |p| p.num_permits())
    }
}

/// Bytes of the budget free now.
pub fn available() -> usize {
    BUDGET.available_permits()
}

/// Read a body of `declared` length (its `Content-Length`, if any) within the limits.
pub async fn read(body: Body, declared: Option<u64>) -> Result<(Bytes, Held), BodyError> {
    let mut held = Held::default();
    if let Some(n) = declared {
        if n > MAX_BODY_BYTES as u64 {
            return Err(BodyError::TooLarge);
        }
        held.take(n as usize)?;
    }
    let mut buf = BytesMut::with_capacity(held.bytes());
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let len = buf.len() + data.len();
        if len > MAX_BODY_BYTES {
            return Err(BodyError::TooLarge);
        }
        held.take(len.saturating_sub(held.bytes()))?;
        buf.extend_from_slice(&data);
    }
    Ok((buf.freeze(), held))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_are_capped_each_and_together() {
        let before = available();
        assert_eq!(
            read(Body::empty(), Some(MAX_BODY_BYTES as u64 + 1))
                .await
                .err(),
            Some(BodyError::TooLarge)
        );
        let (b, held) = read(Body::from(vec![1u8; 1000]), Some(1000)).await.unwrap();
        assert_eq!((b.len(), held.bytes()), (1000, 1000));
        assert_eq!(available(), before - 1000);
        drop(held);
        assert_eq!(available(), before);
        // A chunked body (no length) past the cap.
        let big = Body::from(vec![0u8; MAX_BODY_BYTES + 1]);
        assert_eq!(read(big, None).await.err(), Some(BodyError::TooLarge));
        assert_eq!(available(), before, "a refused body returns its bytes");
    }
}
