//! Real HTTP over 127.0.0.1 against a real stockd: every endpoint, every
//! error case, idempotent retries, auth, and stockd restarting underneath.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use stock_gateway::{serve, Config, Gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 request on a fresh connection; returns status and body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete HTTP response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

struct Api {
    addr: SocketAddr,
    key: Option<String>,
}

impl Api {
    async fn get(&self, path: &str) -> (u16, Value) {
        self.send("GET", path, b"").await
    }
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send("POST", path, body.to_string().as_bytes()).await
    }
    async fn send(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let auth = self.key.as_ref().map(|k| format!("Bearer {k}"));
        let mut h = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            h.push(("Authorization", a.as_str()));
        }
        let (status, text) = http(self.addr, method, path, &h, body).await;
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: {status} non-JSON body {text:?}: {e}"));
        (status, v)
    }
}

async fn gateway(
    stockd: SocketAddr,
    api_keys: Vec<String>,
    protect_reads: bool,
) -> (SocketAddr, Arc<Gateway>) {
    let g = Gateway::new(Config { stockd: stockd.to_string(), stockd_token: None, api_keys, protect_reads })
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gw = g.clone();
    tokio::spawn(async move { serve(listener, gw, std::future::pending()).await.unwrap() });
    (addr, g)
}

fn stockd_at(dir: &Path, listen: &str) -> stockd::Running {
    let mut cfg = stockd::Config::new(listen.parse().unwrap(), dir, 2);
    cfg.pin = false;
    cfg.shard_port_base = Some(0);
    stockd::start(cfg).unwrap()
}

