//! stockd-log: prints the records of a data directory's write-ahead log as
//! JSON lines, oldest first, from a given LSN. Read-only: safe to run
//! against the directory of a running server.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde_json::{json, Value};
use stockd_persistence::wal;
use stockd_record::{LogRecord, Mutation, Op};

/// Prints stockd's log records as JSON lines.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The data directory of a stockd server.
    #[arg(long, default_value = "./stockd-data")]
    data_dir: PathBuf,
    /// First LSN to print (default: the oldest record still in the log).
    #[arg(long)]
    from: Option<u64>,
    /// Print at most this many records.
    #[arg(long)]
    count: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stockd-log: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> Result<ExitCode, String> {
    let dir = &args.data_dir;
    let segments = wal::list_segments(dir).map_err(|e| e.to_string())?;
    let Some(oldest) = segments.first().map(|(lsn, _)| *lsn) else {
        return Err(format!("{}: no log segments (not a stockd data directory?)", dir.display()));
    };
    let from = args.from.unwrap_or(oldest);
    if from < oldest {
        eprintln!("stockd-log: the log starts at LSN {oldest}; older records were deleted behind a snapshot");
    }
    let from = from.max(oldest);
    let (mut printed, mut undecodable) = (0u64, 0u64);
    let limit = args.count.unwrap_or(u64::MAX);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut write_error: Option<std::io::Error> = None;
    let end = wal::scan(dir, from - 1, |r| {
        if printed >= limit || write_error.is_some() {
            return;
        }
        let line = match LogRecord::decode(r.payload) {
            Ok(record) => to_json(r.lsn, r.ts_ms, &record),
            Err(e) => {
                undecodable += 1;
                json!({ "lsn": r.lsn, "ts_ms": r.ts_ms, "error": e })
            }
        };
        write_error = writeln!(out, "{line}").err();
        printed += 1;
    })
    .map_err(|e| e.to_string())?;
    match write_error.map_or_else(|| out.flush(), Err) {
        // A reader that stopped early (`| head`) has what it wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => return Err(format!("stdout: {e}")),
        Ok(()) => {}
    }
    if let Some(t) = end.torn {
        eprintln!(
            "stockd-log: {} ends in {} bytes that are not a whole record ({}): a write cut short by a crash, \
             or one the server is making now",
            t.segment.display(),
            t.bytes,
            t.why
        );
    }
    if undecodable > 0 {
        eprintln!("stockd-log: {undecodable} records could not be decoded (see their \"error\" fields)");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// One record as a JSON object: lsn, ts_ms, type, and the type's fields.
fn to_json(lsn: u64, ts_ms: u64, record: &LogRecord) -> Value {
    let m = match record {
        LogRecord::Layout { shards } => {
            return json!({ "lsn": lsn, "ts_ms": ts_ms, "type": "layout", "shards": shards })
        }
        LogRecord::Mutation(m) => m,
    };
    let mut v = json!({ "lsn": lsn, "ts_ms": ts_ms, "type": type_name(m) });
    let fields = v.as_object_mut().expect("an object");
    match m.op {
        Op::Order { id } | Op::Inbound { id } | Op::Cancel { id } | Op::Confirm { id } => {
            fields.insert("id".into(), id.into());
        }
        Op::Reserve { id, ttl_ms } => {
            fields.insert("id".into(), id.into());
            fields.insert("ttl_ms".into(), ttl_ms.into());
        }
        Op::Release { id, expired } => {
            fields.insert("id".into(), id.into());
            fields.insert("expired".into(), expired.into());
        }
        Op::Adjust { before, after, reason } => {
            fields.insert("on_hand_before".into(), before.into());
            fields.insert("on_hand_after".into(), after.into());
            fields.insert("reason".into(), reason.into());
        }
    }
    let lines: Vec<Value> = m
        .lines
        .iter()
        .map(|l| json!({ "vendor_item_id": l.key.item, "fulfillment_center_id": l.key.fc, "qty": l.qty }))
        .collect();
    fields.insert("lines".into(), lines.into());
    v
}

fn type_name(m: &Mutation) -> &'static str {
    match m.op {
        Op::Order { .. } => "order",
        Op::Inbound { .. } => "inbound",
        Op::Cancel { .. } => "cancel",
        Op::Reserve { .. } => "reserve",
        Op::Confirm { .. } => "confirm",
        Op::Release { .. } => "release",
        Op::Adjust { .. } => "adjust",
    }
}
