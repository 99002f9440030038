//! The listener: TLS with client certificates on TCP, plain HTTP on the
//! owner-only admin socket, bounded connections and timeouts, graceful
//! shutdown.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use provd_engine::{Engine, EngineConfig};
use provd_node::Node;
use provd_store::Store;
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use crate::api::{ApiError, AppState, Peer};
use crate::config::Config;
use crate::metrics::{Metrics, RequestLabels};
use crate::ops::Operations;

/// Image imports run at once per node.
const PARALLEL_IMPORTS: usize = 2;

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
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let store = {
        let data = data.clone();
        tokio::task::spawn_blocking(move || Store::open(&data)).await??
    };
    let store = Arc::new(store);
    // Repack moves a stop interrupted are settled first, from what each
    // private partition carries; then interrupted operations roll back.
    let settled = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || provd_vm::repack::recover(&store)).await??
    };
    if settled > 0 {
        tracing::warn!(moves = settled, "settled repack moves interrupted by a stop");
    }
    let recovered = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || Operations::recover(&store)).await??
    };
    if recovered > 0 {
        tracing::warn!(operations = recovered, "rolled back operations interrupted by a stop");
    }
    let mut trusted = Vec::new();
    for path in &config.trusted_keys {
        trusted.push(
            provd_bundle::PublicKey::read_file(path)
                .with_context(|| format!("trusted key {}", path.display()))?,
        );
    }
    let images = Arc::new(provd_images::Images::new(
        store.clone(),
        provd_images::ImportLimits::default(),
        PARALLEL_IMPORTS,
    ));
    let engine = Engine::new(EngineConfig {
        policy: config.node_policy(),
        cache_dir: Some(data.join("cache")),
        images: Some(images),
        ..EngineConfig::default()
    })?;
    let node = Arc::new(Node::new(engine, store.clone(), trusted));
    let metrics = Arc::new(Metrics::new());
    let ops = Operations::new(
        node.clone(),
        store.clone(),
        metrics.clone(),
        config.limits.max_running_operations,
        config.limits.max_queued_operations,
        (config.limits.keep_operations, config.limits.keep_audit_rows),
    );
    let state = AppState {
        node,
        store,
        ops: ops.clone(),
        metrics: metrics.clone(),
        limits: config.limits,
        capacity: config.capacity,
    };
    let timeout = config.limits.request_timeout();
    let router = crate::api::router(state).layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let metrics = metrics.clone();
            guard(req, next, timeout, metrics)
        },
    ));

    let tls = crate::tls::server_config(&config.tls.cert, &config.tls.key, &config.tls.client_ca)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
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

    let graceful = GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(
        usize::try_from(config.limits.max_connections).unwrap_or(1),
    ));
    let header_timeout = Duration::from_secs(config.limits.header_timeout_secs);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p?,
            _ = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, remote)) = accepted else { continue };
                let acceptor = acceptor.clone();
                let router = router.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let _permit = permit;
                    let tls = match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::info!(%remote, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                    let named = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(crate::tls::peer_name)
                        .unwrap_or_else(|| Err("no client certificate".into()));
                    let peer = match named {
                        Ok(name) => name,
                        Err(why) => {
                            tracing::warn!(%remote, %why, "client certificate refused");
                            return;
                        }
                    };
                    let conn = connection(TokioIo::new(tls), router, Peer(peer), header_timeout);
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(%remote, error = %e, "connection ended with an error");
                    }
                });
            }
            accepted = accept_admin(admin.as_ref()) => {
                let Ok(stream) = accepted else { continue };
                let router = router.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let _permit = permit;
                    let conn = connection(TokioIo::new(stream), router, Peer("local".into()), header_timeout);
                    let _ = watcher.watch(conn).await;
                });
            }
            _ = &mut shutdown => break,
        }
    }
    tracing::info!("shutting down: no new connections");
    drop(listener);
    if let Some(path) = &config.admin_socket {
        let _ = std::fs::remove_file(path);
    }
    ops.shut_down(Duration::from_secs(config.limits.shutdown_grace_secs)).await;
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after 10 s; closing them");
    }
    tracing::info!("provd stopped");
    Ok(())
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

/// Every request: a time limit, counted by status.
async fn guard(req: Request, next: Next, timeout: Duration, metrics: Arc<Metrics>) -> Response {
    // Only the methods the API knows get a label of their own: a client
    // inventing methods must not grow the metrics without bound.
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "DELETE" | "PUT" | "HEAD" | "OPTIONS" | "PATCH") => m.to_string(),
        _ => "other".to_string(),
    };
    let response = match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("the request took longer than {} s", timeout.as_secs()),
        )
        .into_response(),
    };
    metrics
        .requests
        .get_or_create(&RequestLabels { method, status: response.status().as_u16().to_string() })
        .inc();
    response
}
