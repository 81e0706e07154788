//! stock-gateway: HTTP/JSON in front of stockd, over the native shard-aware client.
//!
//! Every error is a JSON body `{"error": code, "message": text}` with a
//! fitting status; see `docs/openapi.json` (also served at `/openapi.json`).

pub mod metrics;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use stockd_client::{
    constant_time_eq, Applied, Client, Error as StockdError, Key, Line, Options, Replicated, Status,
};

use crate::metrics::Metrics;

/// Request bodies larger than this get 413. Room for the longest request
/// the OpenAPI document allows plus one item (16,385 keys of the largest ids
/// take ~1.2 MB), so a request over a documented bound is answered 422 with
/// the bound, not 413.
pub const MAX_BODY_BYTES: usize = 2 << 20;
/// Largest `on_hand` an adjustment may set (2^53: exact in JSON).
pub const STOCK_MAX: u64 = 1 << 53;
/// The OpenAPI description served at /openapi.json.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

#[derive(Clone, Debug)]
pub struct Config {
    /// stockd's address (its shared port): `HOST:PORT`, or several,
    /// comma-separated, of a replicated stockd (the gateway follows the primary).
    pub stockd: String,
    /// Token stockd requires in HELLO, if any.
    pub stockd_token: Option<String>,
    /// Bearer keys accepted on mutating endpoints; empty: no auth.
    pub api_keys: Vec<String>,
    /// Require a key on read endpoints too.
    pub protect_reads: bool,
}

/// How long a request keeps looking for the primary of a replicated stockd.
pub const FOLLOW_PRIMARY_FOR: Duration = Duration::from_secs(5);

/// Shared by every request.
pub struct Gateway {
    cfg: Config,
    client: Replicated,
    pub metrics: Metrics,
}

/// An error answer: status, code, message, and optional extra fields.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Option<Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), extra: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.code, "message": self.message});
        if let (Some(Value::Object(extra)), Value::Object(b)) = (self.extra, &mut body) {
            b.extend(extra);
        }
        let mut resp = (self.status, Json(body)).into_response();
        resp.extensions_mut().insert(ErrorCode(self.code));
        resp
    }
}

/// Marks a response with its error code, for the metrics.
#[derive(Clone, Copy)]
pub struct ErrorCode(pub &'static str);

type ApiResult = Result<Response, ApiError>;

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status();
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            status,
            "payload_too_large",
            format!("request body exceeds the limit of {MAX_BODY_BYTES} bytes"),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ApiError::new(status, "unsupported_media_type", "send the body as Content-Type: application/json")
        }
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::new(status, "invalid_body", r.body_text()),
        _ => ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", r.body_text()),
    }
}

fn path_rejection(r: PathRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", r.body_text())
}

/// Maps a stockd answer that is not a success. `mutating`: the request
/// changes stock, so a lost connection leaves its outcome unknown.
fn stockd_error(e: StockdError, mutating: bool) -> ApiError {
    match e {
        StockdError::Insufficient { line, available } => ApiError {
            status: StatusCode::CONFLICT,
            code: "insufficient_stock",
            message: format!("line {line} cannot be filled: {available} available"),
            extra: Some(json!({"line": line, "available": available})),
        },
        StockdError::Server { status, message } => {
            let (code, name) = match status {
                Status::NotFound => (StatusCode::NOT_FOUND, "not_found"),
                Status::Conflict => (StatusCode::CONFLICT, "conflict"),
                Status::BadRequest => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
                Status::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
                Status::NotPrimary => (StatusCode::SERVICE_UNAVAILABLE, "not_primary"),
                Status::Unauthorized => (StatusCode::BAD_GATEWAY, "upstream_unauthorized"),
                _ => (StatusCode::BAD_GATEWAY, "upstream_error"),
            };
            ApiError::new(code, name, message)
        }
        other if mutating => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("stockd is unreachable ({other}); the mutation may or may not have been applied: retry with the same id"),
        ),
        other => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("stockd is unreachable ({other})")),
    }
}

