//! The listener: TLS with client certificates on TCP, plain HTTP on the
//! owner-only admin socket, bounded connections and timeouts, graceful
//! shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use provd_node::{Node, NodeConfig, Opened};
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use crate::access::Role;
use crate::api::{ApiError, AppState, Peer};
use crate::config::Config;
use crate::metrics::{Metrics, RequestLabels, RouteLabels};

/// A running daemon's address, once it listens.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub addr: std::net::SocketAddr,
}

/// Opens the node and serves until `shutdown` resolves; `on_bound` learns
/// the address (port 0 in the configuration picks a free one).
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
    on_bound: impl FnOnce(Bound),
) -> anyhow::Result<()> {
    let data = config.data_dir.clone();
    let metrics = Arc::new(Metrics::new());
    let metrics_on = config.metrics.enabled;
    // With metrics off, operations report to nothing.
    let meter: Arc<dyn provd_node::operations::Meter> =
        if metrics_on { metrics.clone() } else { Arc::new(provd_node::operations::NoMeter) };
    let Opened { node, ops, .. } = Node::open(
        NodeConfig {
            data_dir: data.clone(),
            policy: config.node_policy(),
            trusted_keys: config.trusted_keys.clone(),
            max_running_operations: config.limits.max_running_operations,
            max_queued_operations: config.limits.max_queued_operations,
            keep_operations: config.limits.keep_operations,
            keep_audit_rows: config.limits.keep_audit_rows,
            libvirt: config.hypervisor.libvirt_uri.clone().map(provd_node::Libvirt::new),
            start_vms: config.hypervisor.start,
        },
        meter,
    )
    .await?;
    // The installed plugins' series exist from the start.
    let listed = {
        let node = node.clone();
        provd_node::spawn_blocking(move || node.bundles()).await
    };
    match listed {
        Ok(Ok(list)) => list.bundles.iter().for_each(|b| metrics.plugin_known(&b.name)),
        other => tracing::warn!(?other, "listing the installed plugins for metrics"),
    }
    let state = AppState {
        node,
        ops: ops.clone(),
        metrics: metrics.clone(),
        limits: config.limits,
        capacity: config.capacity,
        metrics_on,
        gc: provd_node::GcPolicy {
            max_age_secs: config.images.max_age_secs,
            max_bytes: config.images.max_bytes,
        },
        gc_lock: Arc::default(),
    };
    let scheduled = (config.images.gc_interval_secs > 0)
        .then(|| tokio::spawn(collect_on_schedule(state.clone(), config.images.gc_interval_secs)));
    let timeout = config.limits.request_timeout();
    let router = crate::api::router(state).layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let metrics = metrics_on.then(|| metrics.clone());
            guard(req, next, timeout, metrics)
        },
    ));

    // Swapped whole on SIGHUP; a connection keeps the configuration it
    // started its handshake with.
    let tls_shared = Arc::new(std::sync::RwLock::new(crate::tls::server_config(&config.tls)?));
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP")?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let admin = match &config.admin_socket {
        Some(path) => Some(bind_admin(path)?),
        None => None,
    };
    tracing::info!(%addr, data = %data.display(), "provd listening");
    on_bound(Bound { addr });

    let access = Arc::new(config.access.clone());
    let graceful = GracefulShutdown::new();
    let gate = Arc::new(Gate::new(&config.limits));
    let admin_slots = Arc::new(tokio::sync::Semaphore::new(
        usize::try_from(config.limits.max_admin_connections).unwrap_or(1),
    ));
    let header_timeout = Duration::from_secs(config.limits.header_timeout_secs);
    let handshake_timeout = Duration::from_secs(config.limits.handshake_timeout_secs);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, remote)) = accepted else { continue };
                // The handshake and small answers go out as written: with
                // Nagle, a flight of several records waits for the peer's
                // delayed ACK (40 ms on Linux) on every new connection.
                let _ = tcp.set_nodelay(true);
                let (ticket, mut closed) = gate.handshake(remote.ip());
                let tls_config = tls_shared.read().unwrap_or_else(|p| p.into_inner()).clone();
                let router = router.clone();
                let watcher = graceful.watcher();
                let access = access.clone();
                let gate = gate.clone();
                tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now() + handshake_timeout;
                    let hello = tokio_rustls::LazyConfigAcceptor::new(
                        rustls::server::Acceptor::default(),
                        tcp,
                    );
                    let Some(start) = handshake_step(hello, deadline, &mut closed, remote).await
                    else {
                        return;
                    };
                    // A client that sent a whole ClientHello is closed to
                    // make room only after every one that did not.
                    ticket.hello_read();
                    let rest = start.into_stream(tls_config);
                    let Some(tls) = handshake_step(rest, deadline, &mut closed, remote).await else {
                        return;
                    };
                    if !ticket.complete() {
                        return;
                    }
                    let slot = match gate.establish(remote.ip()) {
                        Ok(slot) => slot,
                        Err(why) => {
                            tracing::warn!(%remote, why, "connection closed");
                            return;
                        }
                    };
                    let named = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(crate::tls::peer_subject)
                        .unwrap_or_else(|| Err("no client certificate".into()));
                    let peer = match named {
                        Ok(subject) => Peer { role: access.role(&subject), name: subject.name },
                        Err(why) => {
                            tracing::warn!(%remote, %why, "client certificate refused");
                            return;
                        }
                    };
                    let conn = connection(TokioIo::new(tls), router, peer, header_timeout);
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(%remote, error = %e, "connection ended with an error");
                    }
                    drop(slot);
                });
            }
            accepted = accept_admin(admin.as_ref()) => {
                let Ok(stream) = accepted else { continue };
                // Slots of its own: the TCP side being full never locks
                // the node's administrator out.
                let Ok(permit) = admin_slots.clone().try_acquire_owned() else {
                    tracing::warn!("admin socket: every slot is taken; connection closed");
                    continue;
                };
                let router = router.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let _permit = permit;
                    // Reaching the socket takes the node's root account.
                    let local = Peer { name: "local".into(), role: Some(Role::Admin) };
                    let conn = connection(TokioIo::new(stream), router, local, header_timeout);
                    let _ = watcher.watch(conn).await;
                });
            }
            _ = hangups.recv() => {
                // A bad file keeps the running configuration: a typo must
                // not lock every manager out.
                match crate::tls::server_config(&config.tls) {
                    Ok(tls) => {
                        *tls_shared.write().unwrap_or_else(|p| p.into_inner()) = tls;
                        tracing::info!("SIGHUP: TLS certificates and revocation lists read again");
                    }
                    Err(e) => tracing::error!(error = %e, "SIGHUP: TLS files refused; the previous ones stay in use"),
                }
            }
            _ = &mut shutdown => break,
        }
    }
    tracing::info!("shutting down: no new connections");
    drop(listener);
    if let Some(path) = &config.admin_socket {
        let _ = std::fs::remove_file(path);
    }
    if let Some(task) = scheduled {
        task.abort();
    }
    ops.shut_down(Duration::from_secs(config.limits.shutdown_grace_secs)).await;
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after 10 s; closing them");
    }
    tracing::info!("provd stopped");
    Ok(())
}

