//! Line plots of cost against scale as hand-written SVG: a figure is a
//! grid of panels, each with a logarithmic x axis (the scale), a linear
//! y axis from zero (logarithmic when the values span more than two
//! orders of magnitude), one line per mode through the medians, and
//! min–max bars.

use std::fmt::Write as _;

use super::stats::Unit;

/// One measured point: the median and spread at `x`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub x: f64,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

#[derive(Debug, Clone)]
pub struct Series {
    pub name: &'static str,
    pub color: &'static str,
    /// Drawn dashed (a reference, e.g. the bare kernel).
    pub dashed: bool,
    pub points: Vec<Point>,
}

#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub unit: Unit,
    pub series: Vec<Series>,
}

const PANEL_W: f64 = 460.0;
const PANEL_H: f64 = 300.0;
const COLUMNS: usize = 2;
const TITLE_H: f64 = 36.0;
/// Plot area inside a panel.
const LEFT: f64 = 88.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 48.0;
const BOTTOM: f64 = 48.0;

/// The whole figure.
pub fn figure(title: &str, panels: &[Panel]) -> String {
    let rows = panels.len().div_ceil(COLUMNS).max(1);
    let width = PANEL_W * COLUMNS as f64;
    let height = TITLE_H + PANEL_H * rows as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        width / 2.0,
        escape(title)
    );
    for (i, panel) in panels.iter().enumerate() {
        let x0 = PANEL_W * (i % COLUMNS) as f64;
        let y0 = TITLE_H + PANEL_H * (i / COLUMNS) as f64;
        let _ = writeln!(svg, "<g transform=\"translate({x0},{y0})\">");
        draw_panel(&mut svg, panel);
        svg.push_str("</g>\n");
    }
    svg.push_str("</svg>\n");
    svg
}

/// Maps data to pixels on one axis.
struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
    from: f64,
    to: f64,
}

impl Axis {
    fn new(log: bool, lo: f64, hi: f64, from: f64, to: f64) -> Self {
        let (lo, hi) = if log {
            (lo.log10(), hi.log10())
        } else {
            (lo, hi)
        };
        let (lo, hi) = if hi > lo {
            (lo, hi)
        } else {
            (lo - 1.0, hi + 1.0)
        };
        Self {
            log,
            lo,
            hi,
            from,
            to,
        }
    }

    fn at(&self, v: f64) -> f64 {
        let v = if self.log { v.max(1e-300).log10() } else { v };
        self.from + (v - self.lo) / (self.hi - self.lo) * (self.to - self.from)
    }
}