fn is_connection_error(e: &StockdError) -> bool {
    matches!(e, StockdError::Io(_) | StockdError::Disconnected | StockdError::Protocol(_))
}

impl Gateway {
    /// A gateway in front of `cfg.stockd` (one address, or several of a
    /// replicated stockd). Connects on the first request.
    pub fn new(cfg: Config) -> Result<Arc<Gateway>, String> {
        let opts = Options { token: cfg.stockd_token.clone(), ..Options::default() };
        let mut client =
            Replicated::new(&cfg.stockd, opts).map_err(|e| format!("--stockd {:?}: {e}", cfg.stockd))?;
        // An HTTP caller waits this long at most while a standby takes over.
        client.follow_for = FOLLOW_PRIMARY_FOR;
        Ok(Arc::new(Gateway { cfg, client, metrics: Metrics::default() }))
    }

    /// Runs one read against stockd.
    async fn read<T, F, Fut>(&self, f: F) -> Result<T, ApiError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, StockdError>>,
    {
        self.call(false, f).await
    }

    /// Runs one mutation against stockd.
    async fn mutate<T, F, Fut>(&self, f: F) -> Result<T, ApiError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, StockdError>>,
    {
        self.call(true, f).await
    }

    /// Runs one call against stockd (following the primary when several
    /// addresses are given), timing it.
    async fn call<T, F, Fut>(&self, mutating: bool, f: F) -> Result<T, ApiError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, StockdError>>,
    {
        let t = Instant::now();
        let r = self.client.run(f).await;
        self.metrics.upstream(t.elapsed());
        r.map_err(|e| {
            if is_connection_error(&e) {
                tracing::warn!(error = %e, "lost stockd; reconnecting on the next request");
            }
            stockd_error(e, mutating)
        })
    }