/// Bounds on TCP connections.
///
/// A connection still in its TLS handshake has proved nothing: it holds a
/// place in `pending`, at most `max_handshakes` in all and
/// `max_handshakes_per_address` from one address, and when a new one comes
/// the oldest over either bound is closed to make room. So idle or slow
/// handshakes can delay a manager by the time they hold a place, never
/// refuse it: whoever floods must keep opening connections faster than a
/// manager's handshake completes. An authenticated connection takes one of
/// `max_connections`, and one of `max_connections_per_address` of its
/// address; over either it is closed.
struct Gate {
    connections: Arc<tokio::sync::Semaphore>,
    established: Arc<std::sync::Mutex<PerAddress>>,
    max_per_address: u32,
    pending: Arc<std::sync::Mutex<Pending>>,
}

/// Connections per address; an address with none has no entry.
#[derive(Default)]
struct PerAddress(HashMap<IpAddr, u32>);

impl PerAddress {
    fn count(&self, ip: IpAddr) -> u32 {
        self.0.get(&ip).copied().unwrap_or(0)
    }

    fn add(&mut self, ip: IpAddr) {
        *self.0.entry(ip).or_insert(0) += 1;
    }

    fn release(&mut self, ip: IpAddr) {
        if let Some(n) = self.0.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.0.remove(&ip);
            }
        }
    }
}

