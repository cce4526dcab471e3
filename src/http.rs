//! The metrics and health server: `/metrics`, `/healthz`, `/readyz`; and
//! the connection limits every HTTP server of the service has.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Readiness: partitions assigned and the endpoint reachable.
pub type ReadyFn = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    ready: ReadyFn,
}

/// Serves until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: ReadyFn,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .with_state(AppState { metrics, ready });
    // No cap on connections here: liveness probes must get through
    // whatever other clients hold; idle ones are still closed.
    if let Err(e) = axum::serve(Limited::new(listener, None, IDLE), app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "metrics server stopped");
    }
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn ready_handler(State(s): State<AppState>) -> impl IntoResponse {
    if (s.ready)() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no input partition assigned, or the endpoint is unreachable\n",
        )
    }
}

/// Connections the console holds at once, at most; the next wait to be
/// accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection of the metrics server with no byte read or written for
/// this long is closed (hyper, as axum serves it, has no timeouts of its
/// own). The console's is longer than its slowest answer.
pub const IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// A listener that holds at most `max` connections (if given) and closes
/// those idle for `idle`, so that clients which open connections and send
/// nothing, or never read an answer, cannot hold memory or file
/// descriptors for ever. The idle clock runs during a request too: `idle`
/// must exceed the slowest handler.
pub struct Limited {
    listener: TcpListener,
    permits: Option<Arc<tokio::sync::Semaphore>>,
    idle: std::time::Duration,
}

impl Limited {
    pub fn new(listener: TcpListener, max: Option<usize>, idle: std::time::Duration) -> Limited {
        Limited {
            listener,
            permits: max.map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
            idle,
        }
    }
}

impl axum::serve::Listener for Limited {
    type Io = Guarded;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Guarded, std::net::SocketAddr) {
        let permit = match &self.permits {
            Some(permits) => match permits.clone().acquire_owned().await {
                Ok(p) => Some(p),
                // The semaphore is never closed.
                Err(_) => return std::future::pending().await,
            },
            None => None,
        };
        loop {
            match self.listener.accept().await {
                Ok((io, addr)) => {
                    let guarded = Guarded {
                        io,
                        _permit: permit,
                        idle: Box::pin(tokio::time::sleep(self.idle)),
                        idle_for: self.idle,
                    };
                    return (guarded, addr);
                }
                // Out of file descriptors and the like: as axum does.
                Err(e) => {
                    tracing::debug!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

/// A connection of [`Limited`]: its place among the connections, and its
/// idle deadline, pushed back by every byte read or written.
pub struct Guarded {
    io: tokio::net::TcpStream,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
    idle_for: std::time::Duration,
}

impl Guarded {
    /// `r` when ready (and the deadline pushed back), a time-out error
    /// when the deadline passed first.
    fn watch<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        r: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future as _;
        use std::task::Poll;
        match r {
            Poll::Ready(r) => {
                self.idle
                    .as_mut()
                    .reset(tokio::time::Instant::now() + self.idle_for);
                Poll::Ready(r)
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl tokio::io::AsyncRead for Guarded {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        self.watch(cx, r)
    }
}

impl tokio::io::AsyncWrite for Guarded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
