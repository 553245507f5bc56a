//! The object store of the runs whose fault is about it (`store-slow`): moto's S3 server in
//! the operator's namespace, reached by the operator and the agents only through a TCP proxy
//! that holds every request for the delay the fault writes into a file. The harness reads and
//! writes the objects itself with `infermesh-chaos s3 …`, run in that namespace against the
//! server directly (not slowed).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use infermesh_io::Location;

/// The bucket of every run (each run has a server of its own).
pub const BUCKET: &str = "chaos";

/// The delay a delay file holds (milliseconds, as text); none when it is absent or unreadable.
pub fn delay_of(file: &Path) -> Duration {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or_default()
}

/// Serves until the process is killed: each connection to `listen` is joined to a connection
/// to `upstream`, and the first bytes of each request (the client's bytes after an answer, or
/// the first on the connection) wait for the delay in `delay_file` before they are passed on.
/// HTTP/1.1 without pipelining (object_store's client) sends one request at a time, so each
/// request — a read of the input, a put or a copy of a part — is held once.
pub fn proxy(listen: &str, upstream: &str, delay_file: &Path) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let upstream = upstream.to_string();
        let delay_file = delay_file.to_path_buf();
        std::thread::spawn(move || {
            let Ok(server) = TcpStream::connect(&upstream) else {
                let _ = client.shutdown(Shutdown::Both);
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (Ok(client_w), Ok(server_r)) = (client.try_clone(), server.try_clone()) else {
                return;
            };
            let answered = Arc::new(AtomicBool::new(true));
            let seen = answered.clone();
            let back = std::thread::spawn(move || {
                pipe(server_r, client_w, &|| seen.store(true, Ordering::SeqCst));
            });
            pipe(client, server, &|| {
                if answered.swap(false, Ordering::SeqCst) {
                    let d = delay_of(&delay_file);
                    if !d.is_zero() {
                        std::thread::sleep(d);
                    }
                }
            });
            let _ = back.join();
        });
    }
    Ok(())
}

/// Copies `from` to `to` until either side closes, calling `before` ahead of each chunk.
fn pipe(mut from: TcpStream, mut to: TcpStream, before: &dyn Fn()) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                before();
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// Creates `bucket` on the server at `endpoint` (`http://host:port`) with a plain
/// `PUT /bucket` (object_store has no call for it; moto takes unsigned requests), waiting up
/// to a minute for the server to listen.
pub fn make_bucket(endpoint: &str, bucket: &str) -> Result<(), String> {
    let addr = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conn = loop {
        match TcpStream::connect(addr) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => {
                return Err(format!("the S3 server at {addr} does not listen: {e}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    write!(
        conn,
        "PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    if reply.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!(
            "creating bucket {bucket}: {}",
            reply.lines().next().unwrap_or("")
        ))
    }
}

/// Uploads a local file to `uri` (with the caller's `AWS_*`).
pub fn put(file: &Path, uri: &str) -> Result<(), String> {
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let loc = Location::parse(uri).map_err(|e| e.to_string())?;
    runtime()?
        .block_on(loc.put(bytes.into()))
        .map_err(|e| e.to_string())
}

/// Copies every object under `prefix` (taken as a folder) into `dir`, keeping the names below
/// the prefix; returns how many.
pub fn get(prefix: &str, dir: &Path) -> Result<usize, String> {
    let base = Location::parse(prefix).map_err(|e| e.to_string())?;
    let rt = runtime()?;
    let objects = rt.block_on(base.list()).map_err(|e| e.to_string())?;
    let root = prefix.trim_end_matches('/');
    for (uri, _) in &objects {
        let rel = uri
            .strip_prefix(root)
            .map(|r| r.trim_start_matches('/'))
            .filter(|r| !r.is_empty() && !r.split('/').any(|c| c == ".." || c == "."))
            .ok_or_else(|| format!("{uri} is not below {prefix}"))?;
        let bytes = rt
            .block_on(Location::parse(uri).map_err(|e| e.to_string())?.get())
            .map_err(|e| e.to_string())?;
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(objects.len())
}

/// How many committed parts (`part-*` right under `prefix`) there are.
pub fn count_parts(prefix: &str) -> Result<usize, String> {
    let base = Location::parse(prefix).map_err(|e| e.to_string())?;
    let root = format!("{}/", prefix.trim_end_matches('/'));
    let objects = runtime()?
        .block_on(base.list())
        .map_err(|e| e.to_string())?;
    Ok(objects
        .iter()
        .filter_map(|(uri, _)| uri.strip_prefix(&root))
        .filter(|rel| rel.starts_with("part-") && !rel.contains('/'))
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The proxy holds each request (not each chunk) for the delay in the file, and passes
    /// bytes through unchanged both ways.
    #[test]
    fn the_proxy_holds_each_request_for_the_delay() {
        // An echo server that answers each line with the line.
        let upstream = TcpListener::bind("127.0.0.1:0").expect("bind");
        let up_addr = upstream.local_addr().expect("addr").to_string();
        std::thread::spawn(move || {
            for conn in upstream.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut w = conn.try_clone().expect("clone");
                    let mut r = std::io::BufReader::new(conn);
                    let mut line = String::new();
                    while std::io::BufRead::read_line(&mut r, &mut line).is_ok_and(|n| n > 0) {
                        let _ = w.write_all(line.as_bytes());
                        line.clear();
                    }
                });
            }
        });
        let dir = tempfile::tempdir().expect("tmp");
        let delay_file = dir.path().join("delay");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let listen = format!("127.0.0.1:{port}");
        {
            let (listen, delay_file) = (listen.clone(), delay_file.clone());
            std::thread::spawn(move || proxy(&listen, &up_addr, &delay_file));
        }
        let mut conn = loop {
            if let Ok(c) = TcpStream::connect(&listen) {
                break c;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut ask = |text: &str| {
            let t0 = Instant::now();
            conn.write_all(text.as_bytes()).expect("send");
            let mut got = vec![0u8; text.len()];
            conn.read_exact(&mut got).expect("answer");
            assert_eq!(String::from_utf8_lossy(&got), text);
            t0.elapsed()
        };
        assert!(ask("fast\n") < Duration::from_millis(1_500));
        std::fs::write(&delay_file, "1500").expect("delay");
        let slow = ask("slow\n");
        assert!(slow >= Duration::from_millis(1_500), "{slow:?}");
        std::fs::write(&delay_file, "0").expect("heal");
        assert!(ask("fast again\n") < Duration::from_millis(1_500));
        assert_eq!(delay_of(&dir.path().join("absent")), Duration::ZERO);
    }
}
