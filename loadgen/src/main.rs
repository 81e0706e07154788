use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use stock_loadgen::{hgrm, plot, run, Config, Outcome, Target, Workload};

/// Load generator for stockd and Redis: same workloads, HdrHistogram latency.
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Draw latency by percentile of several .hgrm files into one SVG.
    Plot {
        /// Files written with --hgrm; each may be given as LABEL=FILE.
        #[arg(required = true)]
        inputs: Vec<String>,
        #[arg(short = 'o', long, default_value = "latency.svg")]
        output: PathBuf,
        #[arg(long, default_value = "latency by percentile")]
        title: String,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// stockd://HOST:PORT or redis://HOST:PORT
    #[arg(long, default_value = "stockd://127.0.0.1:7400")]
    target: Target,
    /// query | query-batch | order | inbound | mixed:Q,O,I (percentages)
    #[arg(long, default_value = "query")]
    workload: Workload,
    /// Vendor items 1..=N.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Fulfillment centers 1..=M per item.
    #[arg(long, default_value_t = 4)]
    centers: u32,
    /// Zipf exponent of item popularity (0 = uniform, 0.99 = a launch-day hot item).
    #[arg(long, default_value_t = 0.0)]
    zipf: f64,
    /// Clients, each with `--pipeline` requests in flight. The clients of one
    /// thread share its connections to the target (stockd: one per shard;
    /// Redis: one), unless `--own-connections`.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Each client opens connections of its own (stockd: one per shard per
    /// client), as every client did before the clients of a thread shared them.
    #[arg(long)]
    own_connections: bool,
    /// Requests in flight per client.
    #[arg(long, default_value_t = 16)]
    pipeline: usize,
    /// Keys per query-batch request.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Lines per order or inbound.
    #[arg(long, default_value_t = 1)]
    lines: usize,
    /// Run time, e.g. 10s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Offered requests per second (open loop, latency from intended send time); default closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Random seed (also makes order/receipt ids of different runs distinct); default: the clock.
    #[arg(long)]
    seed: Option<u64>,
    /// Put --preload-qty units on every key first, through the target's write path.
    #[arg(long)]
    preload: bool,
    #[arg(long, default_value_t = 1_000_000)]
    preload_qty: u32,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the HdrHistogram percentile distribution here.
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Threads of the load generator: each opens its share of the connections
    /// and runs their callers on itself (a current-thread runtime).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| c.is_ascii_alphabetic()).map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|e| format!("`{s}`: {e}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("`{s}`: unit must be ms, s or m")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("`{s}`: must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn plot_cmd(inputs: &[String], output: &PathBuf, title: &str) -> Result<(), String> {
    let mut series = Vec::new();
    for input in inputs {
        let (label, path) = match input.split_once('=') {
            Some((l, p)) => (l.to_string(), p.to_string()),
            None => {
                let stem = std::path::Path::new(input).file_stem().map(|s| s.to_string_lossy().into_owned());
                (stem.unwrap_or_else(|| input.clone()), input.clone())
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        series.push((label, plot::parse_hgrm(&text).map_err(|e| format!("{path}: {e}"))?));
    }
    std::fs::write(output, plot::svg(title, &series)).map_err(|e| format!("{}: {e}", output.display()))?;
    eprintln!("wrote {}", output.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Plot { inputs, output, title }) = &cli.cmd {
        return match plot_cmd(inputs, output, title) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("stock-loadgen: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let a = cli.run;
    let mut cfg = Config::new(a.target, a.workload);
    cfg.keys = a.keys;
    cfg.centers = a.centers;
    cfg.zipf = a.zipf;
    cfg.connections = a.connections;
    cfg.own_connections = a.own_connections;
    cfg.pipeline = a.pipeline;
    cfg.batch = a.batch;
    cfg.lines = a.lines;
    cfg.duration = a.duration;
    cfg.rate = a.rate;
    cfg.seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    cfg.preload = a.preload;
    cfg.preload_qty = a.preload_qty;
    cfg.progress = !a.quiet;
    cfg.threads = a.threads.max(1);
    if cfg.keys == 0 || cfg.centers == 0 {
        eprintln!("stock-loadgen: --keys and --centers must be at least 1");
        return ExitCode::from(2);
    }
    // Workers run on threads of their own (see `run`); this runtime only
    // preloads and prints progress.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stock-loadgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = match rt.block_on(run(&cfg)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("stock-loadgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = &out.report;
    // A reader that stopped reading (`| head`) is not an error of the run:
    // the files below are still written.
    if let Err(e) = std::io::stdout().lock().write_all(summary(&out).as_bytes()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("stock-loadgen: stdout: {e}");
            return ExitCode::FAILURE;
        }
    }
    if let Some(p) = &a.json {
        let text = serde_json::to_string_pretty(r).expect("report serializes");
        if let Err(e) = std::fs::write(p, text + "\n") {
            eprintln!("stock-loadgen: {}: {e}", p.display());
            return ExitCode::FAILURE;
        }
    }
    if let Some(p) = &a.hgrm {
        if let Err(e) = std::fs::write(p, hgrm(&out.histogram)) {
            eprintln!("stock-loadgen: {}: {e}", p.display());
            return ExitCode::FAILURE;
        }
    }
    if r.errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The run's summary, as printed.
fn summary(out: &Outcome) -> String {
    let (r, l) = (&out.report, &out.report.latency_us);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} {} : {} ops in {:.1}s = {:.0} ops/s ({:.0} keys/s)",
        r.target, r.workload, r.ops, r.duration_s, r.throughput_ops_s, r.keys_per_s
    );
    let _ = writeln!(
        s,
        "latency us: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        l.p50, l.p90, l.p99, l.p999, l.max
    );
    for (kind, l) in r.latency_by_kind_us.iter().flatten() {
        let _ = writeln!(
            s,
            "  {kind:<8} us: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
    }
    if let Some(d) = &r.send_late_us {
        let _ = writeln!(
            s,
            "load generator delay in sending, us: p50 {}  p99 {}  p99.9 {}  max {}",
            d.p50, d.p99, d.p999, d.max
        );
    }
    let _ = writeln!(s, "load generator CPU: {:.2} us per operation", r.client_cpu_us_per_op);
    let _ = writeln!(
        s,
        "refused for lack of stock: {}; units ordered {}, units received {}",
        out.insufficient, out.order_units, out.inbound_units
    );
    if out.errors_by_kind.is_empty() {
        let _ = writeln!(s, "errors: none");
    } else {
        let kinds: Vec<String> = out.errors_by_kind.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(s, "errors: {} ({})", r.errors, kinds.join(", "));
    }
    s
}
