//! Samples out of a Prometheus text exposition, as `/metrics` serves it.

/// The value of the sample written exactly `name{labels}` (labels in the
/// order the exposition prints them).
pub fn metric_value(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The sum of every sample of `name` whose labels include all of `labels`
/// (`key="value"` pairs), in any order.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            if ok { value.parse::<f64>().ok() } else { None }
        })
        .fold(0.0, |a, b| a + b)
}

/// The samples of metric `name` with label `queue="<queue>"`: each sample's
/// line and value.
pub fn samples<'a>(
    metrics: &'a str,
    name: &str,
    queue: &str,
) -> impl Iterator<Item = (&'a str, f64)> {
    let prefix = format!("{name}{{");
    let label = format!("queue=\"{queue}\"");
    metrics
        .lines()
        .filter(move |l| l.starts_with(&prefix) && l.contains(&label))
        .filter_map(|l| Some((l, l.rsplit(' ').next()?.parse::<f64>().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE taskmill_jobs_total counter\n\
        taskmill_jobs_total{queue=\"a\",kind=\"noop\",outcome=\"ok\"} 1500\n\
        taskmill_jobs_total{queue=\"a\",kind=\"noop\",outcome=\"dead\"} 2\n\
        taskmill_jobs_total{queue=\"ab\",kind=\"noop\",outcome=\"ok\"} 7\n\
        taskmill_up 1\n";

    #[test]
    fn a_value_is_found_by_its_exact_series() {
        let v = metric_value(
            TEXT,
            "taskmill_jobs_total{queue=\"a\",kind=\"noop\",outcome=\"ok\"}",
        );
        assert_eq!(v, Some(1500.0));
        assert_eq!(metric_value(TEXT, "taskmill_up"), Some(1.0));
        assert_eq!(metric_value(TEXT, "taskmill_u"), None);
    }

    #[test]
    fn a_sum_matches_whole_labels_in_any_order() {
        assert_eq!(
            metric_sum(TEXT, "taskmill_jobs_total", &[("queue", "a")]),
            1502.0
        );
        assert_eq!(
            metric_sum(
                TEXT,
                "taskmill_jobs_total",
                &[("outcome", "ok"), ("queue", "ab")]
            ),
            7.0
        );
        assert_eq!(metric_sum(TEXT, "taskmill_jobs", &[]), 0.0);
    }

    #[test]
    fn samples_of_one_queue() {
        let v: Vec<f64> = samples(TEXT, "taskmill_jobs_total", "a")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(v, vec![1500.0, 2.0]);
    }
}
