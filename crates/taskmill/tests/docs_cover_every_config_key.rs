//! `docs/configuration.md` documents every setting the binary knows: every
//! environment variable `taskmill config keys` prints, and every key of the
//! TOML that `taskmill config show` prints (top-level keys, the `[queue.NAME]`
//! and `[kind."NAME"]` tables and their fields). Adding a key to `config.rs`
//! without documenting it fails here.
//!
//! Runs the real binary with no inherited `TASKMILL_*` variables; needs no
//! broker.

use std::path::PathBuf;
use std::process::Command;

fn taskmill() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_taskmill"));
    // A developer's own settings must not change what is printed.
    for (k, _) in std::env::vars() {
        if k.starts_with("TASKMILL_") {
            c.env_remove(k);
        }
    }
    c
}

fn run(c: &mut Command) -> String {
    let out = c.output().expect("run the taskmill binary");
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn doc() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The key of a TOML line `name = value`, or `None` for other lines.
fn key_of(line: &str) -> Option<&str> {
    let (name, _) = line.split_once(" = ")?;
    let name = name.trim();
    (!name.is_empty() && !name.starts_with('#') && !name.starts_with('[')).then_some(name)
}

#[test]
fn every_env_var_from_config_keys_is_documented() {
    let keys = run(taskmill().args(["config", "keys"]));
    let names: Vec<&str> = keys
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert!(
        names.len() >= 20 && names.iter().all(|n| n.starts_with("TASKMILL_")),
        "unexpected `config keys` output:\n{keys}"
    );
    let doc = doc();
    let missing: Vec<&&str> = names
        .iter()
        .filter(|n| !doc.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not mention these variables (as `NAME`): {missing:?}"
    );
}

#[test]
fn every_key_of_config_show_is_documented() {
    // Optional keys are printed only when set, and the per-queue and per-kind
    // tables only when present: set them all so every key shows up.
    let dir = std::env::temp_dir().join(format!("tm-docs-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("all.toml");
    std::fs::write(
        &file,
        "[queue.default]\nprefetch = 10\nconcurrency = 5\nqueue_type = \"quorum\"\n\n\
         [kind.\"io.sleep\"]\ntimeout_ms = 1000\nmax_attempts = 3\nbackoff_base_ms = 100\n\
         backoff_factor = 3.0\nbackoff_max_ms = 5000\njitter = \"equal\"\n",
    )
    .unwrap();
    let shown = run(taskmill()
        .args(["--config", file.to_str().unwrap(), "config", "show"])
        .env("TASKMILL_STORE_URL", "sqlite://docs-test.db")
        .env("TASKMILL_WORKER_ID", "docs-test"));
    let _ = std::fs::remove_dir_all(&dir);

    let doc = doc();
    let mut checked = 0;
    let mut missing = Vec::new();
    // Which table a line belongs to: "" for the top level, else the table.
    let mut table = String::new();
    for line in shown.lines().map(str::trim) {
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            // `[queue]`, `[queue.default]`, `[kind."io.sleep"]`: the first part.
            table = header.split('.').next().unwrap_or(header).to_string();
            if !doc.contains(&format!("[{table}.")) {
                missing.push(format!("table [{table}.NAME]"));
            }
            continue;
        }
        let Some(key) = key_of(line) else { continue };
        checked += 1;
        if !doc.contains(&format!("`{key}`")) {
            let at = if table.is_empty() {
                "top level".to_string()
            } else {
                format!("[{table}.NAME]")
            };
            missing.push(format!("{key} ({at})"));
        }
    }
    assert!(
        checked >= 30,
        "too few keys found in `config show` output:\n{shown}"
    );
    for must in [
        "store_url",
        "worker_id",
        "timeout_ms",
        "jitter",
        "queue_type",
    ] {
        assert!(
            shown.lines().any(|l| key_of(l.trim()) == Some(must)),
            "`config show` did not print `{must}`:\n{shown}"
        );
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document these keys of `config show` (as `key`): {missing:?}"
    );
}
