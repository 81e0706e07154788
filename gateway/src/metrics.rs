//! Prometheus metrics of the gateway, kept and encoded by the
//! `prometheus-client` crate (as stockd's own): request counts by method,
//! route and status, errors by code, a latency histogram per route, and the
//! latency of calls to stockd.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Histogram bucket bounds, seconds.
const BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: String,
}

#[derive(Clone)]
struct Buckets;

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(BUCKETS)
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    latency: Family<RouteLabels, Histogram, Buckets>,
    upstream: Histogram,
    /// stockd's sinks, as its STATS said at the last scrape: (STATS field, family).
    sinks: Vec<(&'static str, Family<SinkLabels, Gauge>)>,
}

/// The per-sink STATS fields the gateway passes on: field, metric name, help.
const SINK_FIELDS: [(&str, &str, &str); 4] = [
    ("lag_records", "stockd_sink_lag_records", "Durable stockd log records the sink has not confirmed"),
    ("lag_bytes", "stockd_sink_lag_bytes", "Durable stockd log bytes the sink has not confirmed"),
    ("cursor", "stockd_sink_cursor", "Highest LSN the sink has confirmed"),
    ("connected", "stockd_sink_connected", "1 while the sink reaches its downstream system"),
];

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("stock_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let latency = Family::new_with_constructor(Buckets);
        let upstream = Histogram::new(BUCKETS);
        registry.register("requests", "HTTP requests by method, route and status", requests.clone());
        registry.register("errors", "Error answers by error code", errors.clone());
        registry.register_with_unit(
            "request_duration",
            "Time to answer, by route",
            Unit::Seconds,
            latency.clone(),
        );
        registry.register_with_unit(
            "upstream_duration",
            "Time of each call to stockd",
            Unit::Seconds,
            upstream.clone(),
        );
        let sinks = SINK_FIELDS
            .iter()
            .map(|(field, name, help)| {
                let family = Family::<SinkLabels, Gauge>::default();
                registry.register(*name, *help, family.clone());
                (*field, family)
            })
            .collect();
        Metrics { registry, requests, errors, latency, upstream, sinks }
    }
}

impl Metrics {
    pub fn request(&self, method: &str, route: &str, status: u16, error: Option<&'static str>, d: Duration) {
        let (method, route) = (method.to_string(), route.to_string());
        let labels =
            RequestLabels { method: method.clone(), route: route.clone(), status: status.to_string() };
        self.requests.get_or_create(&labels).inc();
        if let Some(code) = error {
            self.errors.get_or_create(&ErrorLabels { code: code.to_string() }).inc();
        }
        self.latency.get_or_create(&RouteLabels { method, route }).observe(d.as_secs_f64());
    }

    pub fn upstream(&self, d: Duration) {
        self.upstream.observe(d.as_secs_f64());
    }

    /// Takes the sink figures from stockd's STATS (`sink_{name}_{field}`).
    pub fn stockd_stats(&self, stats: &[(String, u64)]) {
        for (name, value) in stats {
            let Some((sink, field)) = name.strip_prefix("sink_").and_then(|r| r.split_once('_')) else {
                continue;
            };
            if let Some((_, family)) = self.sinks.iter().find(|(f, _)| *f == field) {
                family.get_or_create(&SinkLabels { sink: sink.to_string() }).set(*value as i64);
            }
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("text encoding into a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stockd_sink_figures_become_gauges_per_sink() {
        let m = Metrics::default();
        let stats = [
            ("rows", 12),
            ("sink_kafka_lag_records", 7),
            ("sink_kafka_lag_bytes", 700),
            ("sink_redis_cursor", 42),
            ("sink_redis_connected", 1),
            ("sink_redis_errors", 3),
        ]
        .map(|(k, v)| (k.to_string(), v));
        m.stockd_stats(&stats);
        let text = m.render();
        for line in [
            "stock_gateway_stockd_sink_lag_records{sink=\"kafka\"} 7",
            "stock_gateway_stockd_sink_lag_bytes{sink=\"kafka\"} 700",
            "stock_gateway_stockd_sink_cursor{sink=\"redis\"} 42",
            "stock_gateway_stockd_sink_connected{sink=\"redis\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(!text.contains("errors{sink"), "only the fields the gateway passes on");
    }
}
