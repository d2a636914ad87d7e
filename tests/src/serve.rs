//! The accept loop every fake upstream runs: HTTP/1.1 and h2c on loopback (or HTTPS with
//! HTTP/2 offered through ALPN) until shut down.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

type BoxError = Box<dyn Error + Send + Sync>;

/// Serves every connection of `listener` with `handle` until `shutdown` changes (or its sender
/// is dropped), over TLS with `tls`; `accepted` runs once per connection.
pub(crate) async fn accept_loop<H, Fut, B, E>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut shutdown: watch::Receiver<()>,
    accepted: impl Fn(),
    handle: H,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    E: Into<BoxError>,
{
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Typically EMFILE under a benchmark: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        // Streamed events are small writes; Nagle would delay them behind the client's ACKs.
        let _ = stream.set_nodelay(true);
        accepted();
        let handle = handle.clone();
        let mut shutdown = shutdown.clone();
        let tls = tls.clone().map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            let serve = async {
                match tls {
                    None => {
                        let io = TokioIo::new(stream);
                        let _ = builder.serve_connection(io, service_fn(handle)).await;
                    }
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        let io = TokioIo::new(stream);
                        let _ = builder.serve_connection(io, service_fn(handle)).await;
                    }
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = shutdown.changed() => {}
            }
        });
    }
}
