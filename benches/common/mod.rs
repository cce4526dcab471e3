//! What both benchmarks use: an s3s server in the bench process.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

/// The benchmark's S3 credentials (SigV4 signatures are checked).
pub const KEY: &str = "INFERSTREAMBENCH";
pub const SECRET: &str = "inferstream-bench-secret";

pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Serves `s3` on a free loopback port until `stop`.
pub async fn serve_s3<T: s3s::S3>(s3: T, stop: CancellationToken) -> Res<SocketAddr> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder as ConnBuilder;

    let mut builder = s3s::service::S3ServiceBuilder::new(s3);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(KEY, SECRET));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        loop {
            let socket = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(_) => continue,
                },
                _ = stop.cancelled() => break,
            };
            let _ = socket.set_nodelay(true);
            let conn = http
                .serve_connection(TokioIo::new(socket), service.clone())
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
    Ok(addr)
}