fn draw_panel(svg: &mut String, panel: &Panel) {
    let (px0, px1) = (LEFT, PANEL_W - RIGHT);
    let (py0, py1) = (PANEL_H - BOTTOM, TOP);
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"12\" font-weight=\"bold\">{}</text>",
        PANEL_W / 2.0,
        escape(&panel.title)
    );
    let points: Vec<&Point> = panel.series.iter().flat_map(|s| &s.points).collect();
    if points.is_empty() {
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#888\">not measured</text>",
            PANEL_W / 2.0,
            PANEL_H / 2.0
        );
        return;
    }
    let xs = points.iter().map(|p| p.x);
    let (x_lo, x_hi) = (
        xs.clone().fold(f64::INFINITY, f64::min),
        xs.fold(f64::NEG_INFINITY, f64::max),
    );
    let y_hi = points.iter().map(|p| p.max).fold(0.0, f64::max);
    let y_lo_pos = points
        .iter()
        .map(|p| p.min)
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let y_log = y_lo_pos.is_finite() && y_hi / y_lo_pos > 100.0;
    let x_axis = Axis::new(true, x_lo.max(1.0), x_hi.max(1.0), px0 + 12.0, px1 - 12.0);
    // Linear axes count in the unit the largest value is shown in, so
    // that ticks are round there (MiB, not bytes).
    let (scaled_hi, unit_name) = panel.unit.scale(y_hi);
    let div = if scaled_hi == 0.0 {
        1.0
    } else {
        y_hi / scaled_hi
    };
    let y_axis = if y_log {
        let lo = 10f64.powf(y_lo_pos.log10().floor());
        let hi = 10f64.powf(y_hi.log10().ceil());
        Axis::new(true, lo, hi, py0, py1)
    } else {
        Axis::new(false, 0.0, nice_ceiling(scaled_hi * 1.1) * div, py0, py1)
    };

    // Frame, grid and tick labels.
    let _ = writeln!(
        svg,
        "<rect x=\"{px0}\" y=\"{py1}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>",
        px1 - px0,
        py0 - py1
    );
    let ticks = match y_log {
        true => log_ticks(&y_axis, panel.unit),
        false => linear_ticks(y_axis.hi / div)
            .into_iter()
            .map(|t| t * div)
            .collect(),
    };
    for tick in ticks {
        let y = y_axis.at(tick);
        let label = if y_log {
            let (scaled, name) = panel.unit.scale(tick);
            format!("{} {name}", trim_number(scaled)).trim().to_owned()
        } else {
            trim_number(tick / div)
        };
        let _ = writeln!(
            svg,
            "<line x1=\"{px0}\" y1=\"{y:.1}\" x2=\"{px1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            px0 - 4.0,
            y + 4.0,
            escape(&label)
        );
    }
    let mut x_ticks: Vec<f64> = points.iter().map(|p| p.x).collect();
    x_ticks.sort_by(f64::total_cmp);
    x_ticks.dedup();
    for tick in x_ticks {
        let x = x_axis.at(tick);
        let _ = writeln!(
            svg,
            "<line x1=\"{x:.1}\" y1=\"{py0}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#999\"/>\
             <text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            py0 + 4.0,
            py0 + 16.0,
            trim_number(tick)
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{} (log scale)</text>",
        (px0 + px1) / 2.0,
        PANEL_H - 14.0,
        escape(&panel.x_label)
    );
    let y_title = if y_log { "" } else { unit_name };
    let _ = writeln!(
        svg,
        "<text x=\"14\" y=\"{0}\" text-anchor=\"middle\" transform=\"rotate(-90 14 {0})\">{1}</text>",
        (py0 + py1) / 2.0,
        escape(y_title)
    );

    // Series: bars, line, dots; then the legend.
    for series in &panel.series {
        let mut pts = series.points.clone();
        pts.sort_by(|a, b| a.x.total_cmp(&b.x));
        let color = series.color;
        for p in &pts {
            let x = x_axis.at(p.x);
            let (ya, yb) = (y_axis.at(p.min), y_axis.at(p.max));
            let _ = writeln!(
                svg,
                "<line x1=\"{x:.1}\" y1=\"{ya:.1}\" x2=\"{x:.1}\" y2=\"{yb:.1}\" stroke=\"{color}\"/>\
                 <line x1=\"{:.1}\" y1=\"{ya:.1}\" x2=\"{:.1}\" y2=\"{ya:.1}\" stroke=\"{color}\"/>\
                 <line x1=\"{:.1}\" y1=\"{yb:.1}\" x2=\"{:.1}\" y2=\"{yb:.1}\" stroke=\"{color}\"/>",
                x - 3.0,
                x + 3.0,
                x - 3.0,
                x + 3.0
            );
        }
        let path: Vec<String> = pts
            .iter()
            .map(|p| format!("{:.1},{:.1}", x_axis.at(p.x), y_axis.at(p.median)))
            .collect();
        let dash = if series.dashed {
            " stroke-dasharray=\"5,4\""
        } else {
            ""
        };
        let _ = writeln!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>",
            path.join(" ")
        );
        for p in &pts {
            let _ = writeln!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>",
                x_axis.at(p.x),
                y_axis.at(p.median)
            );
        }
    }
    // The legend: one row between the title and the plot.
    let mut x = px0;
    for series in &panel.series {
        let dash = if series.dashed {
            " stroke-dasharray=\"5,4\""
        } else {
            ""
        };
        let _ = writeln!(
            svg,
            "<line x1=\"{x}\" y1=\"33\" x2=\"{}\" y2=\"33\" stroke=\"{}\" stroke-width=\"2\"{dash}/>\
             <text x=\"{}\" y=\"37\">{}</text>",
            x + 18.0,
            series.color,
            x + 22.0,
            escape(series.name)
        );
        x += 34.0 + 6.5 * series.name.chars().count() as f64;
    }
}

