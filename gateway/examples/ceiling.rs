//! The ceiling for any axum service on this machine: one route answering a
//! constant JSON body, on the same runtime setup as stock-gateway. Used by
//! scripts/gateway-bench.sh as the baseline.
//!
//! `cargo run --release -p stock-gateway --example ceiling -- 127.0.0.1:8090`

use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8090".into());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let app = Router::new().route(
            "/v1/stock/{item}/{fc}",
            get(|| async {
                Json(json!({"vendor_item_id": 1001, "fulfillment_center_id": 7, "available": 10}))
            }),
        );
        let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
        axum::serve(listener, app).await.unwrap();
    });
}