/// A handshake in flight.
struct InFlight {
    id: u64,
    ip: IpAddr,
    /// Its ClientHello was read.
    hello: bool,
    /// Dropped (with the entry) to close the handshake.
    _cancel: tokio::sync::oneshot::Sender<()>,
}

/// Handshakes in flight, oldest first.
#[derive(Default)]
struct Pending {
    next: u64,
    order: std::collections::VecDeque<InFlight>,
    per_address: PerAddress,
    max: usize,
    max_per_address: u32,
}

impl Pending {
    /// Takes entry `pos` out, closing its handshake if it still runs.
    fn take(&mut self, pos: usize) -> bool {
        match self.order.remove(pos) {
            Some(entry) => {
                self.per_address.release(entry.ip);
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, id: u64) -> bool {
        let pos = self.order.iter().position(|e| e.id == id);
        pos.is_some_and(|p| self.take(p))
    }

    /// Closes the oldest handshake (from `ip` when given) that has not sent
    /// its ClientHello, or else the oldest; false when there is none.
    fn evict_oldest(&mut self, ip: Option<IpAddr>) -> bool {
        let from = |e: &InFlight| ip.is_none_or(|ip| e.ip == ip);
        let pos = self
            .order
            .iter()
            .position(|e| !e.hello && from(e))
            .or_else(|| self.order.iter().position(from));
        pos.is_some_and(|p| self.take(p))
    }
}

/// A handshake's place; dropping it frees the place.
struct HandshakeTicket {
    id: u64,
    pending: Arc<std::sync::Mutex<Pending>>,
}

impl HandshakeTicket {
    /// Its ClientHello was read.
    fn hello_read(&self) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = p.order.iter_mut().find(|e| e.id == self.id) {
            entry.hello = true;
        }
    }

    /// The handshake is over: false if it was closed to make room
    /// meanwhile (the connection is then dropped too).
    fn complete(&self) -> bool {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(self.id)
    }
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(self.id);
    }
}

/// An authenticated connection's share of the bounds.
struct Established {
    _slot: tokio::sync::OwnedSemaphorePermit,
    ip: IpAddr,
    counts: Arc<std::sync::Mutex<PerAddress>>,
}

impl Drop for Established {
    fn drop(&mut self) {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).release(self.ip);
    }
}

impl Gate {
    fn new(limits: &crate::config::HttpLimits) -> Gate {
        let pending = Pending {
            max: usize::try_from(limits.max_handshakes).unwrap_or(1),
            max_per_address: limits.max_handshakes_per_address,
            ..Pending::default()
        };
        Gate {
            connections: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(limits.max_connections).unwrap_or(1),
            )),
            established: Arc::default(),
            max_per_address: limits.max_connections_per_address,
            pending: Arc::new(std::sync::Mutex::new(pending)),
        }
    }

    /// A place for a new handshake from `ip`, closing the oldest over a
    /// bound; the receiver resolves when this one is closed in turn.
    fn handshake(&self, ip: IpAddr) -> (HandshakeTicket, tokio::sync::oneshot::Receiver<()>) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        while p.per_address.count(ip) >= p.max_per_address && p.evict_oldest(Some(ip)) {}
        while p.order.len() >= p.max && p.evict_oldest(None) {}
        let id = p.next;
        p.next += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        p.order.push_back(InFlight { id, ip, hello: false, _cancel: tx });
        p.per_address.add(ip);
        (HandshakeTicket { id, pending: self.pending.clone() }, rx)
    }

    /// A slot for an authenticated connection from `ip`.
    fn establish(&self, ip: IpAddr) -> Result<Established, &'static str> {
        let slot = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| "every connection slot is taken")?;
        let mut counts = self.established.lock().unwrap_or_else(|p| p.into_inner());
        if counts.count(ip) >= self.max_per_address {
            return Err("connections from this address are at their limit");
        }
        counts.add(ip);
        Ok(Established { _slot: slot, ip, counts: self.established.clone() })
    }
}

