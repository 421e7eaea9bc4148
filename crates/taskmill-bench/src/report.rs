//! Results: table rows with their targets, one JSON object per scenario, and
//! the human table.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

/// Whether a figure meets the target.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Target {
    /// The target, e.g. `>= 80 % of ceiling`.
    pub(crate) target: String,
    /// Met or not.
    pub(crate) met: bool,
    /// The verdict for the table: `met`, or by how much it is missed.
    pub(crate) verdict: String,
    /// Whether the verdict only informs (e.g. a classic-queue target shown
    /// on a quorum run).
    pub(crate) informative: bool,
}

impl Target {
    /// `value >= limit` (ratios in %, rates).
    pub(crate) fn at_least(value: f64, limit: f64, target: String) -> Target {
        Target::at_least_in(value, limit, target, |gap| format!("{gap:.1} points"))
    }

    /// `value >= limit` for a factor (a speed-up): the gap in "x".
    pub(crate) fn at_least_factor(value: f64, limit: f64, target: String) -> Target {
        Target::at_least_in(value, limit, target, |gap| format!("{gap:.2} x"))
    }

    fn at_least_in(value: f64, limit: f64, target: String, gap: fn(f64) -> String) -> Target {
        let met = value >= limit;
        let verdict = if met {
            "met".to_string()
        } else {
            format!("missed by {}", gap(limit - value))
        };
        Target {
            target,
            met,
            verdict,
            informative: false,
        }
    }

    /// `value <= limit`; `unit` names the unit of the difference.
    pub(crate) fn at_most(value: f64, limit: f64, target: String, unit: &str) -> Target {
        let met = value <= limit;
        let verdict = if met {
            "met".to_string()
        } else {
            format!(
                "missed by {:.2}{unit} ({:.0} % over)",
                value - limit,
                (value / limit - 1.0) * 100.0
            )
        };
        Target {
            target,
            met,
            verdict,
            informative: false,
        }
    }

    /// `count == 0`: a correctness figure (e.g. duplicates); the verdict
    /// says how many `what` there were.
    pub(crate) fn none(count: u64, what: &str) -> Target {
        let met = count == 0;
        Target {
            target: "= 0".to_string(),
            met,
            verdict: if met {
                "met".to_string()
            } else {
                format!("missed: {count} {what}")
            },
            informative: false,
        }
    }

    /// Marks the verdict as information only.
    pub(crate) fn informative(mut self) -> Target {
        self.informative = true;
        self.verdict = format!("{} (info)", self.verdict);
        self
    }
}

/// One line of the human table.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// What is measured, with its unit.
    pub(crate) measure: String,
    /// taskmill's figure.
    pub(crate) taskmill: Option<f64>,
    /// The reference: the ceiling, or the ideal for `io`.
    pub(crate) reference: Option<f64>,
    /// The ratio column (already formatted).
    pub(crate) ratio: String,
    /// The target, if the issue sets one.
    pub(crate) target: Option<Target>,
}

impl Row {
    /// A row comparing taskmill with the ceiling as a percentage.
    pub(crate) fn pct(measure: impl Into<String>, taskmill: f64, ceiling: f64) -> Row {
        Row {
            measure: measure.into(),
            taskmill: Some(taskmill),
            reference: Some(ceiling),
            ratio: format!("{:.1} %", pct(taskmill, ceiling)),
            target: None,
        }
    }

    /// A row comparing taskmill with a reference as a factor (`1.05 x`).
    pub(crate) fn times(measure: impl Into<String>, taskmill: f64, reference: f64) -> Row {
        Row {
            measure: measure.into(),
            taskmill: Some(taskmill),
            reference: Some(reference),
            ratio: if reference > 0.0 {
                format!("{:.2} x", taskmill / reference)
            } else {
                "-".to_string()
            },
            target: None,
        }
    }

    /// A row with a figure and no reference.
    pub(crate) fn value(measure: impl Into<String>, taskmill: f64) -> Row {
        Row {
            measure: measure.into(),
            taskmill: Some(taskmill),
            reference: None,
            ratio: String::new(),
            target: None,
        }
    }

