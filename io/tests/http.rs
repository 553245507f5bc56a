//! `http(s)://` through [`Location`]: reads (size, whole, ranges, record-aligned shards,
//! NotFound) from a plain HTTP server on loopback that serves HEAD, GET and single
//! `Range: bytes=a-b` requests the way static file servers and object stores' public URLs do.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use bytes::Bytes;
use infermesh_io::{Location, ObjectError};

/// Answers one request for `files` (path → bytes).
fn serve(
    files: &HashMap<String, Bytes>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response {
    let reply = |status: StatusCode| Response::builder().status(status);
    let Some(body) = files.get(uri.path()) else {
        return reply(StatusCode::NOT_FOUND)
            .body(Body::empty())
            .expect("404");
    };
    if method != Method::GET && method != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED)
            .body(Body::empty())
            .expect("405");
    }
    let len = body.len() as u64;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .map(|(a, b)| (a.parse::<u64>(), b.parse::<u64>().unwrap_or(u64::MAX)));
    let (slice, builder) = match range {
        None => (body.clone(), reply(StatusCode::OK)),
        Some((Ok(a), b)) if a < len => {
            let end = b.min(len - 1);
            let slice = body.slice(a as usize..=end as usize);
            let builder = reply(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {a}-{end}/{len}"));
            (slice, builder)
        }
        Some(_) => {
            return reply(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(Body::empty())
                .expect("416");
        }
    };
    let builder = builder
        .header(header::CONTENT_LENGTH, slice.len())
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::LAST_MODIFIED, "Sat, 21 Nov 2026 12:00:00 GMT");
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(slice)
    };
    builder.body(body).expect("response")
}

/// Serves `files` on 127.0.0.1 until the test's runtime ends; returns `http://127.0.0.1:PORT`.
async fn start(files: HashMap<String, Bytes>) -> String {
    let files = Arc::new(files);
    let app = Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap| {
        let files = files.clone();
        async move { serve(&files, &method, &uri, &headers) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn http_reads_sizes_ranges_and_not_found() {
    let data = common::jsonl(40);
    let files = HashMap::from([("/data/in.jsonl".to_string(), Bytes::from(data.clone()))]);
    let base = start(files).await;

    let loc = Location::parse(&format!("{base}/data/in.jsonl")).expect("uri");
    assert_eq!(loc.uri(), format!("{base}/data/in.jsonl"));
    common::check_reads(&loc, &data).await;
    // The same object reached as a child of its directory.
    let dir = Location::parse(&format!("{base}/data/")).expect("uri");
    let child = dir.child("in.jsonl");
    assert_eq!(child.uri(), loc.uri());
    assert_eq!(child.size().await.expect("size"), data.len() as u64);

    common::check_not_found(&format!("{base}/data/missing.jsonl")).await;
}

#[tokio::test]
async fn http_input_that_changed_since_planning_fails_the_read() {
    let data = common::jsonl(40);
    let mut grown = data.clone();
    grown.extend_from_slice(b"{\"i\":40}\n");
    // Cut inside the last record, and before the last third (the server answers 416).
    let (inside, early) = (data.len() - 100, data.len() / 2);
    let files = HashMap::from([
        (
            "/inside.jsonl".to_string(),
            Bytes::from(data[..inside].to_vec()),
        ),
        (
            "/early.jsonl".to_string(),
            Bytes::from(data[..early].to_vec()),
        ),
        ("/grown.jsonl".to_string(), Bytes::from(grown.clone())),
    ]);
    let base = start(files).await;
    let planned = data.len() as u64;
    for (name, found) in [("inside", inside), ("early", early), ("grown", grown.len())] {
        let loc = Location::parse(&format!("{base}/{name}.jsonl")).expect("uri");
        common::check_changed(&loc, planned, found as u64).await;
    }
}

#[tokio::test]
async fn http_server_without_range_support_is_an_error_not_wrong_bytes() {
    // A server that ignores `Range` and answers 200 with the whole object (as Python's
    // http.server does) must not be taken as giving the range.
    let app = Router::new().fallback(|| async { "0123456789" });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let loc = Location::parse(&format!("http://{addr}/x.jsonl")).expect("uri");
    let got = loc.get_range(2, 5).await;
    assert!(matches!(got, Err(ObjectError::Store { .. })), "{got:?}");
    assert_eq!(loc.get().await.expect("get"), &b"0123456789"[..]);
}

#[test]
fn unknown_schemes_are_bad_uris() {
    for uri in ["ftp://host/x", "gs://bucket/x", "not a uri"] {
        let err = Location::parse(uri).expect_err(uri);
        assert!(matches!(err, ObjectError::BadUri { .. }), "{uri}: {err}");
    }
}

/// Inside a credentials scope an http(s) store sends the tenant's bearer token; outside it
/// (and with another tenant's token) the same server refuses, and the unscoped store that was
/// made first is not reused inside the scope, nor the scoped one after it.
#[tokio::test]
async fn a_bearer_token_is_sent_only_inside_its_scope() {
    let data = Bytes::from_static(b"{\"i\":1}\n");
    let files = Arc::new(HashMap::from([(
        "/private/in.jsonl".to_string(),
        data.clone(),
    )]));
    let app = Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap| {
        let files = files.clone();
        async move {
            let authorized = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                == Some("Bearer t0k-team-a");
            if !authorized {
                return Response::builder()
                    .status(StatusCode::FORBIDDEN)
                    .body(Body::empty())
                    .expect("403");
            }
            serve(&files, &method, &uri, &headers)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let uri = format!("http://{addr}/private/in.jsonl");

    let refused = Location::parse(&uri).expect("uri").get().await;
    assert!(refused.is_err(), "no token: {refused:?}");
    let team = |token: &str| infermesh_io::Credentials {
        bearer_token: Some(token.into()),
        ..Default::default()
    };
    let got = team("t0k-team-a")
        .scope(async { Location::parse(&uri).expect("uri").get().await })
        .await
        .expect("the tenant's token reads it");
    assert_eq!(got, data);
    let other = team("t0k-team-b")
        .scope(async { Location::parse(&uri).expect("uri").get().await })
        .await;
    assert!(other.is_err(), "another tenant's token: {other:?}");
    // After the scope the shared store is the process's own again.
    let after = Location::parse(&uri).expect("uri").get().await;
    assert!(after.is_err(), "the token outlived its scope: {after:?}");
}
