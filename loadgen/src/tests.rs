use super::*;

#[test]
fn workloads_and_targets_parse() {
    assert_eq!("query".parse::<Workload>().unwrap(), Workload::Query);
    assert_eq!(
        "mixed:90,9,1".parse::<Workload>().unwrap(),
        Workload::Mixed { query: 90, order: 9, inbound: 1 }
    );
    assert!("mixed:90,9".parse::<Workload>().is_err());
    assert!("mixed:90,9,2".parse::<Workload>().unwrap_err().contains("100"));
    assert!("nope".parse::<Workload>().is_err());
    assert_eq!("mixed:90,9,1".parse::<Workload>().unwrap().to_string(), "mixed:90,9,1");
    assert_eq!("stockd://127.0.0.1:7400".parse::<Target>().unwrap(), Target::Stockd("127.0.0.1:7400".into()));
    assert!("redis://h:1".parse::<Target>().is_ok());
    assert!("http://x".parse::<Target>().is_err());
}

#[test]
fn keys_stay_in_range() {
    let g = KeyGen::new(50, 3, 0.99);
    let mut rng = Rng::new(7);
    for _ in 0..10_000 {
        let k = g.key(&mut rng);
        assert!((1..=50).contains(&k.item) && (1..=3).contains(&k.fc), "{k:?}");
    }
    assert_eq!(g.all().count(), 150);
    let d = g.distinct(&mut rng, 5);
    assert_eq!(d.len(), 5);
    for (i, a) in d.iter().enumerate() {
        assert!(!d[i + 1..].contains(a), "distinct keys");
    }
    // Asking for more distinct keys than exist gives them all.
    assert_eq!(KeyGen::new(2, 1, 0.0).distinct(&mut rng, 5).len(), 2);
}

#[test]
fn the_alias_table_gives_every_item_its_exact_probability() {
    let weights: Vec<f64> = (1..=1000u64).map(|k| 1.0 / (k as f64).powf(0.99)).collect();
    let total: f64 = weights.iter().sum();
    let table = alias_table(&weights);
    let n = table.len() as f64;
    let mut p = vec![0.0f64; table.len()];
    for (i, e) in table.iter().enumerate() {
        let keep = e.keep as f64 / 4_294_967_296.0;
        p[i] += keep / n;
        p[e.other as usize] += (1.0 - keep) / n;
    }
    for (i, (p, w)) in p.iter().zip(&weights).enumerate() {
        assert!((p - w / total).abs() < 1e-9, "item {}: {p} vs {}", i + 1, w / total);
    }
}

#[test]
fn zipf_shape() {
    let n = 1000u64;
    let draws = 400_000;
    // One key at a time, in batches of 64 (`KeyGen::keys_into`), or each
    // drawn a key ahead (`KeyGen::key_ahead`): the same distribution.
    let count = |s: f64, how: &str| {
        let g = KeyGen::new(n, 1, s);
        let mut rng = Rng::new(42);
        let mut c = vec![0u64; n as usize + 1];
        match how {
            "batch" => {
                let mut batch = Vec::new();
                for _ in 0..draws / 64 {
                    g.keys_into(&mut rng, 64, &mut batch);
                    for k in &batch {
                        c[k.item as usize] += 1;
                    }
                }
            }
            "ahead" => {
                let mut ahead = g.ahead(&mut rng);
                for _ in 0..draws {
                    c[g.key_ahead(&mut rng, &mut ahead).item as usize] += 1;
                }
            }
            _ => {
                for _ in 0..draws {
                    c[g.item(&mut rng) as usize] += 1;
                }
            }
        }
        c
    };
    for how in ["one", "batch", "ahead"] {
        // Uniform: every item near draws / n.
        let u = count(0.0, how);
        let expect = draws as f64 / n as f64;
        assert!(u[1..].iter().all(|&c| (c as f64 - expect).abs() < expect * 0.4), "uniform spread");
        // s = 0.99: P(rank k) ~ 1/k^0.99 / H; item 1 about twice item 2, ten times item 10.
        let z = count(0.99, how);
        let h: f64 = (1..=n).map(|k| 1.0 / (k as f64).powf(0.99)).sum();
        let p1 = z[1] as f64 / draws as f64;
        assert!((p1 - 1.0 / h).abs() < 0.01, "p(item 1) = {p1}, expected {}", 1.0 / h);
        let r2 = z[1] as f64 / z[2] as f64;
        let r10 = z[1] as f64 / z[10] as f64;
        assert!((r2 - 2f64.powf(0.99)).abs() < 0.15, "p1/p2 = {r2}");
        assert!((r10 - 10f64.powf(0.99)).abs() < 1.5, "p1/p10 = {r10}");
    }
}

#[test]
fn mixed_picks_follow_the_percentages() {
    let mut rng = Rng::new(3);
    let w = Workload::Mixed { query: 90, order: 9, inbound: 1 };
    let mut c = [0u32; 3];
    for _ in 0..100_000 {
        match pick(w, &mut rng) {
            Kind::Query => c[0] += 1,
            Kind::Order => c[1] += 1,
            Kind::Inbound => c[2] += 1,
            Kind::Batch => panic!("no batches in this mix"),
        }
    }
    assert!(
        (89_000..91_000).contains(&c[0]) && (8_400..9_600).contains(&c[1]) && (800..1_200).contains(&c[2]),
        "{c:?}"
    );
}