/// About five round ticks from zero to `top` (a [`nice_ceiling`]).
fn linear_ticks(top: f64) -> Vec<f64> {
    let step = nice_step(top / 5.0);
    (0..=((top / step).round() as usize))
        .map(|i| i as f64 * step)
        .collect()
}

/// Ticks of a logarithmic axis: powers of ten, or for bytes 1, 10 and
/// 100 of each binary unit (1 KiB, 10 KiB, 100 KiB, 1 MiB …).
fn log_ticks(axis: &Axis, unit: Unit) -> Vec<f64> {
    let (lo, hi) = (10f64.powf(axis.lo), 10f64.powf(axis.hi));
    let candidates: Vec<f64> = match unit {
        Unit::Bytes => (0..5)
            .flat_map(|k| [1.0, 10.0, 100.0].map(|m| m * 1024f64.powi(k)))
            .collect(),
        _ => (-9..=12).map(|e| 10f64.powi(e)).collect(),
    };
    candidates
        .into_iter()
        .filter(|t| *t >= lo * 0.999 && *t <= hi * 1.001)
        .collect()
}

/// The smallest 1, 2 or 5 × 10ⁿ at or above `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|v| *v >= raw * 0.999)
        .unwrap_or(10.0 * magnitude)
}

/// A round axis top at or above `v`: a multiple of its tick step.
fn nice_ceiling(v: f64) -> f64 {
    let step = nice_step(v / 5.0);
    (v / step).ceil() * step
}

/// `1000`, `2.5`, `0.25` — no trailing zeros.
fn trim_number(v: f64) -> String {
    let text = format!("{v:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text.is_empty() || text == "-" {
        "0".into()
    } else {
        text.into()
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panel(series: Vec<Series>) -> Panel {
        Panel {
            title: "connect rate <target>".into(),
            x_label: "PUs".into(),
            unit: Unit::ConnectionsPerSecond,
            series,
        }
    }

    #[test]
    fn a_figure_is_well_formed_svg_with_every_series() {
        let point = |x: f64, y: f64| Point {
            x,
            median: y,
            min: y * 0.9,
            max: y * 1.1,
        };
        let svg = figure(
            "Scale & cost",
            &[
                panel(vec![
                    Series {
                        name: "iptables",
                        color: "#d62728",
                        dashed: false,
                        points: vec![point(1.0, 3000.0), point(1000.0, 800.0)],
                    },
                    Series {
                        name: "bare",
                        color: "#555",
                        dashed: true,
                        points: vec![point(1.0, 9000.0), point(1000.0, 9000.0)],
                    },
                ]),
                panel(Vec::new()),
            ],
        );
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("Scale &amp; cost") && svg.contains("&lt;target&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("stroke-dasharray"));
        assert!(svg.contains("not measured"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(nice_step(1.7), 2.0);
        assert_eq!(nice_step(0.03), 0.05);
        assert_eq!(nice_ceiling(9_000.0), 10_000.0);
        assert_eq!(trim_number(2.500), "2.5");
        assert_eq!(trim_number(1000.0), "1000");
        assert_eq!(linear_ticks(10.0), [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let log = Axis::new(true, 0.001, 10.0, 0.0, 100.0);
        assert_eq!(log_ticks(&log, Unit::Seconds).len(), 5);
        let bytes = Axis::new(true, 1000.0, 2e6, 0.0, 100.0);
        assert_eq!(
            log_ticks(&bytes, Unit::Bytes),
            [1024.0, 10240.0, 102_400.0, 1_048_576.0]
        );
    }
}
