//! The accept loop: hyper's HTTP/1 server with a header-read timeout (so slow clients cannot
//! hold connections), WebSocket upgrades, and graceful shutdown.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

/// Connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time a client has to send its request headers.
    pub header_read_timeout: Duration,
    /// Time open requests get to finish after shutdown begins.
    pub shutdown_grace: Duration,
}

/// Serves `app` on `listener` until `stop` turns true; over TLS when `tls` is given (the
/// handshake must end within the header-read timeout).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let service = TowerToHyperService::new(app);
    // Every connection task holds a sender; when all are dropped, every connection has ended.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(err) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (http, service, tls) = (http.clone(), service.clone(), tls.clone());
                let stop = stop.clone();
                let open = open_tx.clone();
                tokio::spawn(async move {
                    match tls {
                        None => {
                            let connection = http.serve_connection(TokioIo::new(stream), service);
                            drive(connection.with_upgrades(), stop).await;
                        }
                        Some(tls) => {
                            let handshake = tls.accept(stream);
                            match tokio::time::timeout(limits.header_read_timeout, handshake).await {
                                Ok(Ok(stream)) => {
                                    let connection =
                                        http.serve_connection(TokioIo::new(stream), service);
                                    drive(connection.with_upgrades(), stop).await;
                                }
                                Ok(Err(err)) => tracing::debug!(error = %err, "tls handshake failed"),
                                Err(_) => tracing::debug!("tls handshake timed out"),
                            }
                        }
                    }
                    drop(open);
                });
            }
            _ = stopped(&mut stop) => break,
        }
    }
    drop(listener);
    drop(open_tx);
    if tokio::time::timeout(limits.shutdown_grace, open_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?limits.shutdown_grace, "connections still open after the grace period");
    }
    Ok(())
}

/// Serves one connection; when `stop` turns true, finishes the request in progress and closes.
async fn drive<C>(connection: C, mut stop: watch::Receiver<bool>)
where
    C: Future<Output = Result<(), hyper::Error>> + GracefulShutdown,
{
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = stopped(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, "connection ended with an error");
    }
}

/// A connection that can be asked to close after its current request.
trait GracefulShutdown {
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B> GracefulShutdown for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

/// Completes once the stop flag is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}
