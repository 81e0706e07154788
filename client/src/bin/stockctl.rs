//! stockctl: command-line access to a stockd server.
//!
//! Exit codes: 0 success (a retried id that was already applied counts as
//! success), 3 refused for lack of stock, 2 bad arguments, 1 any other error.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use stockd_client::{Applied, Error, Key, Line, Options, Replicated};

#[derive(Parser, Debug)]
#[command(version, about = "Query and change stock on a stockd server")]
struct Cli {
    /// Server address, HOST:PORT (HOST a name or an IP); several, comma-separated,
    /// for a replicated stockd: the command goes to the primary.
    #[arg(long, global = true, default_value = "127.0.0.1:7400", value_parser = parse_addr)]
    addr: String,
    /// Auth token, if the server requires one.
    #[arg(long, global = true, env = "STOCKD_AUTH_TOKEN")]
    token: Option<String>,
    /// Machine-readable output (one JSON object).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Available units of one row, or of every center of ITEM when FC is left out.
    Query { item: u64, fc: Option<u32> },
    /// Place an order: all lines or none.
    Order {
        /// The order id: retrying with the same id never orders twice.
        #[arg(long)]
        id: u64,
        /// Lines as ITEM:FC:QTY (vendor item id, fulfillment center id, units).
        #[arg(required = true, value_parser = parse_line)]
        lines: Vec<Line>,
    },
    /// Book an inbound receipt.
    Inbound {
        /// The receipt id: retrying with the same id never books twice.
        #[arg(long)]
        id: u64,
        /// Lines as ITEM:FC:QTY (vendor item id, fulfillment center id, units).
        #[arg(required = true, value_parser = parse_line)]
        lines: Vec<Line>,
    },
    /// Cancel an order; its units come back.
    Cancel { id: u64 },
    /// Hold units until confirmed, released, or the TTL passes.
    Reserve {
        /// The hold id, used again to confirm or release it.
        #[arg(long)]
        id: u64,
        /// Milliseconds until the hold is released by itself (at most 3,600,000).
        #[arg(long, default_value_t = 600_000)]
        ttl_ms: u32,
        /// Lines as ITEM:FC:QTY (vendor item id, fulfillment center id, units).
        #[arg(required = true, value_parser = parse_line)]
        lines: Vec<Line>,
    },
    /// Turn a hold into an order.
    Confirm { id: u64 },
    /// Give a hold's units back.
    Release { id: u64 },
    /// Set a row's on-hand quantity after a stock-take.
    Adjust {
        /// Vendor item id.
        item: u64,
        /// Fulfillment center id.
        fc: u32,
        /// The units counted on hand; available becomes this minus what is held.
        on_hand: u64,
        /// Your reason code (0-65535), stored in the log with the adjustment.
        #[arg(long, default_value_t = 0)]
        reason: u16,
    },
    /// Server counters.
    Stats,
    /// Make the replicating standby at --addr the primary now, and wait
    /// (up to --wait-secs) until it serves as one (docs/ha.md).
    Promote {
        #[arg(long, default_value_t = 10)]
        wait_secs: u64,
    },
    /// Round trip to the server.
    Ping,
}

/// HOST:PORT, or several comma-separated (a replicated stockd: the command
/// goes to the primary), checked for shape here (so a typo is a bad
/// argument, exit 2); names are resolved when connecting.
fn parse_addr(s: &str) -> Result<String, String> {
    for a in s.split(',') {
        let bad = || format!("`{a}`: expected HOST:PORT, for example 127.0.0.1:7400");
        let (host, port) = a.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad());
        }
    }
    Ok(s.to_string())
}

fn parse_line(s: &str) -> Result<Line, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let [item, fc, qty] = parts[..] else {
        return Err(format!("`{s}`: expected ITEM:FC:QTY"));
    };
    let item = item.parse::<u64>().map_err(|e| format!("`{s}`: vendor_item_id: {e}"))?;
    let fc = fc.parse::<u32>().map_err(|e| format!("`{s}`: fulfillment_center_id: {e}"))?;
    let qty = qty.parse::<u32>().map_err(|e| format!("`{s}`: qty: {e}"))?;
    if qty == 0 {
        return Err(format!("`{s}`: qty must be greater than 0"));
    }
    Ok(Line { key: Key { item, fc }, qty })
}

fn lines_json(lines: &[Line]) -> Value {
    lines
        .iter()
        .map(|l| json!({"vendor_item_id": l.key.item, "fulfillment_center_id": l.key.fc, "qty": l.qty}))
        .collect()
}

