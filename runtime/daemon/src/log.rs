//! The daemon's log: text for a reader (the default), or one JSON object
//! per line for a log pipeline (`[log] format = "json"`).
//!
//! A JSON line holds `time` (RFC 3339, UTC, milliseconds), `level`,
//! `target` and `message`, then the fields of the spans the event is in
//! (outermost first) and the event's own: `operation`, `actor` and
//! `plugin` where the event has them. A field named like one of the four
//! keys is written as `field.<name>`. A plugin's own log fields arrive as
//! one JSON object text in `plugin_fields` and are written as the object
//! `fields`, so a plugin's keys never become top-level keys.

use std::io::Write as _;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Installs the daemon's log on stderr, in `format`, filtered by
/// `PROVD_LOG` (default `info`).
pub fn init(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("PROVD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match format {
        LogFormat::Text => {
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                // Colours only on a terminal: under systemd the log goes to
                // the journal, which would keep the escape codes.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
        }
        LogFormat::Json => {
            tracing_subscriber::registry().with(filter).with(JsonLayer).init();
            // A panic (caught around every operation) is an event of the
            // log too, not lines of plain text between its objects.
            // Written straight to stderr, whatever `PROVD_LOG` filters.
            std::panic::set_hook(Box::new(|info| {
                let payload = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let location = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
                let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
                let line = format!(
                    "{{\"time\":{},\"level\":\"error\",\"target\":\"panic\",\"message\":\"panicked\",\
                     \"location\":{},\"panic\":{},\"thread\":{}}}\n",
                    Value::String(now_rfc3339()),
                    location.map_or(Value::Null, Value::String),
                    Value::String(payload),
                    Value::String(thread),
                );
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }));
        }
    }
}

/// Writes each event as one JSON object on a line of stderr.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonLayer;

/// The fields a span was created with, kept in its extensions.
struct SpanFields(Map<String, Value>);

#[derive(Default)]
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::String(value.into()));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::Bool(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), Value::String(format!("{value:?}")));
    }
}

const RESERVED: [&str; 4] = ["time", "level", "target", "message"];

impl<S> Layer<S> for JsonLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields.0));
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(SpanFields(map)) = ext.get_mut::<SpanFields>() {
            let mut fields = Fields(std::mem::take(map));
            values.record(&mut fields);
            *map = fields.0;
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let line = json_line(event, &ctx);
        // One write per line: lines of concurrent events never interleave.
        let mut out = std::io::stderr().lock();
        let _ = out.write_all(line.as_bytes());
    }
}

/// `event` as one JSON line, with the fields of the spans it is in
/// (outermost first).
fn json_line<S>(event: &Event<'_>, ctx: &Context<'_, S>) -> String
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let meta = event.metadata();
    let mut own = Fields::default();
    event.record(&mut own);
    let message = own.0.remove("message").unwrap_or(Value::String(String::new()));
    let mut rest = Map::new();
    let mut put = |key: String, value: Value| {
        if key == "plugin_fields"
            && let Some(Ok(Value::Object(fields))) =
                value.as_str().map(serde_json::from_str::<Value>)
        {
            rest.insert("fields".into(), Value::Object(fields));
            return;
        }
        let key = if RESERVED.contains(&key.as_str()) { format!("field.{key}") } else { key };
        rest.insert(key, value);
    };
    for span in ctx.event_scope(event).into_iter().flat_map(|scope| scope.from_root()) {
        if let Some(SpanFields(fields)) = span.extensions().get::<SpanFields>() {
            for (k, v) in fields {
                put(k.clone(), v.clone());
            }
        }
    }
    for (k, v) in own.0 {
        put(k, v);
    }
    // The four keys every line has come first, in this order, so that a
    // reader of the raw lines finds them at once; the rest by name.
    let head = [
        ("time", Value::String(now_rfc3339())),
        ("level", Value::String(meta.level().as_str().to_ascii_lowercase())),
        ("target", Value::String(meta.target().into())),
        ("message", message),
    ];
    let mut line = String::from("{");
    for (i, (key, value)) in head.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        line.push_str(&format!("\"{key}\":{value}"));
    }
    for (key, value) in rest {
        line.push(',');
        line.push_str(&Value::String(key).to_string());
        line.push(':');
        line.push_str(&value.to_string());
    }
    line.push_str("}\n");
    line
}

fn now_rfc3339() -> String {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let date = provd_node::utc(now.as_secs());
    let date = date.strip_suffix('Z').unwrap_or(&date);
    format!("{date}.{:03}Z", now.subsec_millis())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Collects what [`json_line`] makes of the events under a subscriber
    /// with the layer's span bookkeeping.
    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Collect {
        fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
            self.0.lock().unwrap().push(json_line(event, &ctx));
        }
    }

    #[test]
    fn events_are_one_object_with_span_and_plugin_fields() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let lines = Collect::default();
        let subscriber = tracing_subscriber::registry().with(JsonLayer).with(lines.clone());
        // The JSON layer writes to stderr too; the collected copy is checked.
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("op", operation = "op-1", actor = "admin");
            let _in = span.enter();
            tracing::warn!(
                plugin = "shared-partition",
                plugin_fields = r#"{"vm":"web-1","message":"x"}"#,
                level = "plugin's",
                "line one\nline \"two\""
            );
        });
        let lines = lines.0.lock().unwrap();
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with("{\"time\":"), "{}", lines[0]);
        assert!(lines[0].ends_with('\n') && lines[0].matches('\n').count() == 1, "{}", lines[0]);
        let v: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["level"], "warn");
        assert_eq!(v["message"], "line one\nline \"two\"");
        assert_eq!(v["operation"], "op-1");
        assert_eq!(v["actor"], "admin");
        assert_eq!(v["plugin"], "shared-partition");
        assert_eq!(v["fields"]["vm"], "web-1");
        assert_eq!(v["field.level"], "plugin's");
        assert_eq!(v["target"], module_path!());
        let time = v["time"].as_str().unwrap();
        assert!(time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
    }
}
