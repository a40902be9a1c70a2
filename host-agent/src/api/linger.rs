//! A request body the server did not read is read and thrown away (a
//! bounded amount, for a bounded time) before the answer goes out.
//!
//! The API often answers before it has read a body: a refused token, a
//! body too large, an upload of a file the image has already. If the
//! connection is then closed with the client still writing, the client's
//! write fails (EPIPE on the unix socket, a reset over TCP) and most HTTP
//! clients, hyper's among them, report that failure instead of the answer
//! that was waiting for them. Reading what is left first (a "lingering
//! close", as Apache and nginx do) lets the client finish its request and
//! read the real answer. A body longer than [`DRAIN_LIMIT`] is not read:
//! such a client loses the answer, which is better than the server
//! reading gigabytes it refused.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

/// At most this much of an unread body is read before answering.
pub const DRAIN_LIMIT: u64 = 8 << 20;

/// And for at most this long.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);

/// The middleware: hands the handler a body that gives back what it did
/// not read, and drains that before the response is returned.
pub async fn drain_unread_body(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    if body.is_end_stream() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let slot = Arc::new(Mutex::new(None));
    let body = Body::new(GivesBack {
        inner: Some(body),
        slot: slot.clone(),
    });
    let resp = next.run(Request::from_parts(parts, body)).await;
    let left = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(body) = left {
        drain(body).await;
    }
    resp
}

/// Reads and discards `body`, within [`DRAIN_LIMIT`] and [`DRAIN_TIME`];
/// a body declared longer than the limit is left alone.
async fn drain(mut body: Body) {
    if body.size_hint().lower() > DRAIN_LIMIT {
        tracing::debug!("an unread request body is too long to drain");
        return;
    }
    let read = async {
        let mut total = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                total += data.len() as u64;
                if total > DRAIN_LIMIT {
                    break;
                }
            }
        }
    };
    if tokio::time::timeout(DRAIN_TIME, read).await.is_err() {
        tracing::debug!("gave up draining an unread request body");
    }
}

/// A body that, dropped before its end, puts what is left into `slot`.
struct GivesBack {
    inner: Option<Body>,
    slot: Arc<Mutex<Option<Body>>>,
}

impl HttpBody for GivesBack {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            // Finished or broken: nothing to give back.
            self.inner = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for GivesBack {
    fn drop(&mut self) {
        if let Some(body) = self.inner.take() {
            if !body.is_end_stream() {
                *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(body);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::put;
    use axum::Router;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    /// A body that counts the bytes taken from it.
    fn counted(len: usize, read: Arc<AtomicUsize>) -> Body {
        let chunks = (0..len.div_ceil(4096)).map(move |i| {
            let n = 4096.min(len - i * 4096);
            read.fetch_add(n, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from(vec![0u8; n]))
        });
        Body::from_stream(futures_util::stream::iter(chunks))
    }

    fn app() -> Router {
        Router::new()
            .route(
                "/refuse",
                put(|| async { (axum::http::StatusCode::CONFLICT, "no") }),
            )
            .route(
                "/half",
                put(|body: Body| async move {
                    let mut body = body;
                    let _ = body.frame().await;
                    "half"
                }),
            )
            .layer(axum::middleware::from_fn(drain_unread_body))
    }

    async fn send(path: &str, body: Body) -> u16 {
        let req = Request::builder()
            .method("PUT")
            .uri(path)
            .body(body)
            .unwrap();
        app().oneshot(req).await.unwrap().status().as_u16()
    }

    #[tokio::test]
    async fn an_unread_body_is_drained_before_the_answer() {
        let read = Arc::new(AtomicUsize::new(0));
        assert_eq!(send("/refuse", counted(300_000, read.clone())).await, 409);
        assert_eq!(read.load(Ordering::SeqCst), 300_000);
    }

    #[tokio::test]
    async fn a_half_read_body_is_drained_too() {
        let read = Arc::new(AtomicUsize::new(0));
        assert_eq!(send("/half", counted(100_000, read.clone())).await, 200);
        assert_eq!(read.load(Ordering::SeqCst), 100_000);
    }

    #[tokio::test]
    async fn draining_stops_at_the_limit() {
        let read = Arc::new(AtomicUsize::new(0));
        let len = (DRAIN_LIMIT as usize) * 2;
        assert_eq!(send("/refuse", counted(len, read.clone())).await, 409);
        let got = read.load(Ordering::SeqCst) as u64;
        assert!(got > DRAIN_LIMIT && got <= DRAIN_LIMIT + 4096, "{got}");
    }

    /// A body of a declared length (as a Content-Length header makes
    /// hyper's body), counting what is read of it.
    struct Declared {
        left: u64,
        read: Arc<AtomicUsize>,
    }

    impl HttpBody for Declared {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            let n = self.left.min(65536);
            self.left -= n;
            self.read.fetch_add(n as usize, Ordering::SeqCst);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![0u8; n as usize])))))
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.left)
        }
    }

    #[tokio::test]
    async fn a_body_declared_longer_than_the_limit_is_not_read() {
        let read = Arc::new(AtomicUsize::new(0));
        let body = Body::new(Declared {
            left: DRAIN_LIMIT + 1,
            read: read.clone(),
        });
        assert_eq!(send("/refuse", body).await, 409);
        assert_eq!(read.load(Ordering::SeqCst), 0);
        // One within the limit is read whole.
        let body = Body::new(Declared {
            left: DRAIN_LIMIT,
            read: read.clone(),
        });
        assert_eq!(send("/refuse", body).await, 409);
        assert_eq!(read.load(Ordering::SeqCst) as u64, DRAIN_LIMIT);
    }
}