async fn run(cli: &Cli) -> Result<Value, Error> {
    let opts = Options { token: cli.token.clone(), ..Options::default() };
    let client = Replicated::new(&cli.addr, opts)?;
    let applied = |what: &str, id_field: &str, id: u64, a: Applied| {
        let (status, lsn) = match a {
            Applied::New { lsn } => ("ok", lsn),
            Applied::Duplicate { lsn } => ("duplicate", lsn),
        };
        json!({ "status": status, id_field: id, "lsn": lsn, "kind": what })
    };
    Ok(match &cli.cmd {
        Cmd::Query { item, fc: Some(fc) } => {
            let n = client.query(*item, *fc).await?;
            json!({"vendor_item_id": item, "fulfillment_center_id": fc, "available": n})
        }
        Cmd::Query { item, fc: None } => {
            let rows = client.query_item(*item).await?;
            let centers: Vec<Value> = rows
                .iter()
                .map(|(fc, n)| json!({"vendor_item_id": item, "fulfillment_center_id": fc, "available": n}))
                .collect();
            json!({"vendor_item_id": item, "centers": centers})
        }
        Cmd::Order { id, lines } => {
            let mut v = applied("order", "order_id", *id, client.order(*id, lines).await?);
            v["lines"] = lines_json(lines);
            v
        }
        Cmd::Inbound { id, lines } => {
            let mut v = applied("inbound", "receipt_id", *id, client.inbound(*id, lines).await?);
            v["lines"] = lines_json(lines);
            v
        }
        Cmd::Cancel { id } => applied("cancel", "order_id", *id, client.cancel(*id).await?),
        Cmd::Reserve { id, ttl_ms, lines } => {
            let mut v = applied("reserve", "hold_id", *id, client.reserve(*id, *ttl_ms, lines).await?);
            v["ttl_ms"] = json!(ttl_ms);
            v
        }
        Cmd::Confirm { id } => applied("confirm", "hold_id", *id, client.confirm(*id).await?),
        Cmd::Release { id } => applied("release", "hold_id", *id, client.release(*id).await?),
        Cmd::Adjust { item, fc, on_hand, reason } => {
            let a = client.adjust(*item, *fc, *on_hand, *reason).await?;
            let mut v = applied("adjust", "vendor_item_id", *item, a);
            v["fulfillment_center_id"] = json!(fc);
            v["on_hand"] = json!(on_hand);
            v
        }
        Cmd::Stats => {
            let m: serde_json::Map<String, Value> = client
                .run(|c| async move { c.stats().await })
                .await?
                .into_iter()
                .map(|(k, v)| (k, json!(v)))
                .collect();
            Value::Object(m)
        }
        Cmd::Ping => {
            client.run(|c| async move { c.ping().await }).await?;
            json!({"status": "ok"})
        }
        Cmd::Promote { wait_secs } => promote(&cli.addr, client, *wait_secs).await?,
    })
}

/// PROMOTE to the one node named, then STATS until it says it is the primary.
async fn promote(addr: &str, client: Replicated, wait_secs: u64) -> Result<Value, Error> {
    if client.addrs().len() != 1 {
        return Err(Error::Protocol(format!("promote names one node, not {addr}")));
    }
    client.run(|c| async move { c.promote().await }).await?;
    let t = std::time::Instant::now();
    loop {
        let stats = client.run(|c| async move { c.stats().await }).await?;
        let get = |name: &str| stats.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
        if get("replication_role") == Some(1) {
            return Ok(json!({"status": "primary", "addr": addr, "epoch": get("replication_epoch")}));
        }
        if t.elapsed() >= std::time::Duration::from_secs(wait_secs) {
            let message = format!(
                "{addr} was asked to take over but is not the primary after {wait_secs} s (its reader must first catch up with the replication topic)"
            );
            return Err(Error::Server { status: stockd_client::Status::Internal, message });
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn human(cmd: &Cmd, v: &Value) -> String {
    match cmd {
        Cmd::Query { fc: Some(_), .. } => format!(
            "item {} at center {}: {} available",
            v["vendor_item_id"], v["fulfillment_center_id"], v["available"]
        ),
        Cmd::Query { fc: None, .. } => {
            let centers = v["centers"].as_array().cloned().unwrap_or_default();
            if centers.is_empty() {
                return format!("item {}: no stock at any center", v["vendor_item_id"]);
            }
            centers
                .iter()
                .map(|c| {
                    format!(
                        "item {} at center {}: {} available",
                        c["vendor_item_id"], c["fulfillment_center_id"], c["available"]
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
        Cmd::Stats => v
            .as_object()
            .map(|m| m.iter().map(|(k, v)| format!("{k:<22} {v}")).collect::<Vec<_>>().join("\n"))
            .unwrap_or_default(),
        Cmd::Ping => "pong".into(),
        Cmd::Promote { .. } => {
            format!("{} is the primary (epoch {})", v["addr"].as_str().unwrap_or(""), v["epoch"])
        }
        _ => {
            let id = ["order_id", "receipt_id", "hold_id", "vendor_item_id"]
                .iter()
                .find_map(|f| v.get(*f).map(|id| format!("{f} {id}")))
                .unwrap_or_default();
            if v["status"] == "duplicate" {
                format!(
                    "{} {id}: already applied at LSN {} (nothing changed)",
                    v["kind"].as_str().unwrap_or(""),
                    v["lsn"]
                )
            } else {
                format!("{} {id}: ok, durable at LSN {}", v["kind"].as_str().unwrap_or(""), v["lsn"])
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stockctl: cannot start a runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(&cli)) {
        Ok(v) => {
            if cli.json {
                println!("{v}");
            } else {
                println!("{}", human(&cli.cmd, &v));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            // The same fields as the HTTP gateway's errors: `error` a code, `message` a sentence.
            let (code, error) = match &e {
                Error::Insufficient { .. } => (3, "insufficient_stock"),
                Error::Server { status, .. } => (1, status.name()),
                Error::Io(_) | Error::Disconnected => (1, "unavailable"),
                Error::Protocol(_) => (1, "protocol"),
            };
            if cli.json {
                let mut v = json!({"status": error, "error": error, "message": e.to_string()});
                if let Error::Insufficient { line, available } = e {
                    v["line"] = json!(line);
                    v["available"] = json!(available);
                }
                if let Cmd::Order { id, .. } | Cmd::Cancel { id } = &cli.cmd {
                    v["order_id"] = json!(id);
                }
                println!("{v}");
            } else {
                eprintln!("stockctl: {e}");
            }
            ExitCode::from(code)
        }
    }
}
