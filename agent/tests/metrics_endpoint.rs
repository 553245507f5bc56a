//! The agent's `--metrics-addr` endpoint over real HTTP on a loopback port.

use std::sync::Arc;
use std::time::Duration;

use infermesh_agent::metrics::{AgentMetrics, ShardResult};
use infermesh_agent::metrics_server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A GET over a fresh connection; returns the status code, the headers and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[tokio::test]
async fn metrics_endpoint_shows_a_recorded_batch_and_readiness_follows_the_stream() {
    let metrics = Arc::new(AgentMetrics::new());
    let listener = metrics_server::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(metrics_server::serve(listener, metrics.clone()));

    metrics.observe_batch(32, Duration::from_millis(25));
    metrics.shard_finished(ShardResult::Completed);
    metrics.shard_finished(ShardResult::Failed);
    metrics.shard_finished(ShardResult::Completed);

    let (status, head, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    for line in [
        "# TYPE infermesh_agent_inference_seconds histogram",
        "infermesh_agent_inference_seconds_sum 0.025",
        "infermesh_agent_inference_seconds_count 1",
        "infermesh_agent_inference_seconds_bucket{le=\"0.016\"} 0",
        "infermesh_agent_inference_seconds_bucket{le=\"+Inf\"} 1",
        "# TYPE infermesh_agent_batch_size histogram",
        "infermesh_agent_batch_size_sum 32.0",
        "infermesh_agent_batch_size_count 1",
        "infermesh_agent_batch_size_bucket{le=\"16.0\"} 0",
        "infermesh_agent_batch_size_bucket{le=\"32.0\"} 1",
        "# TYPE infermesh_agent_records counter",
        "infermesh_agent_records_total 32",
        "# TYPE infermesh_agent_shards counter",
        "infermesh_agent_shards_total{result=\"completed\"} 2",
        "infermesh_agent_shards_total{result=\"failed\"} 1",
        "# TYPE infermesh_agent_records_per_second gauge",
        "infermesh_agent_records_per_second 3.2",
        "# TYPE infermesh_agent_connected gauge",
        "infermesh_agent_connected 0",
        "# EOF",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "no line `{line}` in:\n{body}"
        );
    }

    let (status, _, _) = get(addr, "/healthz").await;
    assert_eq!(status, 200);
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "not attached yet: {body}");

    metrics.set_connected(true);
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (_, _, body) = get(addr, "/metrics").await;
    assert!(
        body.lines().any(|l| l == "infermesh_agent_connected 1"),
        "{body}"
    );

    metrics.set_connected(false);
    let (status, _, _) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "the stream dropped");
    let (status, _, _) = get(addr, "/nothing-here").await;
    assert_eq!(status, 404);
}
