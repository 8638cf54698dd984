//! A small hand-written SVG line chart: throughput against channels, one line per design.

use std::fmt::Write;

const COLORS: [&str; 8] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

/// `(design, channels, median, min, max)` rows to an SVG document.
pub fn throughput(rows: &[(&str, usize, f64, f64, f64)]) -> String {
    let (w, h) = (760.0f64, 440.0f64);
    let (l, r, t, b) = (70.0, 200.0, 40.0, 60.0);
    let mut chans: Vec<usize> = rows.iter().map(|x| x.1).collect();
    chans.sort_unstable();
    chans.dedup();
    let mut designs: Vec<&str> = Vec::new();
    for x in rows {
        if !designs.contains(&x.0) {
            designs.push(x.0);
        }
    }
    let ymax_raw = rows.iter().map(|x| x.4).fold(0.0f64, f64::max).max(0.1);
    let step = nice_step(ymax_raw / 5.0);
    let ymax = (ymax_raw / step).ceil() * step;
    let pw = w - l - r;
    let ph = h - t - b;
    let xpos = |c: usize| {
        let i = chans.iter().position(|&x| x == c).unwrap_or(0) as f64;
        l + if chans.len() > 1 { i * pw / (chans.len() - 1) as f64 } else { pw / 2.0 }
    };
    let ypos = |v: f64| t + ph - v / ymax * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">Throughput vs channels (2 devices, 1 MiB chunks; median, bars = min..max)</text>"#,
        l + pw / 2.0
    );
    let mut y = 0.0;
    while y <= ymax + 1e-9 {
        let py = ypos(y);
        let _ = writeln!(s, r##"<line x1="{l}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/>"##, l + pw);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{y:.1}</text>"#, l - 6.0, py + 4.0);
        y += step;
    }
    for &c in &chans {
        let px = xpos(c);
        let _ = writeln!(s, r##"<line x1="{px:.1}" y1="{t}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/>"##, t + ph);
        let _ = writeln!(s, r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{c}</text>"#, t + ph + 18.0);
    }
    let _ = writeln!(s, r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##);
    let _ =
        writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">channels (-P)</text>"#, l + pw / 2.0, h - 18.0);
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">GiB/s</text>"#,
        t + ph / 2.0,
        t + ph / 2.0
    );
    for (i, d) in designs.iter().enumerate() {
        let col = COLORS[i % COLORS.len()];
        let mut pts: Vec<&(&str, usize, f64, f64, f64)> = rows.iter().filter(|x| x.0 == *d).collect();
        pts.sort_by_key(|x| x.1);
        let line: Vec<String> = pts.iter().map(|x| format!("{:.1},{:.1}", xpos(x.1), ypos(x.2))).collect();
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{col}" stroke-width="2"/>"#, line.join(" "));
        for x in &pts {
            let (px, py) = (xpos(x.1), ypos(x.2));
            let _ = writeln!(
                s,
                r#"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="{col}"/>"#,
                ypos(x.3),
                ypos(x.4)
            );
            let _ = writeln!(
                s,
                r#"<circle cx="{px:.1}" cy="{py:.1}" r="3.5" fill="{col}"><title>{d} P={}: {:.2} GiB/s</title></circle>"#,
                x.1, x.2
            );
        }
        let ly = t + 10.0 + i as f64 * 22.0;
        let lx = l + pw + 16.0;
        let _ =
            writeln!(s, r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{col}" stroke-width="3"/>"#, lx + 22.0);
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}">{d}</text>"#, lx + 28.0, ly + 4.0);
    }
    s.push_str("</svg>\n");
    s
}

/// `(scenario, design, median, min, max)` rows to a grouped bar chart: one group per
/// scenario, one bar per design, whiskers min..max.
pub fn scenarios(rows: &[(String, &str, f64, f64, f64)]) -> String {
    let mut groups: Vec<&str> = Vec::new();
    let mut designs: Vec<&str> = Vec::new();
    for x in rows {
        if !groups.contains(&x.0.as_str()) {
            groups.push(&x.0);
        }
        if !designs.contains(&x.1) {
            designs.push(x.1);
        }
    }
    let (l, r, t, b) = (70.0, 200.0, 40.0, 60.0);
    let gw = 40.0 + 26.0 * designs.len() as f64;
    let pw = gw * groups.len().max(1) as f64;
    let (w, h) = (l + pw + r, 440.0f64);
    let ph = h - t - b;
    let ymax_raw = rows.iter().map(|x| x.4).fold(0.0f64, f64::max).max(0.1);
    let step = nice_step(ymax_raw / 5.0);
    let ymax = (ymax_raw / step).ceil() * step;
    let ypos = |v: f64| t + ph - v / ymax * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="22" text-anchor="middle" font-size="15">Separate processes: throughput per scenario (median, whiskers = min..max)</text>"#,
        w / 2.0
    );
    let mut y = 0.0;
    while y <= ymax + 1e-9 {
        let py = ypos(y);
        let _ = writeln!(s, r##"<line x1="{l}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/>"##, l + pw);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{y:.1}</text>"#, l - 6.0, py + 4.0);
        y += step;
    }
    for (gi, g) in groups.iter().enumerate() {
        let gx = l + gi as f64 * gw + 20.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{g}</text>"#,
            gx + (gw - 40.0) / 2.0,
            t + ph + 18.0
        );
        for x in rows.iter().filter(|x| x.0 == *g) {
            let di = designs.iter().position(|d| *d == x.1).unwrap_or(0);
            let col = COLORS[di % COLORS.len()];
            let bx = gx + di as f64 * 26.0;
            let _ = writeln!(
                s,
                r#"<rect x="{bx:.1}" y="{:.1}" width="22" height="{:.1}" fill="{col}"><title>{g} {}: {:.2} GiB/s</title></rect>"#,
                ypos(x.2),
                (t + ph - ypos(x.2)).max(0.0),
                x.1,
                x.2
            );
            let cx = bx + 11.0;
            let _ = writeln!(
                s,
                r#"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="black"/>"#,
                ypos(x.3),
                ypos(x.4)
            );
        }
    }
    let _ = writeln!(s, r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##);
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">GiB/s</text>"#,
        t + ph / 2.0,
        t + ph / 2.0
    );
    for (i, d) in designs.iter().enumerate() {
        let col = COLORS[i % COLORS.len()];
        let ly = t + 10.0 + i as f64 * 22.0;
        let lx = l + pw + 16.0;
        let _ = writeln!(s, r#"<rect x="{lx}" y="{:.1}" width="22" height="10" fill="{col}"/>"#, ly - 5.0);
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}">{d}</text>"#, lx + 28.0, ly + 4.0);
    }
    s.push_str("</svg>\n");
    s
}

/// 1, 2 or 5 times a power of ten, at least `x`.
fn nice_step(x: f64) -> f64 {
    let p = 10f64.powf(x.max(1e-6).log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= x {
            return m * p;
        }
    }
    10.0 * p
}

#[cfg(test)]
mod tests {
    #[test]
    fn svg_is_well_formed_enough() {
        let s = super::throughput(&[("a", 1, 1.0, 0.9, 1.1), ("a", 2, 1.5, 1.4, 1.6), ("b", 1, 0.5, 0.5, 0.5)]);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert_eq!(super::nice_step(0.3), 0.5);
        assert_eq!(super::nice_step(1.2), 2.0);
        let b = super::scenarios(&[("x".into(), "a", 1.0, 0.9, 1.1), ("x".into(), "b", 0.5, 0.4, 0.6)]);
        assert!(b.starts_with("<svg") && b.trim_end().ends_with("</svg>"));
        assert_eq!(b.matches("<title>").count(), 2);
    }
}
