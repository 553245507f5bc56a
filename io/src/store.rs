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
    #[error("{uri}: {}", plain(source))]
    Store {
        /// The URI.
        uri: String,
        /// The store's error.
        source: object_store::Error,
    },
    /// The object is no longer the size it had when the workload was planned: it was
    /// truncated, appended to or replaced since. The shards were cut from the old size, so
    /// reading on would lose records or split them; another attempt would see the same.
    #[error(
        "input {uri} changed since it was planned: {planned} bytes planned, {found} found; \
         resubmit the workload"
    )]
    Changed {
        /// The URI.
        uri: String,
        /// The size the shards were cut from.
        planned: u64,
        /// The size the object has now.
        found: u64,
    },
    /// The object is not the one the workload was planned with: its version (the ETag; for a
    /// local file its inode, modification time and size) is not the one planned, whatever its
    /// size. It was replaced or rewritten since; another attempt would see the same.
    #[error(
        "input {uri} changed since it was planned: it was replaced or rewritten (planned version \
         {planned}); resubmit the workload"
    )]
    Replaced {
        /// The URI.
        uri: String,
        /// The version the shards were cut from.
        planned: String,
    },
    /// A shard range that does not lie within the object's planned size (`start <= end <=
    /// size`), which no plan holds.
    #[error("{uri}: shard range {start}..{end} does not lie within the planned {size} bytes")]
    BadRange {
        /// The URI.
        uri: String,
        /// The range's first byte.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// The planned size.
        size: u64,
    },
}

impl ObjectError {
    /// Whether trying again could succeed (network, throttling), unlike a missing object.
    pub fn is_transient(&self) -> bool {
        use object_store::Error as E;
        match self {
            Self::Store { source, .. } => match source {
                // Retrying cannot make these go away: a permission, a credential, a path
                // that is not one, a store that cannot do it.
                E::PermissionDenied { .. }
                | E::Unauthenticated { .. }
                | E::InvalidPath { .. }
                | E::NotSupported { .. }
                | E::NotImplemented
                | E::UnknownConfigurationKey { .. } => false,
                E::Generic { source, .. } => {
                    !permanent_io(source.as_ref()) && !refused(source.as_ref())
                }
                _ => true,
            },
            _ => false,
        }
    }
}

impl ObjectError {
    /// A local file system error at `uri`, as the object store would have reported it (so
    /// that [`ObjectError::is_transient`] classifies it the same way).
    pub fn local(uri: &str, e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::NotFound {
            return Self::NotFound {
                uri: uri.to_string(),
            };
        }
        Self::Store {
            uri: uri.to_string(),
            source: object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(e),
            },
        }
    }
}

