//! The operator's HTTP endpoints: `/metrics` (Prometheus), `/healthz` (the process serves),
//! `/readyz` (the store answers and, in a cluster, the API server was reached at start).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What the endpoints report.
#[derive(Clone)]
pub struct Health {
    /// The metrics to serve.
    pub metrics: Metrics,
    /// Set once start-up checks passed (store migrated, CRDs installed).
    pub ready: Arc<AtomicBool>,
    /// Whether the store answers (the core's flag; false during an outage).
    pub store: Arc<AtomicBool>,
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.metrics.encode(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(h): State<Health>) -> (StatusCode, &'static str) {
    if !h.ready.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    } else if !h.store.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "store unavailable: dispatch paused\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// The router of the endpoints.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
}

/// Serves the endpoints on `listener` until the process ends.
pub async fn serve(listener: TcpListener, health: Health) -> std::io::Result<()> {
    axum::serve(listener, router(health)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ShardCounters;

    async fn get_text(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        let code = out[9..12].parse().expect("status code");
        (code, out)
    }

    #[tokio::test]
    async fn endpoints_report_metrics_health_and_readiness() {
        let counters = ShardCounters::default();
        let metrics = Metrics::new(&counters);
        counters.completed.inc_by(7);
        metrics.write("workloads/status", "patch");
        let ready = Arc::new(AtomicBool::new(false));
        let store = Arc::new(AtomicBool::new(true));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(
            listener,
            Health {
                metrics,
                ready: ready.clone(),
                store: store.clone(),
            },
        ));
        let (code, body) = get_text(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            body.contains("infermesh_shards_completed_total 7"),
            "{body}"
        );
        assert!(
            body.contains(
                r#"infermesh_api_writes_total{resource="workloads/status",verb="patch"} 1"#
            ),
            "{body}"
        );
        assert_eq!(get_text(addr, "/healthz").await.0, 200);
        assert_eq!(get_text(addr, "/readyz").await.0, 503);
        ready.store(true, Ordering::Relaxed);
        assert_eq!(get_text(addr, "/readyz").await.0, 200);
        // A store outage: not ready until it answers again.
        store.store(false, Ordering::Relaxed);
        let (code, body) = get_text(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(
            body.ends_with("\r\n\r\nstore unavailable: dispatch paused\n"),
            "{body}"
        );
        store.store(true, Ordering::Relaxed);
        assert_eq!(get_text(addr, "/readyz").await.0, 200);
    }
}
