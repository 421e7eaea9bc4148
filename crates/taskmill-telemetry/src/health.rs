//! Readiness: a set of named checks. `/readyz` is ready when every registered
//! check passes, e.g. `broker` (connected) and `consumer:<queue>` (consuming).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Named readiness checks, shared between the runtime and the HTTP server.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<String, Check>>>,
}

#[derive(Debug, Default)]
struct Check {
    ok: bool,
    /// Why it fails, when the setter said.
    reason: Option<String>,
}

impl Readiness {
    /// A readiness with no checks (and so not ready until one is registered).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets check `name` to passing or failing, registering it if new.
    pub fn set(&self, name: &str, ok: bool) {
        self.set_because(name, ok, None);
    }

    /// Sets check `name` failing because of `reason` (shown by `/readyz`),
    /// or passing when `reason` is `None`.
    pub fn fail_because(&self, name: &str, reason: Option<String>) {
        self.set_because(name, reason.is_none(), reason);
    }

    fn set_because(&self, name: &str, ok: bool, reason: Option<String>) {
        let mut c = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let check = Check { ok, reason };
        match c.get_mut(name) {
            Some(v) => *v = check,
            None => {
                c.insert(name.to_string(), check);
            }
        }
    }

    /// Sets every registered check whose name starts with `prefix`.
    pub fn set_prefix(&self, prefix: &str, ok: bool) {
        let mut c = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        for (_, v) in c.iter_mut().filter(|(k, _)| k.starts_with(prefix)) {
            *v = Check { ok, reason: None };
        }
    }

    /// Ready when at least one check is registered and all pass; also returns
    /// the failing checks' names (`name: reason` where a reason was given).
    pub fn status(&self) -> (bool, Vec<String>) {
        let c = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let failing: Vec<String> = c
            .iter()
            .filter(|(_, check)| !check.ok)
            .map(|(k, check)| match &check.reason {
                Some(r) => format!("{k}: {r}"),
                None => k.clone(),
            })
            .collect();
        (!c.is_empty() && failing.is_empty(), failing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_checks_must_pass() {
        let r = Readiness::new();
        assert!(!r.status().0, "no checks: not ready");
        r.set("broker", true);
        r.set("consumer:a", false);
        assert_eq!(r.status(), (false, vec!["consumer:a".to_string()]));
        r.set_prefix("consumer:", true);
        assert!(r.status().0);
        r.fail_because("broker_flow", Some("low on memory".into()));
        assert_eq!(
            r.status(),
            (false, vec!["broker_flow: low on memory".to_string()])
        );
        r.fail_because("broker_flow", None);
        assert!(r.status().0);
    }
}
