//! `provd:plugin/log`, and the plugin's stdout/stderr, which end up in the
//! same place under the same byte budget.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use provd_bindings::log::{self as wit, Level as WitLevel};
use provd_bindings::types::Field;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

use crate::observe::{Level, LogRecord, Observer, Source};

/// Longest line taken from stdout/stderr before it is cut into a record of
/// its own, so a plugin that never writes a newline cannot grow a buffer.
const MAX_LINE_BYTES: usize = 4096;
/// Fields kept per record; the rest are dropped and counted.
const MAX_FIELDS: usize = 64;

/// The per-invocation log budget shared by the `log` interface and the
/// plugin's stdout and stderr.
pub(crate) struct LogSink {
    plugin: String,
    observer: Arc<dyn Observer>,
    state: Mutex<Budget>,
}

#[derive(Default)]
struct Budget {
    remaining: u64,
    dropped_records: u64,
    last_stderr: Vec<String>,
}

/// Lines of stderr kept for the error message of a trap.
const STDERR_TAIL_LINES: usize = 2;

/// Keeps the last few stderr lines, skipping the standard library's hint
/// about RUST_BACKTRACE, which says nothing about what went wrong.
fn remember_stderr(tail: &mut Vec<String>, line: &str) {
    if line.starts_with("note: run with `RUST_BACKTRACE=1`") {
        return;
    }
    if tail.len() == STDERR_TAIL_LINES {
        tail.remove(0);
    }
    let mut line = line.to_string();
    line.truncate(line.floor_char_boundary(512));
    tail.push(line);
}

/// Figures about one invocation's logging.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Records dropped because the budget was spent.
    pub dropped_records: u64,
}

impl LogSink {
    pub(crate) fn new(plugin: String, observer: Arc<dyn Observer>, budget: u64) -> Arc<LogSink> {
        Arc::new(LogSink {
            plugin,
            observer,
            state: Mutex::new(Budget { remaining: budget, ..Budget::default() }),
        })
    }

    /// Emits a record if the budget allows, otherwise counts it as dropped.
    fn emit(&self, source: Source, level: Level, message: String, fields: Vec<(String, String)>) {
        let cost = message.len() as u64
            + fields.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>();
        {
            let Ok(mut budget) = self.state.lock() else { return };
            if source == Source::Stderr {
                remember_stderr(&mut budget.last_stderr, &message);
            }
            if cost > budget.remaining {
                budget.dropped_records += 1;
                // Spend what is left so that later, smaller records do not
                // slip through after a large one was dropped: the log stays
                // a prefix of what the plugin wrote.
                budget.remaining = 0;
                return;
            }
            budget.remaining -= cost;
        }
        let record = LogRecord { plugin: self.plugin.clone(), source, level, message, fields };
        self.observer.log(&record);
    }

    pub(crate) fn stats(&self) -> LogStats {
        let dropped_records = self.state.lock().map(|b| b.dropped_records).unwrap_or(0);
        LogStats { dropped_records }
    }

    /// The last lines the plugin wrote to stderr, which for a Rust guest
    /// that panicked are the panic location and message.
    pub(crate) fn last_stderr(&self) -> Option<String> {
        let lines = self.state.lock().ok()?.last_stderr.clone();
        (!lines.is_empty()).then(|| lines.join(" "))
    }
}

impl From<WitLevel> for Level {
    fn from(level: WitLevel) -> Level {
        match level {
            WitLevel::Trace => Level::Trace,
            WitLevel::Debug => Level::Debug,
            WitLevel::Info => Level::Info,
            WitLevel::Warn => Level::Warn,
            WitLevel::Error => Level::Error,
        }
    }
}

/// `log`'s view of a call: its log budget, nothing else.
pub(crate) struct LogView<'a> {
    pub sink: &'a LogSink,
}

pub(crate) struct LogData;

impl wasmtime::component::HasData for LogData {
    type Data<'a> = LogView<'a>;
}

impl wit::Host for LogView<'_> {
    async fn write(
        &mut self,
        level: WitLevel,
        message: String,
        fields: Vec<Field>,
    ) -> wasmtime::Result<()> {
        let fields = fields.into_iter().take(MAX_FIELDS).map(|f| (f.key, f.value)).collect();
        self.sink.emit(Source::Log, level.into(), message, fields);
        Ok(())
    }
}

/// stdout or stderr of a plugin, turned into log records line by line.
#[derive(Clone)]
pub(crate) struct LogStream {
    sink: Arc<LogSink>,
    source: Source,
    line: Arc<Mutex<Vec<u8>>>,
}

impl LogStream {
    pub(crate) fn new(sink: Arc<LogSink>, source: Source) -> LogStream {
        LogStream { sink, source, line: Arc::default() }
    }

    fn take(&self, bytes: &[u8]) {
        let Ok(mut line) = self.line.lock() else { return };
        for &b in bytes {
            if b == b'\n' {
                self.flush_line(&mut line);
            } else {
                line.push(b);
                if line.len() >= MAX_LINE_BYTES {
                    self.flush_line(&mut line);
                }
            }
        }
    }

    fn flush_line(&self, line: &mut Vec<u8>) {
        if line.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(line).into_owned();
        line.clear();
        let level = if self.source == Source::Stderr { Level::Warn } else { Level::Info };
        self.sink.emit(self.source, level, text, Vec::new());
    }

    /// Emits a last line that had no newline.
    pub(crate) fn finish(&self) {
        if let Ok(mut line) = self.line.lock() {
            self.flush_line(&mut line);
        }
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl OutputStream for LogStream {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.take(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always writable: bytes past the budget are counted and dropped,
        // never allowed to block the plugin.
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.take(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.finish();
        Poll::Ready(Ok(()))
    }
}
