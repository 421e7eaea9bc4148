//! `taskmill dlq show`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use clap::Args;
use taskmill_broker::browse::{Browsed, XDeath};
use taskmill_core::HeaderValue;
use taskmill_core::config::Config;
use taskmill_core::wire::H_DEAD_AT_MS;

use super::entry::{Entry, format_age, now_ms};
use super::{DEFAULT_SCAN_LIMIT, QueueArg};

/// Arguments of `taskmill dlq show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Job id (`message_id`) of the dead letter.
    pub id: String,
    #[command(flatten)]
    queue: QueueArg,
    /// Look at no more than N dead letters while searching for the id.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SCAN_LIMIT)]
    limit: usize,
    /// Print one JSON object: the summary fields of `dlq list --json`, plus
    /// `properties`, `headers`, `x_death` and `body` (parsed JSON, else text).
    #[arg(long)]
    json: bool,
}

/// Prints the first dead letter with the id; removes nothing.
pub async fn run(config: &Config, args: ShowArgs) -> anyhow::Result<ExitCode> {
    let broker = super::connect(config).await?;
    let mut browser = super::open_dead(&broker, &args.queue).await?;
    let mut looked = 0usize;
    let scan = async {
        while looked < args.limit {
            let Some(msg) = browser.next().await? else {
                break;
            };
            looked += 1;
            if msg.message_id() == Some(args.id.as_str()) {
                let text = if args.json {
                    format!("{}\n", render_json(&msg, &args.queue.dead()))
                } else {
                    render(&msg, &args.queue.dead())
                };
                return anyhow::Ok(Some(text));
            }
        }
        Ok(None)
    }
    .await;
    super::finish(browser, &broker).await;
    let found = scan?;
    match found {
        Some(text) => {
            let mut out = std::io::stdout().lock();
            super::stdout_result(out.write_all(text.as_bytes()).and_then(|()| out.flush()))?;
            Ok(ExitCode::SUCCESS)
        }
        None => Err(super::not_found(&args.id, &args.queue, looked, args.limit)),
    }
}

/// One dead letter as a JSON object.
pub fn render_json(msg: &Browsed, dead: &str) -> serde_json::Value {
    let mut v = Entry::of(msg).to_json(now_ms());
    let headers: serde_json::Map<String, serde_json::Value> = msg
        .headers()
        .into_iter()
        .filter(|(name, _)| name != "x-death")
        .map(|(name, value)| {
            (
                name.to_string(),
                serde_json::Value::String(header_text(&value)),
            )
        })
        .collect();
    let body = msg.body();
    let body_json = serde_json::from_slice::<serde_json::Value>(body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into_owned()));
    if let Some(obj) = v.as_object_mut() {
        obj.insert("dead_queue".into(), dead.into());
        obj.insert(
            "properties".into(),
            serde_json::json!({
                "message_id": msg.message_id(),
                "content_type": msg.content_type(),
                "timestamp": msg.timestamp(),
                "delivery_mode": msg.delivery_mode(),
                "exchange": msg.exchange(),
                "routing_key": msg.routing_key(),
            }),
        );
        obj.insert("headers".into(), headers.into());
        obj.insert(
            "x_death".into(),
            msg.x_death()
                .iter()
                .map(describe_x_death)
                .collect::<Vec<_>>()
                .into(),
        );
        obj.insert("body_bytes".into(), body.len().into());
        obj.insert("body".into(), body_json);
    }
    v
}

