//! The HTTP ceiling: an axum "hello world" on the same machine, to compare flagstream's
//! figures with what the framework alone does. Listens on loopback only.

use axum::Router;
use axum::routing::get;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18081".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    if !listener.local_addr()?.ip().is_loopback() {
        eprintln!("flagstream-hello listens on loopback addresses only");
        std::process::exit(2);
    }
    println!("listening on {}", listener.local_addr()?);
    let app = Router::new().route("/", get(|| async { "hello" }));
    axum::serve(listener, app).await
}
