//! The Prometheus text exposition format (version 0.0.4), written by hand: the seller
//! server's `GET /metrics` and the agent's `kooagent metrics` (node_exporter's textfile
//! collector) both print it.
//!
//! Why not the `prometheus`/`prometheus-client` crates: the device binary would carry a
//! registry, a derive macro and their dependencies for what is a few `name{labels} value`
//! lines; the format is small and frozen, and the counters the seller server keeps are a
//! handful of atomics ([`Histogram`]) and maps ([`Counters`]).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A metrics page being written.
#[derive(Default)]
pub struct Text(String);

impl Text {
    pub fn new() -> Text {
        Text::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines (`kind`: counter, gauge,
    /// histogram).
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Text {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    /// One sample line.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Text {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {}", number(value));
        self
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) -> &mut Text {
        self.family(name, kind, help).sample(name, &[], value)
    }

    pub fn finish(self) -> String {
        self.0
    }
}

/// Label values: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Integers without a fraction, infinities as Prometheus spells them.
fn number(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v.is_nan() {
        "NaN".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// A histogram of durations in seconds with fixed upper bounds; lock-free.
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), then one for above the last bound.
    counts: Vec<AtomicU64>,
    /// The sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// An estimate of quantile `q` (0..1): the upper bound of the bucket it falls in
    /// (None: no observation yet; infinity: above the last bound).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
            if seen >= want {
                return Some(self.bounds.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }

    /// The `_bucket`, `_sum` and `_count` lines of family `name` (after its header).
    pub fn write(&self, t: &mut Text, name: &str, labels: &[(&str, &str)]) {
        let mut total = 0u64;
        let bucket = format!("{name}_bucket");
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => number(*b),
                None => "+Inf".into(),
            };
            let mut l: Vec<(&str, &str)> = labels.to_vec();
            l.push(("le", &le));
            t.sample(&bucket, &l, total as f64);
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        t.sample(&format!("{name}_sum"), labels, sum);
        t.sample(&format!("{name}_count"), labels, total as f64);
    }
}

/// Counters by label values (a small, bounded set: callers map unknown values to
/// `other`, so that a client cannot grow the map).
pub struct Counters<const N: usize> {
    map: Mutex<BTreeMap<[String; N], u64>>,
}

impl<const N: usize> Default for Counters<N> {
    fn default() -> Self {
        Counters {
            map: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<const N: usize> Counters<N> {
    pub fn inc(&self, labels: [&str; N]) {
        let key = labels.map(str::to_string);
        *self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_insert(0) += 1;
    }

    pub fn get(&self, labels: [&str; N]) -> u64 {
        let key = labels.map(str::to_string);
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&key).copied().unwrap_or(0)
    }

    /// Every label set and its count.
    pub fn snapshot(&self) -> Vec<([String; N], u64)> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// The samples of family `name`, labelled `names`.
    pub fn write(&self, t: &mut Text, name: &str, names: [&str; N]) {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (values, n) in &map {
            let labels: Vec<(&str, &str)> = names
                .iter()
                .zip(values.iter())
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            t.sample(name, &labels, *n as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn lines_as_the_format_says() {
        let mut t = Text::new();
        t.family("x_total", "counter", "Things.\nCounted.").sample(
            "x_total",
            &[("a", "q\"\\\n")],
            3.0,
        );
        t.single("y", "gauge", "Y.", 0.25);
        assert_eq!(
            t.finish(),
            "# HELP x_total Things.\\nCounted.\n# TYPE x_total counter\n\
             x_total{a=\"q\\\"\\\\\\n\"} 3\n# HELP y Y.\n# TYPE y gauge\ny 0.25\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        static B: [f64; 2] = [0.01, 0.1];
        let h = Histogram::new(&B);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(2));
        let mut t = Text::new();
        h.write(&mut t, "h", &[("k", "v")]);
        assert_eq!(
            t.finish(),
            "h_bucket{k=\"v\",le=\"0.01\"} 1\nh_bucket{k=\"v\",le=\"0.1\"} 2\n\
             h_bucket{k=\"v\",le=\"+Inf\"} 3\nh_sum{k=\"v\"} 2.055\nh_count{k=\"v\"} 3\n"
        );
        assert_eq!(h.count(), 3);
        assert_eq!(h.quantile(0.5), Some(0.1));
        assert_eq!(h.quantile(0.3), Some(0.01));
        assert_eq!(h.quantile(0.99), Some(f64::INFINITY));
    }

    #[test]
    fn counters_by_labels() {
        let c = Counters::<2>::default();
        c.inc(["a", "1"]);
        c.inc(["a", "1"]);
        c.inc(["b", "2"]);
        assert_eq!(c.get(["a", "1"]), 2);
        let mut t = Text::new();
        c.write(&mut t, "c_total", ["k", "code"]);
        assert_eq!(
            t.finish(),
            "c_total{k=\"a\",code=\"1\"} 2\nc_total{k=\"b\",code=\"2\"} 1\n"
        );
    }
}
