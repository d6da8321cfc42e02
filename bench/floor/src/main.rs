//! Framework floor: a bare axum handler that returns a constant body (read
//! once at start and leaked, so serving it copies nothing), with the same
//! headers tokenkeeper sends. No state, no lock, default runtime.
//!
//! Usage: tokenkeeper-bench-floor ADDR BODY_FILE

use axum::http::header;
use axum::routing::get;
use axum::Router;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().expect("usage: floor ADDR BODY_FILE");
    let file = args.next().expect("usage: floor ADDR BODY_FILE");
    let body: &'static [u8] = Box::leak(std::fs::read(file).expect("body file").into_boxed_slice());
    let app = Router::new().route(
        "/v1/token/demo",
        get(move || async move {
            (
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                body,
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    axum::serve(listener, app).await.expect("serve");
}
