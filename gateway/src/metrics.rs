//! Prometheus text metrics, kept by hand: request counts by route and
//! status, errors by code, a latency histogram per route, and the latency of
//! calls to stockd.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Histogram bucket bounds, seconds.
const BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Clone, Default)]
struct Hist {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Hist {
    fn record(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in BUCKETS.iter().zip(self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, String, u16), u64>,
    errors: BTreeMap<&'static str, u64>,
    latency: BTreeMap<String, Hist>,
    upstream: Hist,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

impl Metrics {
    pub fn request(&self, method: &str, route: &str, status: u16, error: Option<&'static str>, d: Duration) {
        let mut m = self.inner.lock().unwrap();
        *m.requests.entry((method.to_string(), route.to_string(), status)).or_default() += 1;
        if let Some(code) = error {
            *m.errors.entry(code).or_default() += 1;
        }
        m.latency.entry(format!("{method} {route}")).or_default().record(d);
    }

    pub fn upstream(&self, d: Duration) {
        self.inner.lock().unwrap().upstream.record(d);
    }

    pub fn render(&self) -> String {
        let m = self.inner.lock().unwrap();
        let mut out = String::new();
        out.push_str("# HELP stock_gateway_requests_total HTTP requests by method, route and status.\n");
        out.push_str("# TYPE stock_gateway_requests_total counter\n");
        for ((method, route, status), n) in &m.requests {
            let _ = writeln!(
                out,
                "stock_gateway_requests_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {n}",
                esc(method),
                esc(route)
            );
        }
        out.push_str("# HELP stock_gateway_errors_total Error answers by error code.\n");
        out.push_str("# TYPE stock_gateway_errors_total counter\n");
        for (code, n) in &m.errors {
            let _ = writeln!(out, "stock_gateway_errors_total{{code=\"{code}\"}} {n}");
        }
        out.push_str("# HELP stock_gateway_request_duration_seconds Time to answer, by route.\n");
        out.push_str("# TYPE stock_gateway_request_duration_seconds histogram\n");
        for (key, h) in &m.latency {
            let (method, route) = key.split_once(' ').unwrap_or(("", key));
            let labels = format!("method=\"{}\",route=\"{}\"", esc(method), esc(route));
            h.render(&mut out, "stock_gateway_request_duration_seconds", &labels);
        }
        out.push_str("# HELP stock_gateway_upstream_duration_seconds Time of each call to stockd.\n");
        out.push_str("# TYPE stock_gateway_upstream_duration_seconds histogram\n");
        m.upstream.render(&mut out, "stock_gateway_upstream_duration_seconds", "");
        out
    }
}
