//! Object access through `object_store`: one code path for `file://`, `s3://` and `http(s)://`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::http::HttpBuilder;
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreScheme, PutPayload, path::Path};
use url::Url;

/// Why an object could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The URI does not parse or names a scheme this build cannot reach.
    #[error("`{uri}` is not a usable object URI: {reason}")]
    BadUri {
        /// The URI as given.
        uri: String,
        /// Why.
        reason: String,
    },
    /// No object at that URI.
    #[error("{uri} does not exist")]
    NotFound {
        /// The URI.
        uri: String,
    },
    /// Anything else the store reported (permissions, network).
    #[error("{uri}: {source}")]
    Store {
        /// The URI.
        uri: String,
        /// The store's error.
        source: object_store::Error,
    },
}

impl ObjectError {
    /// Whether trying again could succeed (network, throttling), unlike a missing object.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Store { .. })
    }
}

/// An object (or directory prefix) named by a URI.
#[derive(Clone, Debug)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    path: Path,
    uri: String,
}

impl Location {
    /// Resolves `uri`. Plain absolute paths are taken as `file://` URIs.
    pub fn parse(uri: &str) -> Result<Self, ObjectError> {
        let bad = |reason: String| ObjectError::BadUri {
            uri: uri.to_string(),
            reason,
        };
        let url = if uri.starts_with('/') {
            Url::from_file_path(uri).map_err(|()| bad("not an absolute path".into()))?
        } else {
            Url::parse(uri).map_err(|e| bad(e.to_string()))?
        };
        let (scheme, path) = ObjectStoreScheme::parse(&url).map_err(|e| bad(e.to_string()))?;
        let store = store_for(scheme, &url).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            store,
            path,
            uri: url.to_string(),
        })
    }

    /// The URI, normalised.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// A child of this location taken as a directory (`.../out/` + `part-00001.jsonl`).
    pub fn child(&self, name: &str) -> Self {
        let base = self.uri.trim_end_matches('/');
        Self {
            store: self.store.clone(),
            path: self.path.child(name),
            uri: format!("{base}/{name}"),
        }
    }

    fn map_err(&self, e: object_store::Error) -> ObjectError {
        match e {
            object_store::Error::NotFound { .. } => ObjectError::NotFound {
                uri: self.uri.clone(),
            },
            source => ObjectError::Store {
                uri: self.uri.clone(),
                source,
            },
        }
    }

    /// The object's size in bytes.
    pub async fn size(&self) -> Result<u64, ObjectError> {
        self.store
            .head(&self.path)
            .await
            .map(|m| m.size)
            .map_err(|e| self.map_err(e))
    }

    /// Bytes `[start, end)` of the object (`end` clamped by the store to the object's size).
    pub async fn get_range(&self, start: u64, end: u64) -> Result<Bytes, ObjectError> {
        if start >= end {
            return Ok(Bytes::new());
        }
        self.store
            .get_range(&self.path, start..end)
            .await
            .map_err(|e| self.map_err(e))
    }

    /// The whole object.
    pub async fn get(&self) -> Result<Bytes, ObjectError> {
        let got = self
            .store
            .get(&self.path)
            .await
            .map_err(|e| self.map_err(e))?;
        got.bytes().await.map_err(|e| self.map_err(e))
    }

    /// Writes the whole object in one put, which every store makes atomic (the local file
    /// system stages a temporary file and renames it), so readers never see half a part and a
    /// retried shard overwrites rather than duplicates.
    pub async fn put(&self, bytes: Bytes) -> Result<(), ObjectError> {
        self.store
            .put(&self.path, PutPayload::from_bytes(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.map_err(e))
    }
}