    /// Attaches a target.
    pub(crate) fn with(mut self, target: Target) -> Row {
        self.target = Some(target);
        self
    }
}

/// What one scenario produced.
#[derive(Debug)]
pub(crate) struct ScenarioReport {
    /// Scenario name.
    pub(crate) scenario: &'static str,
    /// Rows of the human table.
    pub(crate) rows: Vec<Row>,
    /// The scenario's JSON object (the caller adds the common fields).
    pub(crate) json: Value,
}

impl ScenarioReport {
    /// The targets of the rows, for the JSON object.
    pub(crate) fn targets_json(&self) -> Value {
        Value::Array(
            self.rows
                .iter()
                .filter_map(|r| {
                    let t = r.target.as_ref()?;
                    Some(serde_json::json!({
                        "measure": r.measure,
                        "value": r.taskmill,
                        "target": t.target,
                        "met": t.met,
                        "verdict": t.verdict,
                        "informative": t.informative,
                    }))
                })
                .collect(),
        )
    }
}

/// `a` as a percentage of `b` (0 when `b` is 0).
pub(crate) fn pct(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b * 100.0 } else { 0.0 }
}

/// A duration in milliseconds.
pub(crate) fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn figure(v: Option<f64>) -> String {
    match v {
        None => "-".to_string(),
        Some(v) if v.abs() >= 1000.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// The human table of every scenario run.
pub(crate) fn table(header: &str, reports: &[ScenarioReport]) -> String {
    let mut lines: Vec<[String; 7]> = vec![[
        "scenario".into(),
        "measure".into(),
        "taskmill".into(),
        "ceiling/ref".into(),
        "ratio".into(),
        "target".into(),
        "verdict".into(),
    ]];
    for r in reports {
        for row in &r.rows {
            lines.push([
                r.scenario.to_string(),
                row.measure.clone(),
                figure(row.taskmill),
                figure(row.reference),
                row.ratio.clone(),
                row.target
                    .as_ref()
                    .map(|t| t.target.clone())
                    .unwrap_or_default(),
                row.target
                    .as_ref()
                    .map(|t| t.verdict.clone())
                    .unwrap_or_default(),
            ]);
        }
    }
    let mut widths = [0usize; 7];
    for l in &lines {
        for (w, cell) in widths.iter_mut().zip(l) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let _ = writeln!(out, "{header}");
    for (i, l) in lines.iter().enumerate() {
        let mut line = String::new();
        for (c, (cell, w)) in l.iter().zip(widths).enumerate() {
            let pad = w - cell.chars().count();
            // Figures right-aligned, words left-aligned.
            if (2..=4).contains(&c) {
                let _ = write!(line, "{}{cell}  ", " ".repeat(pad));
            } else {
                let _ = write!(line, "{cell}{}  ", " ".repeat(pad));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * 6;
            let _ = writeln!(out, "{}", "-".repeat(total));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_say_by_how_much() {
        assert_eq!(
            Target::at_least(85.0, 80.0, "x".into()).verdict,
            "met".to_string()
        );
        assert_eq!(
            Target::at_least(70.0, 80.0, "x".into()).verdict,
            "missed by 10.0 points"
        );
        assert_eq!(Target::none(0, "duplicates").verdict, "met");
        let t = Target::none(2, "duplicates");
        assert!(!t.met);
        assert_eq!(t.verdict, "missed: 2 duplicates");
        let t = Target::at_most(3.0, 2.0, "x".into(), " ms");
        assert!(!t.met);
        assert_eq!(t.verdict, "missed by 1.00 ms (50 % over)");
    }

    #[test]
    fn table_aligns_columns() {
        let r = ScenarioReport {
            scenario: "noop",
            rows: vec![
                Row::pct("publish jobs/s", 9000.0, 10000.0).with(Target::at_least(
                    90.0,
                    80.0,
                    ">= 80 %".into(),
                )),
                Row::value("peak RSS MB", 42.5),
            ],
            json: Value::Null,
        };
        let t = table("head", &[r]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "head");
        assert!(lines[3].contains("90.0 %") && lines[3].contains("met"));
        assert!(lines[4].contains("42.5"));
    }
}