#[test]
fn report_json_has_exactly_the_documented_fields() {
    let mut h = new_histogram();
    for v in 1..=1000 {
        h.record(v).unwrap();
    }
    let r = Report {
        target: "stockd://127.0.0.1:7400".into(),
        workload: "query".into(),
        ops: 1000,
        errors: 0,
        duration_s: 1.0,
        throughput_ops_s: 1000.0,
        keys_per_s: 1000.0,
        client_cpu_us_per_op: 2.5,
        latency_us: Latency::of(&h),
        send_late_us: Some(Latency::of(&h)),
        latency_by_kind_us: Some([("order".to_string(), Latency::of(&h))].into()),
    };
    let v: serde_json::Value = serde_json::to_value(&r).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "client_cpu_us_per_op",
            "duration_s",
            "errors",
            "keys_per_s",
            "latency_by_kind_us",
            "latency_us",
            "ops",
            "send_late_us",
            "target",
            "throughput_ops_s",
            "workload"
        ]
    );
    let mut lat: Vec<&str> = v["latency_us"].as_object().unwrap().keys().map(String::as_str).collect();
    lat.sort();
    assert_eq!(lat, ["max", "p50", "p90", "p99", "p999"]);
    assert_eq!(v["latency_us"]["p50"], 500);
    assert_eq!(v["latency_us"]["max"], 1000);
    assert_eq!(v["send_late_us"]["p99"], v["latency_us"]["p99"]);
    assert_eq!(v["latency_by_kind_us"]["order"]["p99"], v["latency_us"]["p99"]);
    let closed = Report { send_late_us: None, latency_by_kind_us: None, ..r };
    let closed = serde_json::to_value(&closed).unwrap();
    assert!(closed["send_late_us"].is_null(), "null in a closed loop");
    assert!(closed["latency_by_kind_us"].is_null(), "null for a workload of one kind");
}

#[test]
fn hgrm_round_trips_through_the_plot_parser() {
    let mut h = new_histogram();
    for v in 1..=10_000u64 {
        h.record(v).unwrap();
    }
    let rows = plot::parse_hgrm(&hgrm(&h)).unwrap();
    assert!(rows.len() > 20);
    assert!(rows.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1), "monotone");
    let p99 = rows.iter().find(|(p, _)| *p >= 0.99).unwrap().1;
    assert!((9_800.0..=10_000.0).contains(&p99), "p99 {p99}");
    let svg = plot::svg("t", &[("a".into(), rows.clone()), ("b<c".into(), rows)]);
    assert!(svg.starts_with("<svg") && svg.contains("99.99%") && svg.contains("b&lt;c"));
    assert_eq!(svg.matches("<polyline").count(), 2);
    assert!(plot::parse_hgrm("nothing here").is_err());
}

/// A target that refuses connections ends the run at once with the
/// connection's error, whichever thread met it; no thread is left waiting.
#[test]
fn a_target_that_refuses_connections_ends_the_run_with_its_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // nothing listens there any more
    let mut cfg = Config::new(format!("stockd://127.0.0.1:{port}").parse().unwrap(), Workload::Query);
    (cfg.connections, cfg.threads, cfg.duration) = (4, 4, Duration::from_secs(30));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let t = Instant::now();
    let err = match rt.block_on(run(&cfg)) {
        Ok(_) => panic!("a run against a closed port succeeded"),
        Err(e) => e,
    };
    assert!(err.contains("127.0.0.1") && err.contains("refused"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
}

#[test]
fn more_workers_than_ids_can_tell_apart_is_a_clear_error() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let target: Target = "stockd://127.0.0.1:1".parse().unwrap();
    let mut cfg = Config::new(target.clone(), Workload::Order);
    (cfg.connections, cfg.pipeline) = (256, 256);
    let err = rt.block_on(run(&cfg)).err().expect("65,536 workers are refused");
    assert!(err.contains("65536 workers") && err.contains(&MAX_WORKERS.to_string()), "{err}");
    // A mixed open loop runs a worker per caller and kind: 3 x 21,846.
    let mut cfg = Config::new(target, Workload::Mixed { query: 90, order: 9, inbound: 1 });
    (cfg.connections, cfg.pipeline, cfg.rate) = (2, 10_923, Some(1_000.0));
    let err = rt.block_on(run(&cfg)).err().expect("65,538 workers are refused");
    assert!(err.contains("65538 workers") && err.contains("one per kind"), "{err}");
    // Far beyond: refused before anything is sized by it.
    let mut cfg = Config::new("stockd://127.0.0.1:1".parse().unwrap(), Workload::Query);
    (cfg.connections, cfg.pipeline, cfg.rate) = (usize::MAX / 2, 3, Some(1_000.0));
    assert!(rt.block_on(run(&cfg)).err().expect("refused").contains("at most 65535"));
}