/// The full text of one dead letter.
pub fn render(msg: &Browsed, dead: &str) -> String {
    let now = now_ms();
    let e = Entry::of(msg);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "dead letter {} in {dead}",
        e.id.as_deref().unwrap_or("(no message_id)")
    );
    let _ = writeln!(s, "  kind:      {}", e.kind.as_deref().unwrap_or("-"));
    let _ = writeln!(s, "  reason:    {} (by {})", e.reason, e.source.as_str());
    if let Some(err) = &e.error {
        let _ = writeln!(s, "  error:     {err}");
    }
    if let Some(q) = &e.queue {
        let _ = writeln!(s, "  queue:     {q}");
    }
    let _ = writeln!(s, "  attempts:  {}", e.attempts);
    if let (Some(at), Some(age)) = (e.dead_at_ms, e.age(now)) {
        let _ = writeln!(
            s,
            "  dead at:   {} ({} ago)",
            rfc3339_ms(at),
            format_age(age)
        );
    }
    if let Some(w) = &e.worker {
        let _ = writeln!(s, "  worker:    {w}");
    }

    let _ = writeln!(s, "properties:");
    let _ = writeln!(s, "  message_id:    {}", msg.message_id().unwrap_or("-"));
    let _ = writeln!(s, "  content_type:  {}", msg.content_type().unwrap_or("-"));
    match msg.timestamp() {
        Some(ts) => {
            let _ = writeln!(s, "  timestamp:     {ts} ({})", rfc3339_ms(ts * 1000));
        }
        None => {
            let _ = writeln!(s, "  timestamp:     -");
        }
    }
    let _ = writeln!(
        s,
        "  delivery_mode: {}",
        msg.delivery_mode().map_or("-".into(), |m| m.to_string())
    );
    let _ = writeln!(
        s,
        "  routed:        exchange `{}`, routing key `{}`",
        msg.exchange(),
        msg.routing_key()
    );

    let _ = writeln!(s, "headers:");
    let x_death = msg.x_death();
    for (name, value) in msg.headers() {
        if name == "x-death" {
            let _ = writeln!(s, "  x-death:");
            for d in &x_death {
                let _ = writeln!(s, "    - {}", describe_x_death(d));
            }
            continue;
        }
        let mut v = header_text(&value);
        if name == H_DEAD_AT_MS
            && let HeaderValue::Int(ms) = value
            && let Ok(ms) = u64::try_from(ms)
        {
            v = format!("{v} ({})", rfc3339_ms(ms));
        }
        let _ = writeln!(s, "  {name}: {v}");
    }

    let body = msg.body();
    match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        Ok(_) => {
            let _ = writeln!(s, "body ({} bytes, JSON):", body.len());
            // Valid JSON is valid UTF-8.
            let _ = writeln!(s, "{}", pretty_json(&String::from_utf8_lossy(body)));
        }
        Err(_) => match std::str::from_utf8(body) {
            Ok(text) => {
                let _ = writeln!(s, "body ({} bytes, not JSON):", body.len());
                let _ = writeln!(s, "{text}");
            }
            Err(_) => {
                let _ = writeln!(s, "body ({} bytes, binary; hex):", body.len());
                let _ = writeln!(s, "{}", hex(body, 4096));
            }
        },
    }
    s
}

/// Re-indents valid JSON text, two spaces a level, keeping the key order
/// and every token as sent (parsing into a map would sort the keys).
fn pretty_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = text.chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    };
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
                    chars.next();
                }
                if matches!(chars.peek(), Some('}' | ']')) {
                    out.extend(chars.next());
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_ascii_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

fn describe_x_death(d: &XDeath) -> String {
    let mut t = format!("reason={} queue={} count={}", d.reason, d.queue, d.count);
    if let Some(time) = d.time {
        let _ = write!(t, " time={}", rfc3339_ms(time * 1000));
    }
    if let Some(x) = &d.exchange {
        let _ = write!(t, " exchange={x}");
    }
    if !d.routing_keys.is_empty() {
        let _ = write!(t, " routing-keys={}", d.routing_keys.join(","));
    }
    t
}

fn header_text(v: &HeaderValue) -> String {
    match v {
        HeaderValue::Str(s) => s.clone(),
        HeaderValue::Int(n) => n.to_string(),
        HeaderValue::Bool(b) => b.to_string(),
        HeaderValue::Float(f) => f.to_string(),
        HeaderValue::Bytes(b) => format!("<{} bytes: {}>", b.len(), hex(b, 64)),
        HeaderValue::Other(kind) => format!("<{kind}>"),
    }
}

fn hex(bytes: &[u8], max: usize) -> String {
    let mut s = String::with_capacity(bytes.len().min(max) * 2 + 16);
    for b in bytes.iter().take(max) {
        let _ = write!(s, "{b:02x}");
    }
    if bytes.len() > max {
        let _ = write!(s, "... ({} more bytes)", bytes.len() - max);
    }
    s
}

fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::pretty_json;

    #[test]
    fn pretty_json_keeps_order_and_strings() {
        let src = r#" {"z":1, "a":[1,2,{}], "s":"a,b:{\"c\"}", "e":[ ] ,"n":{"x":null}} "#;
        let want = r#"{
  "z": 1,
  "a": [
    1,
    2,
    {}
  ],
  "s": "a,b:{\"c\"}",
  "e": [],
  "n": {
    "x": null
  }
}"#;
        assert_eq!(pretty_json(src), want);
        assert_eq!(pretty_json("42"), "42");
        assert_eq!(pretty_json("\"x y\""), "\"x y\"");
    }
}
