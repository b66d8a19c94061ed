//! Percentiles of latency samples and the result table.

use std::fmt::Write as _;
use std::time::Duration;

/// Latency samples, sorted once; percentiles are nearest-rank.
#[derive(Debug, Clone, Default)]
pub struct Percentiles {
    sorted: Vec<Duration>,
}

impl Percentiles {
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Percentiles { sorted: samples }
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The smallest sample with at least `p` percent of the samples at or
    /// below it; zero when there are none.
    pub fn at(&self, p: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = (p / 100.0 * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    pub fn p50(&self) -> Duration {
        self.at(50.0)
    }

    pub fn p99(&self) -> Duration {
        self.at(99.0)
    }
}

/// What a row measures, and how to print and compare it.
#[derive(Debug, Clone)]
pub enum Value {
    /// p50 and p99; lower is better.
    Latency(Percentiles),
    /// A rate with its unit (`tasks/s`); higher is better.
    Rate(f64, &'static str),
    /// Bytes per item (`per session`); lower is better.
    Bytes(f64, &'static str),
}

impl Value {
    fn show(&self) -> String {
        match self {
            Value::Latency(p) => format!("{} / {}", ms(p.p50()), ms(p.p99())),
            Value::Rate(r, unit) => format!("{} {unit}", si(*r)),
            Value::Bytes(b, unit) => format!("{:.1} KB {unit}", b / 1024.0),
        }
    }

    /// How many times the floor's cost this figure costs (1.0 = at the
    /// floor): for latencies at p99, for rates floor/value.
    fn cost_ratio(&self, floor: &Value) -> Option<f64> {
        let (v, f) = match (self, floor) {
            (Value::Latency(v), Value::Latency(f)) => {
                (v.p99().as_secs_f64(), f.p99().as_secs_f64())
            }
            (Value::Rate(v, _), Value::Rate(f, _)) => (*f, *v),
            (Value::Bytes(v, _), Value::Bytes(f, _)) => (*v, *f),
            _ => return None,
        };
        (f > 0.0 && v.is_finite()).then(|| v / f)
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn si(r: f64) -> String {
    if r >= 10_000.0 {
        format!("{:.1}k", r / 1000.0)
    } else {
        format!("{r:.0}")
    }
}

/// One figure beside its floor, measured in the same run.
#[derive(Debug, Clone)]
pub struct Row {
    pub figure: String,
    pub value: Value,
    pub floor: Value,
    /// The target from the issue, if the figure has one (`p99 ≤ 5 ms`).
    pub target: Option<Target>,
    /// Anything worth reading beside the numbers: double deliveries,
    /// missed messages, samples.
    pub note: String,
}

/// A goal a figure is reported against; the tool prints, never fails.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    P99AtMost(Duration),
    /// At least this fraction of the floor's rate.
    FloorShareAtLeast(f64),
    /// At least this rate, whatever the floor.
    RateAtLeast(f64),
    /// No more than this fraction worse than the floor: a p99 at most
    /// (1 + f) × the floor's, a rate at least (1 − f) × the floor's.
    WithinOfFloor(f64),
    BytesAtMost(f64),
}

impl Target {
    fn show(&self) -> String {
        match self {
            Target::P99AtMost(d) => format!("p99 ≤ {}", ms_short(*d)),
            Target::FloorShareAtLeast(f) => format!("≥ {:.0}% of floor", f * 100.0),
            Target::RateAtLeast(r) => format!("≥ {}/s", si(*r)),
            Target::WithinOfFloor(f) => format!("within {:.0}% of floor", f * 100.0),
            Target::BytesAtMost(b) => format!("≤ {:.0} KB", b / 1024.0),
        }
    }

    fn met(&self, value: &Value, floor: &Value) -> Option<bool> {
        match (self, value, floor) {
            (Target::P99AtMost(d), Value::Latency(p), _) => Some(p.p99() <= *d),
            (Target::FloorShareAtLeast(s), Value::Rate(v, _), Value::Rate(f, _)) => {
                Some(*v >= s * f)
            }
            (Target::RateAtLeast(r), Value::Rate(v, _), _) => Some(v >= r),
            (Target::WithinOfFloor(f), Value::Latency(v), Value::Latency(floor)) => {
                Some(v.p99().as_secs_f64() <= (1.0 + f) * floor.p99().as_secs_f64())
            }
            (Target::WithinOfFloor(f), Value::Rate(v, _), Value::Rate(floor, _)) => {
                Some(*v >= (1.0 - f) * floor)
            }
            (Target::BytesAtMost(b), Value::Bytes(v, _), _) => Some(v <= b),
            _ => None,
        }
    }
}

fn ms_short(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms.fract() == 0.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms} ms")
    }
}

/// The table as Markdown, so it pastes into BENCHMARKS.md as printed.
pub fn table(rows: &[Row]) -> String {
    let head = [
        "figure",
        "value (p50 / p99)",
        "floor (p50 / p99)",
        "× floor",
        "target",
        "notes",
    ];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            let ratio = r
                .value
                .cost_ratio(&r.floor)
                .map_or("-".to_string(), |x| format!("{x:.2}"));
            let target = match &r.target {
                None => "-".to_string(),
                Some(t) => match t.met(&r.value, &r.floor) {
                    Some(true) => format!("{} met", t.show()),
                    Some(false) => format!("{} MISSED", t.show()),
                    None => t.show(),
                },
            };
            [
                r.figure.clone(),
                r.value.show(),
                r.floor.show(),
                ratio,
                target,
                r.note.clone(),
            ]
        })
        .collect();
    let mut widths = head.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |out: &mut String, cols: &[String]| {
        out.push('|');
        for (c, w) in cols.iter().zip(widths) {
            let pad = w - c.chars().count();
            let _ = write!(out, " {c}{} |", " ".repeat(pad));
        }
        out.push('\n');
    };
    let mut out = String::new();
    line(&mut out, &head.map(String::from));
    line(&mut out, &widths.map(|w| "-".repeat(w)));
    for row in &cells {
        line(&mut out, row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::new((1..=100).rev().map(ms).collect());
        assert_eq!(p.p50(), ms(50));
        assert_eq!(p.p99(), ms(99));
        assert_eq!(p.at(100.0), ms(100));
        assert_eq!(p.at(0.0), ms(1));
        let one = Percentiles::new(vec![ms(7)]);
        assert_eq!((one.p50(), one.p99()), (ms(7), ms(7)));
        assert_eq!(Percentiles::default().p99(), Duration::ZERO);
    }

    #[test]
    fn ratios_read_as_times_the_floor() {
        let slow = Value::Latency(Percentiles::new(vec![ms(4), ms(6)]));
        let fast = Value::Latency(Percentiles::new(vec![ms(1), ms(2)]));
        assert_eq!(slow.cost_ratio(&fast), Some(3.0));
        let rate = Value::Rate(250.0, "tasks/s");
        let floor = Value::Rate(1000.0, "tasks/s");
        assert_eq!(rate.cost_ratio(&floor), Some(4.0));
        assert_eq!(rate.cost_ratio(&slow), None);
        let share = Target::FloorShareAtLeast(0.5);
        assert_eq!(share.met(&rate, &floor), Some(false));
        assert_eq!(Target::P99AtMost(ms(5)).met(&fast, &fast), Some(true));
    }

    #[test]
    fn table_aligns_columns() {
        let row = Row {
            figure: "x".into(),
            value: Value::Bytes(40960.0, "per session"),
            floor: Value::Bytes(20480.0, "per stream"),
            target: Some(Target::BytesAtMost(40960.0)),
            note: String::new(),
        };
        let t = table(&[row]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines
                .iter()
                .all(|l| l.chars().count() == lines[0].chars().count())
        );
        assert!(lines[2].contains("40.0 KB per session"));
        assert!(lines[2].contains("2.00"));
        assert!(lines[2].contains("≤ 40 KB met"));
    }
}