/// The store behind `url`, built once per bucket or server and shared, so that every
/// [`Location`] under it reuses one connection pool (and, for S3, one credential cache).
///
/// - `s3://bucket/key`: [`AmazonS3Builder::from_env`], so the standard variables apply:
///   `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (`AWS_SESSION_TOKEN`), `AWS_REGION` (else
///   `AWS_DEFAULT_REGION`, else `us-east-1`), `AWS_ENDPOINT_URL` or `AWS_ENDPOINT` for an
///   S3-compatible server such as MinIO (path-style requests unless
///   `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`), `AWS_ALLOW_HTTP=true` for a plain-http endpoint;
///   without keys, the instance, container or web-identity credentials of the machine.
/// - `http(s)://host/path`: a plain HTTP server (GET, HEAD and `Range` reads; PUT where the
///   server takes it, as WebDAV does); `http://` is allowed because the URI asks for it.
/// - `file://`: the local file system.
fn store_for(scheme: ObjectStoreScheme, url: &Url) -> object_store::Result<Arc<dyn ObjectStore>> {
    let base = format!("{}://{}", url.scheme(), url.authority());
    let build = || -> object_store::Result<Arc<dyn ObjectStore>> {
        Ok(match scheme {
            // `s3://bucket/...`: the bucket is the host. An `https://...amazonaws.com` URL
            // (virtual-hosted or path-style) is taken whole, for the builder to find the bucket.
            ObjectStoreScheme::AmazonS3 => {
                let at = if url.scheme().starts_with("s3") {
                    &base
                } else {
                    url.as_str()
                };
                Arc::new(AmazonS3Builder::from_env().with_url(at).build()?)
            }
            ObjectStoreScheme::Http => Arc::new(
                HttpBuilder::new()
                    .with_url(&base)
                    .with_config(
                        ClientConfigKey::AllowHttp,
                        (url.scheme() == "http").to_string(),
                    )
                    .build()?,
            ),
            _ => Arc::from(object_store::parse_url(url)?.0),
        })
    };
    // One store per bucket (`s3://`) or server (`http(s)://`); the rest are cheap to make.
    let shared = matches!(scheme, ObjectStoreScheme::Http)
        || (matches!(scheme, ObjectStoreScheme::AmazonS3) && url.scheme().starts_with("s3"));
    if !shared {
        return build();
    }
    static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let stores = STORES.get_or_init(Default::default);
    if let Some(store) = stores.lock().unwrap_or_else(|e| e.into_inner()).get(&base) {
        return Ok(store.clone());
    }
    let store = build()?;
    let mut stores = stores.lock().unwrap_or_else(|e| e.into_inner());
    Ok(stores.entry(base).or_insert(store).clone())
}

/// Reads the records of shard `[start, end)` of an object of `size` bytes, aligned to record
/// boundaries (see [`crate::shard`]). Returns the object offset of the first byte and the
/// bytes. Reads the range plus as much as is needed to reach the next newline.
pub async fn read_aligned(
    loc: &Location,
    start: u64,
    end: u64,
    size: u64,
) -> Result<(u64, Bytes), ObjectError> {
    use crate::shard::{aligned_begin, aligned_end};
    // One read covers the range and a first look past its end; records are far shorter than
    // this, so the loop below rarely runs more than once.
    const STEP: u64 = 64 * 1024;
    let end = end.clamp(start, size);
    let mut buf = loc.get_range(start, (end + STEP).min(size)).await?.to_vec();
    loop {
        let have = start + buf.len() as u64;
        if have >= size || buf[(end - start) as usize..].contains(&b'\n') {
            break;
        }
        let more = loc.get_range(have, (have + STEP).min(size)).await?;
        buf.extend_from_slice(&more);
    }
    let have = start + buf.len() as u64;
    let Some(begin) = aligned_begin(start, &buf) else {
        return Ok((size, Bytes::new()));
    };
    let finish = aligned_end(end, size, &buf[(end - start) as usize..]).unwrap_or(have);
    if begin >= finish {
        return Ok((begin, Bytes::new()));
    }
    Ok((
        begin,
        Bytes::from(buf).slice((begin - start) as usize..(finish - start) as usize),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::{align_in_memory, records};
    use proptest::prelude::*;

    fn lines(data: &[u8], start: u64, end: u64) -> Vec<Vec<u8>> {
        align_in_memory(data, start, end)
            .map(|a| {
                records(a.begin, &data[a.begin as usize..a.end as usize])
                    .map(|r| r.text.to_vec())
                    .collect()
            })
            .unwrap_or_default()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The agent's ranged reads through object_store align exactly like the in-memory rule,
        /// including records longer than one read step.
        #[test]
        fn ranged_reads_align_like_the_rule(
            lens in prop::collection::vec(0usize..150_000, 1..6),
            cut in 0.0f64..1.0,
            width in 1u64..200_000,
        ) {
            let mut data = Vec::new();
            for (i, len) in lens.iter().enumerate() {
                data.extend_from_slice(format!("{i}:").as_bytes());
                data.extend(std::iter::repeat_n(b'x', *len));
                data.push(b'\n');
            }
            let dir = tempfile::tempdir().expect("tmp");
            let path = dir.path().join("in.jsonl");
            std::fs::write(&path, &data).expect("write");
            let size = data.len() as u64;
            let start = (cut * size as f64) as u64;
            let end = (start + width).min(size);
            let loc = Location::parse(&format!("file://{}", path.display())).expect("uri");
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
            let (begin, bytes) = rt.block_on(read_aligned(&loc, start, end, size)).expect("read");
            let got: Vec<Vec<u8>> = records(begin, &bytes).map(|r| r.text.to_vec()).collect();
            prop_assert_eq!(got, lines(&data, start, end));
        }
    }
}
