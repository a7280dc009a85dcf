//! Repeated measurements summarised (median and min–max spread), and the
//! units values are shown in.

/// The median and the spread of a measurement repeated `n` times.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// The 25th and 75th percentiles (nearest rank).
    pub q1: f64,
    pub q3: f64,
    pub n: usize,
}

impl Summary {
    /// `None` for no values.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            q1: percentile(&sorted, 25.0),
            q3: percentile(&sorted, 75.0),
            n,
        })
    }

    /// `12.3 ms (11.9–13.0)`, or `12.3 ms (n=1)` for a single value.
    pub fn show(&self, unit: Unit) -> String {
        let median = unit.format(self.median);
        if self.n == 1 {
            format!("{median} (n=1)")
        } else {
            format!(
                "{median} ({}–{})",
                unit.format_bare(self.min),
                unit.format_bare(self.max)
            )
        }
    }
}

/// The `p`-th percentile (0–100) of sorted values, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What a measured value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    BitsPerSecond,
    PacketsPerSecond,
    ConnectionsPerSecond,
    Seconds,
    Bytes,
    Count,
}

impl Unit {
    /// Three significant digits and the unit: `9.41 Gbit/s`, `512 µs`.
    pub fn format(self, v: f64) -> String {
        if self == Unit::Count {
            return format!("{v:.0}");
        }
        match self.scale(v) {
            (scaled, "") => sig3(scaled),
            (scaled, suffix) => format!("{} {suffix}", sig3(scaled)),
        }
    }

    /// The number in the unit [`Self::format`] would pick, without it (for
    /// a spread beside a formatted median).
    pub fn format_bare(self, v: f64) -> String {
        match self {
            Unit::Count => format!("{v:.0}"),
            _ => sig3(self.scale(v).0),
        }
    }

    /// `v` in the unit suited to its size.
    pub fn scale(self, v: f64) -> (f64, &'static str) {
        let pick = |steps: &[(f64, &'static str)]| {
            let (div, name) = steps
                .iter()
                .rev()
                .find(|(div, _)| v.abs() >= *div)
                .copied()
                .unwrap_or(steps[0]);
            (v / div, name)
        };
        match self {
            Unit::BitsPerSecond => pick(&[(1e6, "Mbit/s"), (1e9, "Gbit/s")]),
            Unit::PacketsPerSecond => pick(&[(1.0, "pkt/s"), (1e3, "k pkt/s"), (1e6, "M pkt/s")]),
            Unit::ConnectionsPerSecond => {
                pick(&[(1.0, "conn/s"), (1e3, "k conn/s"), (1e6, "M conn/s")])
            }
            Unit::Seconds => pick(&[(1e-6, "µs"), (1e-3, "ms"), (1.0, "s")]),
            Unit::Bytes => pick(&[
                (1.0, "B"),
                (1024.0, "KiB"),
                (1024.0 * 1024.0, "MiB"),
                (1024.0 * 1024.0 * 1024.0, "GiB"),
            ]),
            Unit::Count => (v, ""),
        }
    }
}

/// Three significant digits, no exponent: `9.41`, `94.1`, `941`, `9410`.
fn sig3(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A ratio as `0.93×`; below 0.1 with two significant digits
/// (`0.0013×`), so that a large gap does not read as zero.
pub fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 || !a.is_finite() || !b.is_finite() {
        return "–".into();
    }
    let r = a / b;
    if r > 0.0 && r < 0.1 {
        let decimals = (1 - r.log10().floor() as i32).max(0) as usize;
        return format!("{r:.decimals$}×");
    }
    format!("{}×", sig3(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Summary::of(&[5.0, 1.0, 4.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.q1, s.median, s.q3), (2.0, 3.0, 4.0));
        let s = Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Summary::of(&[]).is_none());
        assert!(Summary::of(&[f64::NAN]).is_none());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }

    #[test]
    fn values_are_shown_in_a_fitting_unit() {
        assert_eq!(Unit::BitsPerSecond.format(9.412e9), "9.41 Gbit/s");
        assert_eq!(Unit::BitsPerSecond.format(512e6), "512 Mbit/s");
        assert_eq!(Unit::PacketsPerSecond.format(81_234.0), "81.2 k pkt/s");
        assert_eq!(Unit::Seconds.format(0.000_512), "512 µs");
        assert_eq!(Unit::Seconds.format(12.34), "12.3 s");
        assert_eq!(Unit::Bytes.format(3.5 * 1024.0 * 1024.0), "3.50 MiB");
        assert_eq!(Unit::Count.format(1234.0), "1234");
        assert_eq!(Unit::Count.format(95.0), "95");
        let s = Summary::of(&[0.001, 0.0012, 0.0011]).unwrap();
        assert_eq!(s.show(Unit::Seconds), "1.10 ms (1.00–1.20)");
        assert_eq!(ratio(1.0, 2.0), "0.50×");
        assert_eq!(ratio(1.3, 1000.0), "0.0013×");
        assert_eq!(ratio(5.0, 100.0), "0.050×");
        assert_eq!(ratio(1.0, 0.0), "–");
    }
}