    fn authorize(&self, headers: &HeaderMap, mutating: bool) -> Result<(), ApiError> {
        if self.cfg.api_keys.is_empty() || (!mutating && !self.cfg.protect_reads) {
            return Ok(());
        }
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Compare against every key without stopping early.
        let ok = self
            .cfg
            .api_keys
            .iter()
            .fold(false, |acc, k| acc | constant_time_eq(given.as_bytes(), k.as_bytes()));
        if ok {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or invalid Authorization: Bearer key",
            ))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineJson {
    vendor_item_id: u64,
    fulfillment_center_id: u32,
    qty: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyJson {
    vendor_item_id: u64,
    fulfillment_center_id: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBody {
    keys: Vec<KeyJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderBody {
    order_id: u64,
    lines: Vec<LineJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InboundBody {
    receipt_id: u64,
    lines: Vec<LineJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveBody {
    hold_id: u64,
    ttl_ms: u32,
    lines: Vec<LineJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdjustBody {
    vendor_item_id: u64,
    fulfillment_center_id: u32,
    on_hand: u64,
    #[serde(default)]
    reason: u16,
}

/// Most lines per order, receipt or hold, and keys per query (the protocol's limits).
const MAX_LINES: usize = 256;
const MAX_QUERY_KEYS: usize = 16_384;

fn lines(v: Vec<LineJson>) -> Result<Vec<Line>, ApiError> {
    if v.is_empty() || v.len() > MAX_LINES {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_lines",
            format!("lines must hold 1 to {MAX_LINES} entries, not {}", v.len()),
        ));
    }
    v.into_iter()
        .enumerate()
        .map(|(i, l)| {
            if l.qty == 0 {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_quantity",
                    format!("lines[{i}].qty must be greater than 0"),
                ));
            }
            Ok(Line::new(l.vendor_item_id, l.fulfillment_center_id, l.qty))
        })
        .collect()
}

fn stock_json(item: u64, fc: u32, available: u64) -> Value {
    json!({"vendor_item_id": item, "fulfillment_center_id": fc, "available": available})
}

/// 201 for a new mutation, 200 for a retry of an applied id.
fn applied(id_field: &str, id: u64, a: Applied, new_status: &str) -> Response {
    let (code, status, lsn) = match a {
        Applied::New { lsn } => (StatusCode::CREATED, new_status, lsn),
        Applied::Duplicate { lsn } => (StatusCode::OK, "duplicate", lsn),
    };
    (code, Json(json!({ id_field: id, "status": status, "lsn": lsn }))).into_response()
}

/// Like `applied`, for actions on an existing id: 200 either way.
fn acted(id_field: &str, id: u64, a: Applied, new_status: &str) -> Response {
    let (status, lsn) = match a {
        Applied::New { lsn } => (new_status, lsn),
        Applied::Duplicate { lsn } => ("duplicate", lsn),
    };
    (StatusCode::OK, Json(json!({ id_field: id, "status": status, "lsn": lsn }))).into_response()
}

type G = State<Arc<Gateway>>;

async fn stock_one(State(g): G, h: HeaderMap, p: Result<Path<(u64, u32)>, PathRejection>) -> ApiResult {
    g.authorize(&h, false)?;
    let Path((item, fc)) = p.map_err(path_rejection)?;
    let n = g.read(|c| async move { c.query(item, fc).await }).await?;
    Ok(Json(stock_json(item, fc, n)).into_response())
}

async fn stock_item(State(g): G, h: HeaderMap, p: Result<Path<u64>, PathRejection>) -> ApiResult {
    g.authorize(&h, false)?;
    let Path(item) = p.map_err(path_rejection)?;
    let rows = g.read(|c| async move { c.query_item(item).await }).await?;
    let centers: Vec<Value> = rows.iter().map(|(fc, n)| stock_json(item, *fc, *n)).collect();
    Ok(Json(json!({"vendor_item_id": item, "centers": centers})).into_response())
}

async fn stock_query(State(g): G, h: HeaderMap, b: Result<Json<QueryBody>, JsonRejection>) -> ApiResult {
    g.authorize(&h, false)?;
    let Json(b) = b.map_err(json_rejection)?;
    if b.keys.len() > MAX_QUERY_KEYS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "too_many_keys",
            format!("at most {MAX_QUERY_KEYS} keys per query, not {}", b.keys.len()),
        ));
    }
    let keys: Vec<Key> =
        b.keys.iter().map(|k| Key { item: k.vendor_item_id, fc: k.fulfillment_center_id }).collect();
    let ks: &[Key] = &keys;
    let values = g.read(|c| async move { c.query_batch(ks).await }).await?;
    let stock: Vec<Value> = keys.iter().zip(values).map(|(k, n)| stock_json(k.item, k.fc, n)).collect();
    Ok(Json(json!({ "stock": stock })).into_response())
}

async fn order(State(g): G, h: HeaderMap, b: Result<Json<OrderBody>, JsonRejection>) -> ApiResult {
    g.authorize(&h, true)?;
    let Json(b) = b.map_err(json_rejection)?;
    let (id, ls): (u64, &[Line]) = (b.order_id, &lines(b.lines)?);
    let a = g.mutate(|c| async move { c.order(id, ls).await }).await?;
    Ok(applied("order_id", id, a, "created"))
}

async fn cancel(State(g): G, h: HeaderMap, p: Result<Path<u64>, PathRejection>) -> ApiResult {
    g.authorize(&h, true)?;
    let Path(id) = p.map_err(path_rejection)?;
    let a = g.mutate(|c| async move { c.cancel(id).await }).await?;
    Ok(acted("order_id", id, a, "cancelled"))
}

async fn inbound(State(g): G, h: HeaderMap, b: Result<Json<InboundBody>, JsonRejection>) -> ApiResult {
    g.authorize(&h, true)?;
    let Json(b) = b.map_err(json_rejection)?;
    let (id, ls): (u64, &[Line]) = (b.receipt_id, &lines(b.lines)?);
    let a = g.mutate(|c| async move { c.inbound(id, ls).await }).await?;
    Ok(applied("receipt_id", id, a, "received"))
}

