//! Latency-by-percentile chart of several `.hgrm` files as one SVG.
//!
//! X axis: percentile on a log scale of 1/(1-p), from 50% to 99.99%.
//! Y axis: latency in microseconds (linear, from 0 to the largest value shown).

/// (percentile in 0..=1, value in microseconds) rows of an `.hgrm` text.
pub fn parse_hgrm(text: &str) -> Result<Vec<(f64, f64)>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 2 || line.trim_start().starts_with('#') {
            continue;
        }
        let (Ok(v), Ok(p)) = (f[0].parse::<f64>(), f[1].parse::<f64>()) else { continue };
        if (0.0..=1.0).contains(&p) {
            out.push((p, v));
        }
    }
    if out.is_empty() {
        return Err("no percentile rows found (expected an HdrHistogram percentile distribution)".into());
    }
    Ok(out)
}

const W: f64 = 800.0;
const H: f64 = 480.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const P_MIN: f64 = 0.5;
const P_MAX: f64 = 0.9999;
const COLORS: [&str; 8] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

fn x_of(p: f64) -> f64 {
    let t = |p: f64| (1.0 / (1.0 - p)).log10();
    LEFT + (t(p.clamp(P_MIN, P_MAX)) - t(P_MIN)) / (t(P_MAX) - t(P_MIN)) * (W - LEFT - RIGHT)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Draws the series (label, rows) on one chart.
pub fn svg(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let shown = |rows: &[(f64, f64)]| -> Vec<(f64, f64)> {
        rows.iter().copied().filter(|(p, _)| (P_MIN..=P_MAX).contains(p)).collect()
    };
    let y_max = series.iter().flat_map(|(_, r)| shown(r)).map(|(_, v)| v).fold(1.0_f64, f64::max) * 1.05;
    let y_of = |v: f64| H - BOTTOM - v / y_max * (H - TOP - BOTTOM);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        (LEFT + W - RIGHT) / 2.0,
        esc(title)
    );
    // Axes, grid and ticks.
    s += &format!(
        "<line x1=\"{LEFT}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>\n<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{0}\" stroke=\"black\"/>\n",
        H - BOTTOM,
        W - RIGHT
    );
    for (p, label) in [(0.5, "50%"), (0.9, "90%"), (0.99, "99%"), (0.999, "99.9%"), (0.9999, "99.99%")] {
        let x = x_of(p);
        s += &format!(
            "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\n<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>\n",
            H - BOTTOM,
            H - BOTTOM + 18.0
        );
    }
    for i in 0..=5 {
        let v = y_max / 5.0 * i as f64;
        let y = y_of(v);
        s += &format!(
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>\n",
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0
        );
    }
    s += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">percentile</text>\n<text x=\"18\" y=\"{:.1}\" transform=\"rotate(-90 18 {:.1})\" text-anchor=\"middle\">latency (us)</text>\n",
        (LEFT + W - RIGHT) / 2.0,
        H - 12.0,
        H / 2.0,
        H / 2.0
    );
    for (i, (label, rows)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> =
            shown(rows).iter().map(|(p, v)| format!("{:.1},{:.1}", x_of(*p), y_of(*v))).collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        );
        let ly = TOP + 20.0 + 20.0 * i as f64;
        s += &format!(
            "<line x1=\"{0:.1}\" y1=\"{ly:.1}\" x2=\"{1:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" stroke-width=\"3\"/>\n<text x=\"{2:.1}\" y=\"{3:.1}\">{4}</text>\n",
            W - RIGHT + 15.0,
            W - RIGHT + 40.0,
            W - RIGHT + 46.0,
            ly + 4.0,
            esc(label)
        );
    }
    s += "</svg>\n";
    s
}
