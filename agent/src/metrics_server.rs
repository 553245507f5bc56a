//! The agent's HTTP endpoint for Prometheus and the kubelet (`--metrics-addr`):
//! `GET /metrics` (OpenMetrics text), `GET /healthz` (200 while the process runs) and
//! `GET /readyz` (200 while the stream to the operator is attached, 503 otherwise).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::metrics::AgentMetrics;

/// The content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the endpoint's listener, so that a bad or busy address fails at start-up.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// The routes, for [`serve`] and for tests.
pub fn router(metrics: Arc<AgentMetrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(metrics)
}

/// Serves the endpoint on `listener` until the process ends.
pub async fn serve(listener: TcpListener, metrics: Arc<AgentMetrics>) -> std::io::Result<()> {
    axum::serve(listener, router(metrics)).await
}

async fn metrics_text(State(metrics): State<Arc<AgentMetrics>>) -> Response {
    match metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response()
        }
    }
}

async fn ready(State(metrics): State<Arc<AgentMetrics>>) -> (StatusCode, &'static str) {
    if metrics.is_connected() {
        (StatusCode::OK, "attached to the operator\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not attached to the operator\n",
        )
    }
}
