//! What a running plugin reports, turned into the operation's live
//! progress, its audit trail (decisions one row each, the rest folded) and
//! the node's metrics.

use super::*;

#[derive(Default)]
pub(super) struct AuditBuffer {
    rows: Vec<NewAudit>,
    written: usize,
    folded: HashMap<(&'static str, &'static str, &'static str), u64>,
}

/// Turns what a running plugin reports into the operation's progress, the
/// audit trail and the metrics.
pub(super) struct OpObserver {
    pub(super) operation: String,
    pub(super) plugin: String,
    pub(super) version: String,
    pub(super) actor: String,
    pub(super) store: Arc<Store>,
    pub(super) meter: Arc<dyn Meter>,
    pub(super) running: Arc<Running>,
    pub(super) audit: Mutex<AuditBuffer>,
    /// When progress was last written to the store.
    pub(super) persisted: Mutex<Option<std::time::Instant>>,
    /// The phase the plugin last reported and when it entered it, for
    /// the time spent in each.
    pub(super) phase: Mutex<Option<(String, std::time::Instant)>>,
}

impl OpObserver {
    /// Ends the phase the plugin reported last: the call returned.
    pub(super) fn end_phase(&self) {
        let last = self.phase.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((phase, since)) = last {
            self.meter.plugin_phase(&self.plugin, &phase, since.elapsed());
        }
    }

    fn buffer(&self) -> std::sync::MutexGuard<'_, AuditBuffer> {
        self.audit.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn row(&self, interface: &str, function: &str) -> NewAudit {
        NewAudit {
            actor: self.actor.clone(),
            kind: "host-call".into(),
            plugin: Some(self.plugin.clone()),
            version: Some(self.version.clone()),
            operation: Some(self.operation.clone()),
            interface: Some(interface.into()),
            function: Some(function.into()),
            count: 1,
            ..NewAudit::default()
        }
    }

    /// Takes the buffered rows (and, at the end, the folded counts).
    pub(super) fn drain(&self, all: bool) -> Vec<NewAudit> {
        let mut b = self.buffer();
        let mut rows = std::mem::take(&mut b.rows);
        b.written += rows.len();
        if all {
            let mut folded: Vec<_> = b.folded.drain().collect();
            folded.sort();
            for ((interface, function, outcome), count) in folded {
                let mut row = self.row(interface, function);
                row.outcome = outcome.into();
                row.count = count;
                row.detail = Some(format!("{count} call(s) folded into this entry"));
                rows.push(row);
            }
        }
        rows
    }

    fn write_soon(&self, rows: Vec<NewAudit>) {
        if rows.is_empty() {
            return;
        }
        let store = self.store.clone();
        provd_engine::spawn_blocking(move || {
            if let Err(e) = store.append_audit(&rows) {
                tracing::error!(error = %e, "writing the audit trail failed");
            }
        });
    }
}

/// `text` with its control characters (C0, DEL, C1) escaped, the rest as
/// it is: a plugin's field cannot move a terminal's cursor or forge a
/// line, and JSON escapes its quotes once, not twice.
fn controls_escaped(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { c.escape_debug().to_string() } else { c.to_string() })
        .collect()
}

impl Observer for OpObserver {
    fn log(&self, r: &provd_engine::LogRecord) {
        // A plugin's text goes into the node's log escaped: a newline or a
        // terminal escape in it must not forge log lines or reach a
        // terminal as a control sequence. Its fields go as one JSON
        // object, which the JSON log writes as an object of its own.
        let fields: serde_json::Map<String, serde_json::Value> = r
            .fields
            .iter()
            .map(|(k, v)| (controls_escaped(k), serde_json::Value::String(controls_escaped(v))))
            .collect();
        let source = match r.source {
            provd_engine::Source::Log => "log",
            provd_engine::Source::Stdout => "stdout",
            provd_engine::Source::Stderr => "stderr",
        };
        tracing::info!(
            operation = %self.operation,
            actor = %self.actor,
            plugin = %r.plugin,
            plugin_level = r.level.as_str(),
            source,
            plugin_fields = %serde_json::Value::Object(fields),
            "{}",
            r.message.escape_debug()
        );
    }

    fn progress(&self, e: &provd_engine::ProgressEvent) {
        {
            let mut current = self.phase.lock().unwrap_or_else(|p| p.into_inner());
            if current.as_ref().is_none_or(|(p, _)| *p != e.phase) {
                let now = std::time::Instant::now();
                if let Some((phase, since)) = current.replace((e.phase.clone(), now)) {
                    self.meter.plugin_phase(&self.plugin, &phase, now - since);
                }
            }
        }
        let mut changed_phase = false;
        self.running.snapshot.send_modify(|s| {
            changed_phase = s.phase.as_deref() != Some(e.phase.as_str());
            s.seq += 1;
            s.phase = Some(e.phase.clone());
            s.done = e.done;
            s.total = e.total;
        });
        // The phase is persisted when it changes, at most once a second: a
        // plugin flipping between phases must not turn into a stream of
        // synchronous commits. The end persists the last one.
        let due = {
            let mut last = self.persisted.lock().unwrap_or_else(|p| p.into_inner());
            let due = changed_phase && last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        if due {
            let store = self.store.clone();
            let (id, phase, done, total) =
                (self.operation.clone(), e.phase.clone(), e.done, e.total);
            provd_engine::spawn_blocking(move || {
                if let Err(e) = store.operation_progress(&id, &phase, done, total) {
                    tracing::warn!(error = %e, "recording progress failed");
                }
            });
            self.write_soon(self.drain(false));
        }
    }

    fn host_call(&self, call: &HostCall) {
        self.meter.host_call(call);
        let decision =
            DECISIONS.contains(&(call.interface, call.function)) || call.outcome != CallOutcome::Ok;
        let rows = {
            let mut b = self.buffer();
            if decision && b.written + b.rows.len() < MAX_AUDIT_ROWS {
                let mut row = self.row(call.interface, call.function);
                row.args = Some(call.args.clone());
                row.outcome = call.outcome.as_str().into();
                row.detail = call.outcome.detail().map(str::to_string);
                b.rows.push(row);
            } else {
                *b.folded
                    .entry((call.interface, call.function, call.outcome.as_str()))
                    .or_default() += 1;
            }
            if b.rows.len() >= AUDIT_FLUSH_ROWS {
                b.written += b.rows.len();
                std::mem::take(&mut b.rows)
            } else {
                Vec::new()
            }
        };
        self.write_soon(rows);
    }

    fn instantiated(&self, elapsed: Duration) {
        self.meter.instantiated(&self.plugin, elapsed);
        self.meter.phase(&self.plugin, "instantiate", elapsed);
    }
}