/// A store error as a person reads it: without the library's own prefix (`Generic
/// LocalFileSystem error: `).
fn plain(e: &object_store::Error) -> String {
    match e {
        object_store::Error::Generic { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// Whether a server refused the request for who made it (a listing answered 403 or 401
/// reaches us as a generic error, with the status only in its text).
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if [
            "403 Forbidden",
            "401 Unauthorized",
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
        ]
        .iter()
        .any(|m| text.contains(m))
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Whether an error's chain holds a local I/O error that retrying cannot cure (no
/// permission, a file where a folder should be, a read-only file system).
fn permanent_io(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind as K;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && (matches!(
                io.kind(),
                K::PermissionDenied
                    | K::NotADirectory
                    | K::IsADirectory
                    | K::ReadOnlyFilesystem
                    | K::InvalidInput
                    | K::StorageFull
                    | K::QuotaExceeded
            ) || matches!(io.raw_os_error(), Some(20 | 21 | 13 | 30)))
        {
            return true;
        }
        cur = err.source();
    }
    // The local file system reports these as text only.
    let text = e.to_string();
    text.contains("Unable to create dir")
        || text.contains("Not a directory")
        || text.contains("Permission denied")
        || text.contains("Read-only file system")
}

/// An object (or directory prefix) named by a URI.
#[derive(Clone, Debug)]
pub struct Location {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) path: Path,
    pub(crate) uri: String,
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

    pub(crate) fn map_err(&self, e: object_store::Error) -> ObjectError {
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

    /// The object's size and version (its ETag; `None` where the store names none).
    pub async fn facts(&self) -> Result<(u64, Option<String>), ObjectError> {
        self.store
            .head(&self.path)
            .await
            .map(|m| (m.size, m.e_tag))
            .map_err(|e| self.map_err(e))
    }

    /// Bytes `[start, end)` of the object as it was at `version` (`If-Match`): a replaced or
    /// rewritten object fails with [`ObjectError::Replaced`]. No version: any object.
    async fn get_range_at(
        &self,
        start: u64,
        end: u64,
        version: Option<&str>,
    ) -> Result<Bytes, ObjectError> {
        let Some(planned) = version else {
            return self.get_range(start, end).await;
        };
        if start >= end {
            return Ok(Bytes::new());
        }
        let options = object_store::GetOptions {
            if_match: Some(planned.to_string()),
            range: Some(object_store::GetRange::Bounded(start..end)),
            ..Default::default()
        };
        let replaced = || ObjectError::Replaced {
            uri: self.uri.clone(),
            planned: planned.to_string(),
        };
        match self.store.get_opts(&self.path, options).await {
            Ok(got) => got.bytes().await.map_err(|e| match e {
                object_store::Error::Precondition { .. } => replaced(),
                e => self.map_err(e),
            }),
            Err(object_store::Error::Precondition { .. }) => Err(replaced()),
            Err(e) => Err(self.map_err(e)),
        }
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

    fn changed(&self, planned: u64, found: u64) -> ObjectError {
        ObjectError::Changed {
            uri: self.uri.clone(),
            planned,
            found,
        }
    }

    /// Exactly bytes `[from, to)` of an object planned at `size` bytes (`to <= size`). A read
    /// that comes back short, or that the store refuses while the object's size is not
    /// `size` any more, means the object shrank since planning: [`ObjectError::Changed`].
    /// A read that reaches the planned end asks for one byte more, so that an object that
    /// grew is noticed too, at no extra request.
    async fn get_planned(
        &self,
        from: u64,
        to: u64,
        size: u64,
        version: Option<&str>,
    ) -> Result<Bytes, ObjectError> {
        if from >= to {
            return Ok(Bytes::new());
        }
        let probe = if to == size { to + 1 } else { to };
        let got = match self.get_range_at(from, probe, version).await {
            Ok(got) => got,
            // A range that starts past the end is refused outright (local files, HTTP 416,
            // S3 InvalidRange): say so when that is because the object shrank.
            Err(e @ ObjectError::Store { .. }) => {
                return Err(match self.size().await {
                    Ok(found) if found != size => self.changed(size, found),
                    _ => e,
                });
            }
            Err(e) => return Err(e),
        };
        if got.len() as u64 == to - from {
            return Ok(got);
        }
        // Shorter: the object ends before the planned size; longer: it goes on past it.
        let seen = from + got.len() as u64;
        let found = match self.size().await {
            Ok(found) if found != size => found,
            _ => seen,
        };
        Err(self.changed(size, found))
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
///
/// Inside [`crate::Credentials::scope`], S3 and http(s) stores use the scope's credentials
/// instead (the endpoint and region still come from the environment, the region from the
/// credentials when they name one), and are kept in the scope, never shared outside it.
fn store_for(scheme: ObjectStoreScheme, url: &Url) -> object_store::Result<Arc<dyn ObjectStore>> {
    let base = format!("{}://{}", url.scheme(), url.authority());
    let scope = crate::access::current();
    let credentials = scope.as_ref().map(|s| &s.credentials);
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
                let builder = match credentials {
                    None => AmazonS3Builder::from_env(),
                    Some(c) => s3_with(c),
                };
                Arc::new(builder.with_url(at).build()?)
            }
            ObjectStoreScheme::Http => {
                let mut builder = HttpBuilder::new().with_url(&base).with_config(
                    ClientConfigKey::AllowHttp,
                    (url.scheme() == "http").to_string(),
                );
                if let Some(token) = credentials.and_then(|c| c.bearer_token.as_deref()) {
                    let mut value = http::HeaderValue::from_str(&format!("Bearer {token}"))
                        .map_err(|_| object_store::Error::Generic {
                            store: "HTTP",
                            source: "the bearer token is not a valid header value".into(),
                        })?;
                    value.set_sensitive(true);
                    let mut headers = http::HeaderMap::new();
                    headers.insert(http::header::AUTHORIZATION, value);
                    builder = builder.with_client_options(
                        object_store::ClientOptions::new()
                            .with_allow_http(url.scheme() == "http")
                            .with_default_headers(headers),
                    );
                }
                Arc::new(builder.build()?)
            }
            _ => Arc::from(object_store::parse_url(url)?.0),
        })
    };
    // One store per bucket (`s3://`) or server (`http(s)://`); the rest are cheap to make.
    let shared = matches!(scheme, ObjectStoreScheme::Http)
        || (matches!(scheme, ObjectStoreScheme::AmazonS3) && url.scheme().starts_with("s3"));
    if let Some(scope) = &scope {
        if matches!(scheme, ObjectStoreScheme::Local) {
            return build();
        }
        if let Some(store) = scope
            .stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&base)
        {
            return Ok(store.clone());
        }
        let store = build()?;
        if shared {
            let mut stores = scope.stores.lock().unwrap_or_else(|e| e.into_inner());
            return Ok(stores.entry(base).or_insert(store).clone());
        }
        return Ok(store);
    }
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

/// An S3 builder configured from the environment as [`AmazonS3Builder::from_env`] would be,
/// except for whose keys it uses: `c`'s, never the process's (nor its session token, nor a
/// role it could assume).
fn s3_with(c: &crate::Credentials) -> AmazonS3Builder {
    use object_store::aws::AmazonS3ConfigKey as K;
    let mut builder = AmazonS3Builder::new();
    for (name, value) in std::env::vars() {
        if !name.starts_with("AWS_") {
            continue;
        }
        let Ok(key) = name.to_ascii_lowercase().parse::<K>() else {
            continue;
        };
        let credential = matches!(
            key,
            K::AccessKeyId
                | K::SecretAccessKey
                | K::Token
                | K::ContainerCredentialsRelativeUri
                | K::ContainerCredentialsFullUri
                | K::ContainerAuthorizationTokenFile
        );
        if !credential {
            builder = builder.with_config(key, value);
        }
    }
    builder = builder
        .with_access_key_id(&c.access_key_id)
        .with_secret_access_key(&c.secret_access_key);
    if let Some(token) = &c.session_token {
        builder = builder.with_token(token);
    }
    if let Some(region) = &c.region {
        builder = builder.with_region(region);
    }
    builder
}

/// Reads the records of shard `[start, end)` of an object of `size` bytes, aligned to record
/// boundaries (see [`crate::shard`]). Returns the object offset of the first byte and the
/// bytes. Reads the range plus as much as is needed to reach the next newline.
///
/// `size` is the size the workload was planned with. An object that is shorter now fails
/// with [`ObjectError::Changed`] as soon as a read runs short of it. One that grew fails the
/// same way in every shard whose reads reach the planned end (the last shard's always do):
/// they ask for one byte more, at no extra request. Records past the planned size belong to
/// no shard, so failing there fails the workload instead of leaving them out unsaid. A shard
/// whose reads stay inside the object cannot see that it changed without an extra request
/// (the last shard speaks for the workload). With the `version` (ETag) the object had when it
/// was sized, every read asks for that version, so an object replaced or rewritten since —
/// even by one of exactly the same size — fails every read with [`ObjectError::Replaced`].
/// `start <= end <= size` must hold ([`ObjectError::BadRange`] otherwise).
pub async fn read_aligned(
    loc: &Location,
    start: u64,
    end: u64,
    size: u64,
    version: Option<&str>,
) -> Result<(u64, Bytes), ObjectError> {
    use crate::shard::{aligned_begin, aligned_end};
    // One read covers the range and a first look past its end; records are far shorter than
    // this, so the loop below rarely runs more than once.
    const STEP: u64 = 64 * 1024;
    if start > end || end > size {
        return Err(ObjectError::BadRange {
            uri: loc.uri.clone(),
            start,
            end,
            size,
        });
    }
    // Each read returns exactly what it asks for (or fails), so `buf` always reaches `end`.
    let mut buf = loc
        .get_planned(start, (end + STEP).min(size), size, version)
        .await?
        .to_vec();
    // Only bytes not yet searched are searched: a long line costs its length, not its square.
    let mut unsearched = (end - start) as usize;
    loop {
        let have = start + buf.len() as u64;
        if have >= size || buf[unsearched..].contains(&b'\n') {
            break;
        }
        unsearched = buf.len();
        let more = loc
            .get_planned(have, (have + STEP).min(size), size, version)
            .await?;
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

    #[tokio::test]
    async fn an_output_that_cannot_be_written_is_not_worth_retrying() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("a-file");
        std::fs::write(&file, "x").expect("write");
        // A file where a folder should be.
        let under_file =
            Location::parse(&format!("file://{}/part-00000.jsonl", file.display())).expect("uri");
        let err = under_file
            .put(bytes::Bytes::from_static(b"{}\n"))
            .await
            .expect_err("not a folder");
        assert!(!err.is_transient(), "{err}");
        // /proc refuses writes.
        let proc = Location::parse("file:///proc/infermesh-test/part-00000.jsonl").expect("uri");
        let err = proc
            .put(bytes::Bytes::from_static(b"{}\n"))
            .await
            .expect_err("proc");
        assert!(!err.is_transient(), "{err}");
    }
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

    /// Writes `data` to a file; returns its location.
    fn file(dir: &tempfile::TempDir, name: &str, data: &[u8]) -> Location {
        let path = dir.path().join(name);
        std::fs::write(&path, data).expect("write");
        Location::parse(&format!("file://{}", path.display())).expect("uri")
    }

    fn changed(loc: &Location, planned: usize, found: usize) -> String {
        format!(
            "input {} changed since it was planned: {planned} bytes planned, {found} found; \
             resubmit the workload",
            loc.uri()
        )
    }

    /// An input truncated or appended to after it was planned fails the read that notices,
    /// naming the URI and both sizes, and is not transient; it never panics.
    #[tokio::test]
    async fn an_input_that_changed_since_planning_fails_the_read() {
        let dir = tempfile::tempdir().expect("tmp");
        // Longer than one read step, so the first shard's read stops well before the end.
        let data: Vec<u8> = (0..4000)
            .flat_map(|i| format!("{{\"i\":{i},\"text\":\"abcdefgh\"}}\n").into_bytes())
            .collect();
        let planned = data.len();
        let last = (planned / 2) as u64..planned as u64;
        // Cut inside the last shard (its first read comes back short), before it (the store
        // refuses the range), and grown (the read of the planned end finds a byte more).
        for found in [planned - 5, planned / 4, planned + 30] {
            let mut now = data.clone();
            now.resize(found, b'x');
            let loc = file(&dir, &format!("in-{found}.jsonl"), &now);
            let err = read_aligned(&loc, last.start, last.end, planned as u64, None)
                .await
                .expect_err("the input changed");
            assert_eq!(err.to_string(), changed(&loc, planned, found));
            assert!(!err.is_transient(), "{err}");
        }

        // A follow-up read (past a record longer than one read step) that runs short.
        let mut long = b"{\"i\":0,\"text\":\"".to_vec();
        long.extend(std::iter::repeat_n(b'a', 200_000));
        long.extend_from_slice(b"\"}\n{\"i\":1}\n");
        let loc = file(&dir, "long.jsonl", &long[..150_000]);
        let err = read_aligned(&loc, 0, 10, long.len() as u64, None)
            .await
            .expect_err("the input changed");
        assert_eq!(err.to_string(), changed(&loc, long.len(), 150_000));

        // A shard whose reads stay well inside a grown object cannot tell (the shard at the
        // end does) and reads its records as planned.
        let mut grown = data.clone();
        grown.extend_from_slice(b"{\"i\":4000}\n");
        let loc = file(&dir, "grown.jsonl", &grown);
        let (begin, bytes) = read_aligned(&loc, 0, 1000, planned as u64, None)
            .await
            .expect("read");
        let got: Vec<Vec<u8>> = records(begin, &bytes).map(|r| r.text.to_vec()).collect();
        assert_eq!(got, lines(&data, 0, 1000));
    }

    /// With the version it was sized at, a read notices an input replaced by one of exactly
    /// the same size, or rewritten in place, which no size check can see; reads of the
    /// version planned go on as before.
    #[tokio::test]
    async fn a_pinned_read_notices_an_input_replaced_by_one_of_the_same_size() {
        let dir = tempfile::tempdir().expect("tmp");
        let data = b"{\"i\":1}\n{\"i\":2}\n{\"i\":3}\n".to_vec();
        let loc = file(&dir, "in.jsonl", &data);
        let (size, version) = loc.facts().await.expect("facts");
        assert_eq!(size, data.len() as u64);
        let version = version.expect("a local file has an ETag");
        let (_, bytes) = read_aligned(&loc, 0, size, size, Some(&version))
            .await
            .expect("the planned version reads");
        assert_eq!(&bytes[..], &data[..]);

        // Replaced (a new file renamed over it), same size, other records.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let other = b"{\"i\":7}\n{\"i\":8}\n{\"i\":9}\n".to_vec();
        let next = dir.path().join("next.jsonl");
        std::fs::write(&next, &other).expect("write");
        std::fs::rename(&next, dir.path().join("in.jsonl")).expect("rename");
        let err = read_aligned(&loc, 0, size, size, Some(&version))
            .await
            .expect_err("replaced");
        assert!(matches!(err, ObjectError::Replaced { .. }), "{err}");
        assert!(
            err.to_string().contains("changed since it was planned"),
            "{err}"
        );
        assert!(!err.is_transient());
        // Without a version the swap goes unseen: that is what the pin is for.
        let (_, bytes) = read_aligned(&loc, 0, size, size, None).await.expect("read");
        assert_eq!(&bytes[..], &other[..]);

        // Rewritten in place, same size.
        let (_, pinned) = loc.facts().await.expect("facts");
        let pinned = pinned.expect("etag");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.path().join("in.jsonl"), &data).expect("rewrite");
        let err = read_aligned(&loc, 3, size, size, Some(&pinned))
            .await
            .expect_err("rewritten");
        assert!(matches!(err, ObjectError::Replaced { .. }), "{err}");
    }

    /// A range outside the planned size is refused, not a panic.
    #[tokio::test]
    async fn a_range_outside_the_planned_size_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let loc = file(&dir, "in.jsonl", b"{}\n{}\n");
        for (start, end) in [(7, 9), (4, 2), (0, 7)] {
            let err = read_aligned(&loc, start, end, 6, None)
                .await
                .expect_err("bad range");
            assert!(
                err.to_string()
                    .contains(&format!("shard range {start}..{end} does not lie within")),
                "{err}"
            );
            assert!(!err.is_transient(), "{err}");
        }
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
            let (begin, bytes) = rt.block_on(read_aligned(&loc, start, end, size, None)).expect("read");
            let got: Vec<Vec<u8>> = records(begin, &bytes).map(|r| r.text.to_vec()).collect();
            prop_assert_eq!(got, lines(&data, start, end));
        }
    }
}