async fn reserve(State(g): G, h: HeaderMap, b: Result<Json<ReserveBody>, JsonRejection>) -> ApiResult {
    g.authorize(&h, true)?;
    let Json(b) = b.map_err(json_rejection)?;
    if b.ttl_ms == 0 || b.ttl_ms > 3_600_000 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_ttl",
            "ttl_ms must be 1..=3600000",
        ));
    }
    let (id, ttl, ls): (u64, u32, &[Line]) = (b.hold_id, b.ttl_ms, &lines(b.lines)?);
    let a = g.mutate(|c| async move { c.reserve(id, ttl, ls).await }).await?;
    Ok(applied("hold_id", id, a, "held"))
}

async fn confirm(State(g): G, h: HeaderMap, p: Result<Path<u64>, PathRejection>) -> ApiResult {
    g.authorize(&h, true)?;
    let Path(id) = p.map_err(path_rejection)?;
    let a = g.mutate(|c| async move { c.confirm(id).await }).await?;
    Ok(acted("hold_id", id, a, "confirmed"))
}

async fn release(State(g): G, h: HeaderMap, p: Result<Path<u64>, PathRejection>) -> ApiResult {
    g.authorize(&h, true)?;
    let Path(id) = p.map_err(path_rejection)?;
    let a = g.mutate(|c| async move { c.release(id).await }).await?;
    Ok(acted("hold_id", id, a, "released"))
}

async fn adjust(State(g): G, h: HeaderMap, b: Result<Json<AdjustBody>, JsonRejection>) -> ApiResult {
    g.authorize(&h, true)?;
    let Json(b) = b.map_err(json_rejection)?;
    if b.on_hand > STOCK_MAX {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_quantity",
            format!("on_hand must be at most {STOCK_MAX}"),
        ));
    }
    let (item, fc, on_hand, reason) = (b.vendor_item_id, b.fulfillment_center_id, b.on_hand, b.reason);
    let a = g.mutate(|c| async move { c.adjust(item, fc, on_hand, reason).await }).await?;
    let lsn = a.lsn();
    Ok(Json(json!({"vendor_item_id": item, "fulfillment_center_id": fc, "on_hand": on_hand, "status": "adjusted", "lsn": lsn}))
        .into_response())
}

async fn healthz(State(g): G) -> ApiResult {
    g.read(|c| async move { c.ping().await }).await?;
    Ok(Json(json!({"status": "ok", "stockd": g.cfg.stockd})).into_response())
}

async fn metrics_text(State(g): G) -> Response {
    // stockd's sinks and their backlog come from its STATS; without stockd
    // the gateway's own figures are still served.
    if let Ok(stats) = g.read(|c| async move { c.stats().await }).await {
        g.metrics.stockd_stats(&stats);
    }
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        g.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route; see /openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

/// Counts and times every request by its route pattern.
async fn track(State(g): G, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |m| m.as_str()).to_string();
    let method = req.method().as_str().to_string();
    let t = Instant::now();
    let resp = next.run(req).await;
    let code = resp.extensions().get::<ErrorCode>().map(|c| c.0);
    g.metrics.request(&method, &route, resp.status().as_u16(), code, t.elapsed());
    resp
}

/// The whole HTTP API.
pub fn app(g: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/stock/query", post(stock_query))
        .route("/v1/stock/{vendor_item_id}", get(stock_item))
        .route("/v1/stock/{vendor_item_id}/{fulfillment_center_id}", get(stock_one))
        .route("/v1/orders", post(order))
        .route("/v1/orders/{order_id}/cancel", post(cancel))
        .route("/v1/inbounds", post(inbound))
        .route("/v1/reservations", post(reserve))
        .route("/v1/reservations/{hold_id}/confirm", post(confirm))
        .route("/v1/reservations/{hold_id}/release", post(release))
        .route("/v1/adjustments", post(adjust))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(g.clone(), track))
        .with_state(g)
}

/// Binds and serves until the future resolves (or forever).
pub async fn serve(
    listener: tokio::net::TcpListener,
    g: Arc<Gateway>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(g)).with_graceful_shutdown(shutdown).await
}