/// One step of a TLS handshake, within its deadline, unless the handshake
/// is closed to make room first; `None` (logged) ends the connection.
async fn handshake_step<T>(
    step: impl Future<Output = std::io::Result<T>>,
    deadline: tokio::time::Instant,
    closed: &mut tokio::sync::oneshot::Receiver<()>,
    remote: std::net::SocketAddr,
) -> Option<T> {
    tokio::select! {
        done = tokio::time::timeout_at(deadline, step) => match done {
            Ok(Ok(t)) => Some(t),
            Ok(Err(e)) => {
                tracing::info!(%remote, error = %e, "TLS handshake refused");
                None
            }
            Err(_) => {
                tracing::info!(%remote, "TLS handshake timed out");
                None
            }
        },
        _ = closed => {
            tracing::debug!(%remote, "handshake closed to make room for newer ones");
            None
        }
    }
}

fn connection<I>(
    io: I,
    router: axum::Router,
    peer: Peer,
    header_timeout: Duration,
) -> hyper::server::conn::http1::Connection<
    I,
    impl hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
        Response = Response,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Send,
>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            router.clone().oneshot(req.map(axum::body::Body::new))
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(true);
    builder.serve_connection(io, service)
}

fn bind_admin(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // A socket left by a stopped provd; the data directory lock guarantees
    // no other provd serves this node.
    let _ = std::fs::remove_file(path);
    // Bound inside a fresh owner-only directory, made 0600 there and only
    // then moved into place: nobody else can connect in between.
    let parent = path.parent().unwrap_or(Path::new("."));
    let private = parent.join(format!(".provd-admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::create_dir(&private)?;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
    let inner = private.join("admin.sock");
    let bound = tokio::net::UnixListener::bind(&inner)
        .with_context(|| format!("binding the admin socket {}", path.display()))
        .and_then(|l| {
            std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&inner, path)?;
            Ok(l)
        });
    let _ = std::fs::remove_dir_all(&private);
    bound
}

async fn accept_admin(
    admin: Option<&tokio::net::UnixListener>,
) -> std::io::Result<tokio::net::UnixStream> {
    match admin {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Image collections every `interval` seconds, the first one interval
/// after the start.
async fn collect_on_schedule(state: AppState, interval: u64) {
    let period = Duration::from_secs(interval);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        // The outcome is in the metrics, the log and the audit trail.
        let _ = crate::api::collect_images(&state, "provd", "schedule", state.gc).await;
    }
}

/// Every request: a time limit, counted by status and timed by route.
async fn guard(
    req: Request,
    next: Next,
    timeout: Duration,
    metrics: Option<Arc<Metrics>>,
) -> Response {
    let Some(metrics) = metrics else {
        return limited(req, next, timeout).await;
    };
    let started = std::time::Instant::now();
    // Only the methods the API knows get a label of their own: a client
    // inventing methods must not grow the metrics without bound.
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "DELETE" | "PUT" | "HEAD" | "OPTIONS" | "PATCH") => m.to_string(),
        _ => "other".to_string(),
    };
    // The route's template, never the path: names and ids in paths would
    // make a series each.
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = limited(req, next, timeout).await;
    metrics
        .request_seconds
        .get_or_create(&RouteLabels { method: method.clone(), route })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels { method, status: response.status().as_u16().to_string() })
        .inc();
    response
}

async fn limited(req: Request, next: Next, timeout: Duration) -> Response {
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("the request took longer than {} s", timeout.as_secs()),
        )
        .into_response(),
    }
}
