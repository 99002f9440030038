//! What one call built on the node, in order, and the changes still running
//! for it on blocking threads.
//!
//! The ledger is shared between the call's interfaces and its caller. The
//! caller closes it when the call has ended: what it lists is then the
//! caller's to keep or undo, and a change that finishes after that undoes
//! itself.

use std::sync::Arc;

/// What one request built on the node, in order. Closed when the request
/// has ended: a build finishing after that must undo itself.
#[derive(Debug, Default)]
pub struct Ledger {
    inner: std::sync::Mutex<LedgerState>,
    /// Changes to the node running on blocking threads for this request.
    in_flight: std::sync::atomic::AtomicUsize,
    settled: tokio::sync::Notify,
}

/// One change in flight; dropping it (on its blocking thread, however the
/// change ends) tells the ledger.
struct InFlight(Arc<Ledger>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.settled.notify_waiters();
        }
    }
}

/// What a closed ledger lists: VMs configured, partitions built and
/// customisations made, each in the order they happened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Built {
    pub vms: Vec<String>,
    pub partitions: Vec<String>,
    pub customized: Vec<Customization>,
}

impl Built {
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty() && self.partitions.is_empty() && self.customized.is_empty()
    }
}

#[derive(Debug, Default)]
struct LedgerState {
    closed: bool,
    vms: Vec<String>,
    partitions: Vec<String>,
    customized: Vec<Customization>,
}

/// A VM's spec and seed as they were before this request customised it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customization {
    pub vm: String,
    pub spec: String,
    pub seed: Vec<u8>,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a partition; `false` when the request has already ended and
    /// the caller must remove it.
    pub(crate) fn add_partition(&self, id: &str) -> bool {
        let mut s = self.lock();
        if !s.closed {
            s.partitions.push(id.to_string());
        }
        !s.closed
    }

    /// Records a VM; `false` when the request has already ended.
    pub(crate) fn add_vm(&self, name: &str) -> bool {
        let mut s = self.lock();
        if !s.closed {
            s.vms.push(name.to_string());
        }
        !s.closed
    }

    /// Records a customisation to undo if the request fails; `false` when
    /// the request has already ended.
    pub(crate) fn add_customization(&self, c: Customization) -> bool {
        let mut s = self.lock();
        if !s.closed {
            s.customized.push(c);
        }
        !s.closed
    }

    pub(crate) fn has_vm(&self, name: &str) -> bool {
        self.lock().vms.iter().any(|v| v == name)
    }

    pub(crate) fn has_partition(&self, id: &str) -> bool {
        self.lock().partitions.iter().any(|p| p == id)
    }

    pub(crate) fn counts(&self) -> (usize, usize) {
        let s = self.lock();
        (s.vms.len(), s.partitions.len())
    }

    /// Ends the request: returns what it built and refuses anything more.
    pub fn close(&self) -> Built {
        let mut s = self.lock();
        s.closed = true;
        Built {
            vms: std::mem::take(&mut s.vms),
            partitions: std::mem::take(&mut s.partitions),
            customized: std::mem::take(&mut s.customized),
        }
    }

    /// Runs a change to the node on a blocking thread, counted as in
    /// flight until it ends however it ends (the caller waits for it in
    /// [`Ledger::settle`]). `change` gets the ledger to record what it
    /// built from that same thread, so that a request that ended meanwhile
    /// still sees it.
    pub(crate) async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        change: impl FnOnce(&Ledger) -> T + Send + 'static,
    ) -> wasmtime::Result<T> {
        let flight = self.begin();
        let ledger = self.clone();
        Ok(provd_engine::spawn_blocking(move || {
            let _flight = flight;
            change(&ledger)
        })
        .await?)
    }

    /// Counts a change that is about to run on a blocking thread.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// Waits until no change of this request is running any more: a request
    /// that was stopped keeps its slot until its builds have finished (and,
    /// seeing the ledger closed, removed their own results).
    pub async fn settle(&self) {
        loop {
            let notified = self.settled.notified();
            if self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Runs `run(0..count)` on up to four threads (the node's cores) and
/// returns the results in order. After the first failure no new item is
/// started; items never started are absent from the result.
pub(crate) fn side_by_side<T: Send, E: Send>(
    count: usize,
    run: impl Fn(usize) -> Result<T, E> + Sync,
) -> Vec<Result<T, E>> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 4);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: std::sync::Mutex<Vec<Option<Result<T, E>>>> =
        std::sync::Mutex::new((0..count).map(|_| None).collect());
    // The workers log in the caller's span, as its own thread would.
    let span = tracing::Span::current();
    std::thread::scope(|scope| {
        for _ in 0..workers.min(count) {
            scope.spawn(|| {
                let _entered = span.enter();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= count || failed.load(Ordering::SeqCst) {
                        break;
                    }
                    let result = run(i);
                    if result.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    let mut all = results.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(slot) = all.get_mut(i) {
                        *slot = Some(result);
                    }
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(|p| p.into_inner()).into_iter().flatten().collect()
}