fn line(item: u64, fc: u32, qty: i64) -> Value {
    json!({"vendor_item_id": item, "fulfillment_center_id": fc, "qty": qty})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_and_idempotent_retries() {
    let dir = tempfile::tempdir().unwrap();
    let srv = stockd_at(dir.path(), "127.0.0.1:0");
    let (addr, _) = gateway(srv.addr, vec![], false).await;
    let api = Api { addr, key: None };

    let (s, v) = api
        .post("/v1/inbounds", json!({"receipt_id": 1, "lines": [line(1001, 7, 10), line(1001, 9, 30)]}))
        .await;
    assert_eq!((s, v["status"].as_str(), v["receipt_id"].as_u64()), (201, Some("received"), Some(1)), "{v}");
    let (s, v) = api.post("/v1/inbounds", json!({"receipt_id": 1, "lines": [line(1001, 7, 10)]})).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("duplicate")), "{v}");

    let (s, v) = api.get("/v1/stock/1001/7").await;
    assert_eq!((s, v), (200, json!({"vendor_item_id": 1001, "fulfillment_center_id": 7, "available": 10})));
    let (s, v) = api.get("/v1/stock/1001").await;
    assert_eq!(s, 200);
    assert_eq!(
        v["centers"],
        json!([{"vendor_item_id": 1001, "fulfillment_center_id": 7, "available": 10}, {"vendor_item_id": 1001, "fulfillment_center_id": 9, "available": 30}])
    );
    let keys = json!({"keys": [{"vendor_item_id": 1001, "fulfillment_center_id": 9}, {"vendor_item_id": 5, "fulfillment_center_id": 1}]});
    let (s, v) = api.post("/v1/stock/query", keys).await;
    assert_eq!(s, 200);
    assert_eq!(v["stock"][0]["available"], 30);
    assert_eq!(v["stock"][1]["available"], 0);

    let order = json!({"order_id": 42, "lines": [line(1001, 7, 2), line(1001, 9, 5)]});
    let (s, v) = api.post("/v1/orders", order.clone()).await;
    assert_eq!((s, v["status"].as_str(), v["order_id"].as_u64()), (201, Some("created"), Some(42)), "{v}");
    let lsn = v["lsn"].clone();
    let (s, v) = api.post("/v1/orders", order).await;
    assert_eq!(
        (s, v["status"].as_str(), &v["lsn"]),
        (200, Some("duplicate"), &lsn),
        "a retry answers the original"
    );
    assert_eq!(api.get("/v1/stock/1001/7").await.1["available"], 8);
    let (s, v) =
        api.post("/v1/orders", json!({"order_id": 43, "lines": [line(1001, 7, 1), line(1001, 9, 26)]})).await;
    assert_eq!(s, 409);
    assert_eq!(
        (v["error"].as_str(), v["line"].as_u64(), v["available"].as_u64()),
        (Some("insufficient_stock"), Some(1), Some(25))
    );

    let (s, v) = api.post("/v1/orders/42/cancel", json!({})).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    let (s, v) = api.post("/v1/orders/42/cancel", json!({})).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("duplicate")));
    let (s, v) = api.post("/v1/orders/4242/cancel", json!({})).await;
    assert_eq!((s, v["error"].as_str()), (404, Some("not_found")));
    assert_eq!(api.get("/v1/stock/1001/7").await.1["available"], 10);

    let hold = json!({"hold_id": 77, "ttl_ms": 60000, "lines": [line(1001, 7, 3)]});
    let (s, v) = api.post("/v1/reservations", hold).await;
    assert_eq!((s, v["status"].as_str()), (201, Some("held")), "{v}");
    assert_eq!(api.get("/v1/stock/1001/7").await.1["available"], 7);
    let (s, v) = api.post("/v1/reservations/77/confirm", json!({})).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("confirmed")));
    let (s, v) = api.post("/v1/reservations/77/release", json!({})).await;
    assert_eq!((s, v["error"].as_str()), (409, Some("conflict")));
    let (s, _) = api
        .post("/v1/reservations", json!({"hold_id": 78, "ttl_ms": 60000, "lines": [line(1001, 9, 1)]}))
        .await;
    assert_eq!(s, 201);
    let (s, v) = api.post("/v1/reservations/78/release", json!({})).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("released")));

    let adj = json!({"vendor_item_id": 1001, "fulfillment_center_id": 7, "on_hand": 50, "reason": 3});
    let (s, v) = api.post("/v1/adjustments", adj).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("adjusted")), "{v}");
    assert_eq!(api.get("/v1/stock/1001/7").await.1["available"], 50);

    let (s, v) = api.get("/healthz").await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    let (s, v) = api.get("/openapi.json").await;
    assert_eq!(s, 200);
    assert_eq!(v["openapi"], "3.0.3");
    assert!(v["paths"]["/v1/orders"]["post"].is_object());
    let (s, text) = http(addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(s, 200);
    assert!(
        text.contains("stock_gateway_requests_total{method=\"POST\",route=\"/v1/orders\",status=\"201\"} 1"),
        "{text}"
    );
    assert!(text.contains("stock_gateway_errors_total{code=\"insufficient_stock\"} 1"), "{text}");
    assert!(text.contains("stock_gateway_request_duration_seconds_bucket{le=\"+Inf\",method=\"GET\",route=\"/v1/stock/{vendor_item_id}/{fulfillment_center_id}\"} 5"), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "a complete OpenMetrics exposition");
    assert!(text.contains("stock_gateway_upstream_duration_seconds_count "));
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_json_errors_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = stockd_at(dir.path(), "127.0.0.1:0");
    let (addr, _) = gateway(srv.addr, vec![], false).await;
    let api = Api { addr, key: None };
    api.post("/v1/inbounds", json!({"receipt_id": 1, "lines": [line(1, 1, 5)]})).await;

    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("POST", "/v1/orders", b"{\"order_id\": 1,".to_vec(), 400, "malformed_json"),
        ("POST", "/v1/orders", b"not json at all".to_vec(), 400, "malformed_json"),
        (
            "POST",
            "/v1/orders",
            json!({"order_id": "x", "lines": []}).to_string().into_bytes(),
            422,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/orders",
            json!({"lines": [line(1, 1, 1)]}).to_string().into_bytes(),
            422,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/orders",
            json!({"order_id": 1, "lines": [line(1, 1, 0)]}).to_string().into_bytes(),
            422,
            "invalid_quantity",
        ),
        (
            "POST",
            "/v1/orders",
            json!({"order_id": 1, "lines": [line(1, 1, -3)]}).to_string().into_bytes(),
            422,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/orders",
            json!({"order_id": 1, "lines": [line(1, 1, 5_000_000_000)]}).to_string().into_bytes(),
            422,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/orders",
            json!({"order_id": -1, "lines": [line(1, 1, 1)]}).to_string().into_bytes(),
            422,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/orders",
            json!({"order_id": 1, "lines": []}).to_string().into_bytes(),
            422,
            "invalid_lines",
        ),
        (
            "POST",
            "/v1/orders",
            json!({"order_id": 1, "lines": [line(1, 1, 1)], "extra": 1}).to_string().into_bytes(),
            422,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/reservations",
            json!({"hold_id": 1, "ttl_ms": 0, "lines": [line(1, 1, 1)]}).to_string().into_bytes(),
            422,
            "invalid_ttl",
        ),
        (
            "POST",
            "/v1/adjustments",
            json!({"vendor_item_id": 1, "fulfillment_center_id": 1, "on_hand": 9007199254740993u64})
                .to_string()
                .into_bytes(),
            422,
            "invalid_quantity",
        ),
        ("POST", "/v1/orders", vec![b' '; stock_gateway::MAX_BODY_BYTES + 1], 413, "payload_too_large"),
        ("GET", "/v1/stock/abc/1", vec![], 400, "invalid_path"),
        ("GET", "/v1/stock/1/99999999999", vec![], 400, "invalid_path"),
        ("POST", "/v1/orders/x/cancel", vec![], 400, "invalid_path"),
        ("GET", "/v2/nothing", vec![], 404, "not_found"),
        ("DELETE", "/v1/orders", vec![], 405, "method_not_allowed"),
        ("GET", "/v1/orders", vec![], 405, "method_not_allowed"),
    ];
    for (method, path, body, want, code) in cases {
        let (s, v) = api.send(method, path, &body).await;
        assert_eq!((s, v["error"].as_str()), (want, Some(code)), "{method} {path}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Missing content type.
    let (s, text) = http(
        addr,
        "POST",
        "/v1/orders",
        &[],
        json!({"order_id": 1, "lines": [line(1, 1, 1)]}).to_string().as_bytes(),
    )
    .await;
    assert_eq!(s, 415, "{text}");
    // Nothing above changed stock, and the gateway still answers.
    assert_eq!(
        api.get("/v1/stock/1/1").await,
        (200, json!({"vendor_item_id": 1, "fulfillment_center_id": 1, "available": 5}))
    );
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_mutations_and_optionally_reads() {
    let dir = tempfile::tempdir().unwrap();
    let srv = stockd_at(dir.path(), "127.0.0.1:0");
    let inbound = json!({"receipt_id": 1, "lines": [line(1, 1, 5)]});
    for protect_reads in [false, true] {
        let (addr, _) = gateway(srv.addr, vec!["k-one".into(), "k-two".into()], protect_reads).await;
        let none = Api { addr, key: None };
        let wrong = Api { addr, key: Some("k-on".into()) };
        let right = Api { addr, key: Some("k-two".into()) };
        assert_eq!(none.post("/v1/inbounds", inbound.clone()).await.0, 401);
        let (s, v) = wrong.post("/v1/inbounds", inbound.clone()).await;
        assert_eq!((s, v["error"].as_str()), (401, Some("unauthorized")));
        assert!(matches!(right.post("/v1/inbounds", inbound.clone()).await.0, 200 | 201));
        let read = none.get("/v1/stock/1/1").await.0;
        assert_eq!(read, if protect_reads { 401 } else { 200 });
        assert_eq!(right.get("/v1/stock/1/1").await.1["available"], 5);
    }
    // Without keys configured, no auth is asked for.
    let (addr, _) = gateway(srv.addr, vec![], false).await;
    assert_eq!(
        Api { addr, key: None }.post("/v1/orders", json!({"order_id": 9, "lines": [line(1, 1, 1)]})).await.0,
        201
    );
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_stockd_restarting_underneath() {
    let dir = tempfile::tempdir().unwrap();
    let srv = stockd_at(dir.path(), "127.0.0.1:0");
    let stockd_addr = srv.addr;
    let (addr, _) = gateway(stockd_addr, vec![], false).await;
    let api = Api { addr, key: None };
    assert_eq!(api.post("/v1/inbounds", json!({"receipt_id": 1, "lines": [line(3, 1, 4)]})).await.0, 201);
    srv.shutdown();
    // The first call after the loss meets the broken connection itself.
    let (s, v) = api.get("/healthz").await;
    assert_eq!(s, 503);
    let message = v["message"].as_str().unwrap();
    assert!(!message.contains("mutation"), "a health check says nothing of mutations: {message}");
    let (s, v) = api.get("/v1/stock/3/1").await;
    assert_eq!((s, v["error"].as_str()), (503, Some("unavailable")), "{v}");
    let (s, v) = api.post("/v1/orders", json!({"order_id": 5, "lines": [line(3, 1, 1)]})).await;
    assert_eq!(s, 503, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("retry with the same id")
            || v["message"].as_str().unwrap().contains("unreachable")
    );

    let srv = stockd_at(dir.path(), &stockd_addr.to_string());
    let mut ok = false;
    for _ in 0..50 {
        let (s, v) = api.get("/v1/stock/3/1").await;
        if s == 200 {
            assert_eq!(v["available"], 4, "durable across the restart");
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the gateway reconnected by itself");
    assert_eq!(api.post("/v1/orders", json!({"order_id": 5, "lines": [line(3, 1, 1)]})).await.0, 201);
    assert_eq!(api.get("/healthz").await.0, 200);
    srv.shutdown();
}

/// The schemathesis CLI that `.ci/run` installs into `.venv`.
fn schemathesis() -> std::path::PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/schemathesis");
    assert!(
        p.exists(),
        "schemathesis is needed: python3 -m venv .venv && .venv/bin/pip install schemathesis (.ci/run does it)"
    );
    p
}

/// A schema-driven tester, with all its checks, against the gateway's own
/// /openapi.json and a real stockd: what the document allows is accepted,
/// what it forbids is refused with a status it documents, every answer fits
/// its schema, and the links reach confirm, release and cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_what_the_gateway_does() {
    let dir = tempfile::tempdir().unwrap();
    let srv = stockd_at(dir.path(), "127.0.0.1:0");
    let (addr, _) = gateway(srv.addr, vec![], false).await;
    let tester = schemathesis();
    let run = move || {
        std::process::Command::new("timeout")
            .arg("300")
            .arg(tester)
            .args(["run", &format!("http://{addr}/openapi.json"), "--checks", "all"])
            .args(["--max-examples", "25", "--seed", "20261126", "--no-color"])
            .output()
    };
    // Off the runtime's threads: the gateway answers on them meanwhile.
    let out = tokio::task::spawn_blocking(run).await.unwrap().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found mismatches:\n{report}");
    assert!(report.contains("Stateful"), "the stateful phase ran (links):\n{report}");
    srv.shutdown();
}
