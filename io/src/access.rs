//! Who may use which locations, and with whose credentials.
//!
//! - A [`Grant`] is the URI prefixes a tenant's workloads may read (models, tokenizers,
//!   inputs) and write (outputs) under. [`Grant::check`] is the one test both the operator
//!   (at admission, before any object is touched) and the agents (on every Assign) apply:
//!   by whole path segments, after refusing dot segments, and for `file://` after resolving
//!   symbolic links, so that neither `..` nor a link can lead out of a prefix.
//! - [`Credentials`] are one tenant's object-store keys. [`Credentials::scope`] runs a future
//!   with them: every [`crate::Location`] parsed inside it talks to its store with those keys
//!   (and a store made for them is never shared with code outside the scope). They print as
//!   `<redacted>` and are never written anywhere.

use std::collections::HashMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use object_store::ObjectStore;

/// What a location is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Models, tokenizers, inputs.
    Read,
    /// Outputs.
    Write,
}

impl Use {
    fn word(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }
}

/// The URI prefixes one tenant may read from and write to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// Prefixes of what it may read.
    pub read: Vec<String>,
    /// Prefixes of what it may write.
    pub write: Vec<String>,
}

/// A URI taken apart for comparison: scheme and authority lower-cased, the path as the store
/// sees it (percent-decoded, without leading or trailing `/`).
#[derive(Debug, PartialEq, Eq)]
struct Parts {
    scheme: String,
    authority: String,
    path: Vec<String>,
}

/// Refuses what could name something other than it seems: a dot segment (`.`, `..`, also
/// percent-encoded), a backslash, a NUL, an encoded `/`. Plain absolute paths are `file://`
/// URIs.
pub fn plain(uri: &str) -> Result<(), String> {
    parts(uri).map(|_| ())
}

fn parts(uri: &str) -> Result<Parts, String> {
    let raw = if uri.starts_with('/') {
        format!("file://{uri}")
    } else {
        uri.to_string()
    };
    let Some((scheme, rest)) = raw.split_once("://") else {
        return Err(format!("{uri} is not a URI (scheme://...)"));
    };
    if raw.contains(['\\', '\0']) {
        return Err(format!(
            "{uri}: a backslash or NUL is not allowed in a location"
        ));
    }
    // A URL parser drops tabs and line breaks and trims the ends before it resolves `..`:
    // what is checked here must be what is addressed.
    if raw.chars().any(|c| c.is_control()) || raw.trim() != raw {
        return Err(format!(
            "{uri}: a control character, or a space at either end, is not allowed in a location"
        ));
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    // The object's path ends where a query or fragment starts.
    let path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
    let mut segments = Vec::new();
    for seg in path.split('/') {
        let decoded = percent_decode(seg)
            .ok_or_else(|| format!("{uri}: the path has a bad percent-encoding"))?;
        if decoded == "." || decoded == ".." {
            return Err(format!(
                "{uri}: `{decoded}` is not allowed in a location's path"
            ));
        }
        if decoded.contains(['/', '\\', '\0']) {
            return Err(format!(
                "{uri}: an encoded `/`, `\\` or NUL is not allowed in a location's path"
            ));
        }
        if !decoded.is_empty() {
            segments.push(decoded);
        }
    }
    let scheme = scheme.to_ascii_lowercase();
    // Host names of http(s) and file URLs are case-insensitive; an `s3://` bucket is not
    // (the URL keeps its case, and so does the store).
    let authority = if matches!(scheme.as_str(), "http" | "https" | "file") {
        authority.to_ascii_lowercase()
    } else {
        authority.to_string()
    };
    // The same path as the URL parser sees it (what the store addresses), or refused.
    let url = url::Url::parse(&raw).map_err(|e| format!("{uri}: {e}"))?;
    let parsed: Vec<String> = url
        .path_segments()
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode(s).unwrap_or_default())
        .collect();
    if parsed != segments {
        return Err(format!(
            "{uri}: the location does not read the same to a URL parser ({})",
            url.path()
        ));
    }
    Ok(Parts {
        scheme,
        authority,
        path: segments,
    })
}

fn percent_decode(seg: &str) -> Option<String> {
    let bytes = seg.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The part of `uri` a glob cannot leave: up to the last `/` before its first pattern
/// character (the whole URI when it has none).
pub fn literal_dir(uri: &str) -> &str {
    match uri.find(['*', '?', '[', '{']) {
        None => uri,
        Some(cut) => &uri[..uri[..cut].rfind('/').map_or(0, |i| i + 1)],
    }
}

/// Whether `uri` is `prefix` or below it, by whole path segments (`s3://b/team-a` covers
/// `s3://b/team-a/x` and `s3://b/team-a`, never `s3://b/team-ab`). Neither may have dot
/// segments ([`plain`]).
pub fn within(uri: &str, prefix: &str) -> bool {
    let (Ok(u), Ok(p)) = (parts(uri), parts(prefix)) else {
        return false;
    };
    u.scheme == p.scheme && u.authority == p.authority && u.path.starts_with(&p.path)
}

/// The local path a `file://` URI (or a plain absolute path) names; `None` for any other
/// scheme, or a URI that does not parse.
pub fn local_path(uri: &str) -> Option<PathBuf> {
    if uri.starts_with('/') {
        return Some(PathBuf::from(uri));
    }
    let url = url::Url::parse(uri).ok()?;
    if url.scheme() != "file" {
        return None;
    }
    url.to_file_path().ok()
}

/// `path` with its symbolic links resolved as far as it exists (the rest, which does not
/// exist yet, appended as written: it holds no dot segment, [`plain`] saw to that).
fn resolved(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            let mut out = real;
            for c in rest.iter().rev() {
                out.push(c);
            }
            return out;
        }
        match (
            existing.file_name().map(|n| n.to_owned()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Whether the local `path` stays under `prefix` once links are resolved in both.
fn local_within(path: &Path, prefix: &Path) -> bool {
    let (p, q) = (resolved(path), resolved(prefix));
    p.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect::<Vec<_>>()
        .starts_with(&q.components().collect::<Vec<_>>())
}

impl Grant {
    /// Checks that `field`'s `uri` may be used for `what`: it is plain ([`plain`]), lies
    /// (by whole segments; a glob by its [`literal_dir`]) under one of the prefixes, and for
    /// `file://` still does once symbolic links are resolved. The error names the field, the
    /// URI and the prefixes.
    pub fn check(&self, field: &str, uri: &str, what: Use) -> Result<(), String> {
        plain(uri).map_err(|e| format!("{field}: {e}"))?;
        if uri.contains(['?', '#']) {
            return Err(format!(
                "{field}: {uri}: a query or fragment is not allowed in a tenant's location"
            ));
        }
        // `https://bucket.s3.region.amazonaws.com/key` and the like name the bucket in the
        // host, and the store reads the path differently from the URL: only `s3://bucket/`.
        if let Ok(url) = url::Url::parse(uri)
            && matches!(url.scheme(), "http" | "https")
            && matches!(
                object_store::ObjectStoreScheme::parse(&url),
                Ok((object_store::ObjectStoreScheme::AmazonS3, _))
            )
        {
            return Err(format!(
                "{field}: {uri}: name an S3 bucket as s3://bucket/... in a tenant's location"
            ));
        }
        let prefixes = match what {
            Use::Read => &self.read,
            Use::Write => &self.write,
        };
        let scope = literal_dir(uri);
        let under = prefixes.iter().find(|p| within(scope, p));
        let Some(prefix) = under else {
            return Err(if prefixes.is_empty() {
                format!(
                    "{field}: {uri} is outside what this namespace may {}: it may {} nothing",
                    what.word(),
                    what.word()
                )
            } else {
                format!(
                    "{field}: {uri} is outside what this namespace may {} ({})",
                    what.word(),
                    prefixes.join(", ")
                )
            });
        };
        if let (Some(path), Some(base)) = (local_path(scope), local_path(prefix))
            && !local_within(&path, &base)
        {
            return Err(format!(
                "{field}: {uri} leads outside {prefix} through a symbolic link"
            ));
        }
        Ok(())
    }
}

/// One tenant's object-store credentials: S3 keys, or an http(s) bearer token. The endpoint
/// and region come from where the process runs (`AWS_ENDPOINT_URL`, `AWS_REGION`) unless the
/// region is given here; an endpoint never comes from a tenant.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
    /// `AWS_SESSION_TOKEN`, for temporary keys.
    pub session_token: Option<String>,
    /// `AWS_REGION` (or `AWS_DEFAULT_REGION`).
    pub region: Option<String>,
    /// `token`: sent as `Authorization: Bearer` to http(s) stores.
    pub bearer_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// The keys a Secret may hold (others are ignored).
pub const SECRET_KEYS: [&str; 6] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "token",
];

impl Credentials {
    /// From a Secret's data. Needs an access key id with its secret, or a `token` (or both).
    /// The error names keys, never values.
    pub fn from_secret<'a>(get: impl Fn(&str) -> Option<&'a [u8]>) -> Result<Self, String> {
        let text = |key: &str| -> Result<Option<String>, String> {
            match get(key) {
                None => Ok(None),
                Some(v) => {
                    let s = std::str::from_utf8(v)
                        .map_err(|_| format!("key {key} is not UTF-8 text"))?
                        .trim();
                    Ok((!s.is_empty()).then(|| s.to_string()))
                }
            }
        };
        let id = text("AWS_ACCESS_KEY_ID")?;
        let secret = text("AWS_SECRET_ACCESS_KEY")?;
        let token = text("token")?;
        let keys = match (id, secret) {
            (Some(id), Some(secret)) => Some((id, secret)),
            (None, None) => None,
            (Some(_), None) => {
                return Err("AWS_ACCESS_KEY_ID without AWS_SECRET_ACCESS_KEY".into());
            }
            (None, Some(_)) => {
                return Err("AWS_SECRET_ACCESS_KEY without AWS_ACCESS_KEY_ID".into());
            }
        };
        if keys.is_none() && token.is_none() {
            return Err(
                "neither AWS_ACCESS_KEY_ID with AWS_SECRET_ACCESS_KEY nor token is set".into(),
            );
        }
        let (access_key_id, secret_access_key) = keys.unwrap_or_default();
        let region = text("AWS_REGION")?.or(text("AWS_DEFAULT_REGION")?);
        // The region becomes part of the endpoint's host name: nothing but a region name.
        if let Some(r) = &region
            && (r.len() > 32
                || !r
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
        {
            return Err("AWS_REGION is not a region name (lower-case letters, digits, `-`)".into());
        }
        Ok(Self {
            access_key_id,
            secret_access_key,
            session_token: text("AWS_SESSION_TOKEN")?,
            region,
            bearer_token: token,
        })
    }

    /// Every secret value it holds (to check that none was written anywhere).
    pub fn secrets(&self) -> Vec<&str> {
        [
            Some(self.secret_access_key.as_str()),
            self.session_token.as_deref(),
            self.bearer_token.as_deref(),
        ]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect()
    }

    /// Runs `fut` with these credentials: every [`crate::Location`] parsed inside it (and
    /// every store it makes) uses them, with stores of its own, dropped with the scope.
    pub async fn scope<F: Future>(self, fut: F) -> F::Output {
        let scope = Arc::new(Scope {
            credentials: self,
            stores: Mutex::default(),
        });
        SCOPE.scope(scope, fut).await
    }
}

/// Runs `fut` inside `credentials`' scope ([`Credentials::scope`]), or as the process itself
/// when there are none.
pub async fn scoped<F: Future>(credentials: Option<Credentials>, fut: F) -> F::Output {
    match credentials {
        Some(c) => c.scope(fut).await,
        None => fut.await,
    }
}

/// The credentials a future runs with, and the stores made for them.
pub(crate) struct Scope {
    pub(crate) credentials: Credentials,
    pub(crate) stores: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
}

tokio::task_local! {
    static SCOPE: Arc<Scope>;
}

/// The scope the current task runs in, if any.
pub(crate) fn current() -> Option<Arc<Scope>> {
    SCOPE.try_with(Arc::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(read: &[&str], write: &[&str]) -> Grant {
        Grant {
            read: read.iter().map(|s| s.to_string()).collect(),
            write: write.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn prefixes_match_by_whole_segments() {
        assert!(within("s3://b/team-a/x.jsonl", "s3://b/team-a/"));
        assert!(within("s3://b/team-a/x.jsonl", "s3://b/team-a"));
        assert!(within("s3://b/team-a", "s3://b/team-a/"));
        assert!(within("s3://b/anything", "s3://b"));
        // A bucket's name keeps its case; a host's does not.
        assert!(!within("s3://TEAM-A/x", "s3://team-a/"));
        assert!(within("HTTPS://Host/team-a/x", "https://host/team-a/"));
        assert!(!within("s3://b/team-ab/x", "s3://b/team-a"));
        assert!(!within("s3://b/team-ab/x", "s3://b/team-a/"));
        assert!(!within("s3://b2/team-a/x", "s3://b/team-a/"));
        assert!(!within("s3://bb/x", "s3://b"));
        assert!(!within("http://b/team-a/x", "s3://b/team-a/"));
        assert!(!within("s3://b/team-a%2Fx", "s3://b/team-a/"));
        assert!(within("s3://b/team-a/a%20b", "s3://b/team-a/"));
        assert!(within("/data/team-a/x", "file:///data/team-a/"));
        assert!(!within("s3://b/", "s3://b/team-a/"));
    }

    #[test]
    fn dot_segments_and_odd_characters_are_refused_even_encoded() {
        for bad in [
            "s3://b/team-a/../team-b/x",
            "s3://b/team-a/%2e%2e/team-b/x",
            "s3://b/team-a/%2E./team-b/x",
            "file:///data/team-a/../../etc/passwd",
            "/data/team-a/./x",
            "s3://b/team-a\\..\\x",
            "s3://b/team-a/%zz",
            "no-scheme/x",
        ] {
            assert!(plain(bad).is_err(), "{bad} passed");
            let g = grant(&["s3://b/", "file:///data/"], &[]);
            assert!(g.check("spec.input.uri", bad, Use::Read).is_err(), "{bad}");
        }
        // What a URL parser would strip or trim before resolving `..`.
        for sneaky in [
            "s3://shared/team-a/.\t./team-b/secret",
            "s3://shared/team-a/.\n./team-b/x",
            "s3://shared/team-a/..\u{1}",
            " s3://shared/team-a/x",
            "s3://shared/team-a/x ",
        ] {
            assert!(plain(sneaky).is_err(), "{sneaky:?} passed");
        }
        assert!(plain("s3://b/team-a/..x/y").is_ok());
        // A query is fine where no tenant is confined, never where one is.
        assert!(plain("https://h/m.onnx?download=1").is_ok());
        let g = grant(&["s3://b/"], &[]);
        assert!(g.check("f", "s3://b/x?versionId=1", Use::Read).is_err());
    }

    #[test]
    fn checks_name_the_field_and_the_prefixes() {
        let g = grant(
            &["s3://team-a/", "s3://shared/models/"],
            &["s3://team-a/out/"],
        );
        assert!(
            g.check("spec.model.uri", "s3://shared/models/m.onnx", Use::Read)
                .is_ok()
        );
        let e = g
            .check("spec.input.uri", "s3://team-b/in.jsonl", Use::Read)
            .expect_err("other bucket");
        assert!(e.starts_with("spec.input.uri: s3://team-b/in.jsonl"), "{e}");
        assert!(e.contains("s3://team-a/, s3://shared/models/"), "{e}");
        // Readable is not writable.
        let e = g
            .check("spec.output.uri", "s3://team-a/in/", Use::Write)
            .expect_err("read-only");
        assert!(e.contains("may write (s3://team-a/out/)"), "{e}");
        let none = Grant::default();
        let e = none
            .check("spec.output.uri", "s3://team-a/out/", Use::Write)
            .expect_err("nothing");
        assert!(e.contains("it may write nothing"), "{e}");
    }

    #[test]
    fn an_s3_bucket_named_in_a_host_is_refused_under_a_grant() {
        let g = grant(&["https://s3data.s3.eu-west-1.amazonaws.com/team-a/"], &[]);
        for uri in [
            "https://s3data.s3.eu-west-1.amazonaws.com/team-a/team-b/x",
            "https://s3.eu-west-1.amazonaws.com/s3data/team-a/x",
        ] {
            let e = g.check("spec.input.uri", uri, Use::Read).expect_err(uri);
            assert!(e.contains("s3://bucket/"), "{e}");
        }
    }

    #[test]
    fn a_glob_is_judged_by_the_directory_it_cannot_leave() {
        let g = grant(&["s3://b/team-a/"], &[]);
        assert_eq!(
            literal_dir("s3://b/team-a/part-*.parquet"),
            "s3://b/team-a/"
        );
        assert!(
            g.check("f", "s3://b/team-a/**/part-*.parquet", Use::Read)
                .is_ok()
        );
        // `team-a*` could match `team-ab`.
        assert!(g.check("f", "s3://b/team-a*/x", Use::Read).is_err());
        assert!(g.check("f", "s3://b/*/x", Use::Read).is_err());
    }

    #[test]
    fn a_symbolic_link_cannot_lead_out_of_a_local_prefix() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = dir.path().join("team-a");
        let b = dir.path().join("team-b");
        std::fs::create_dir_all(&a).expect("mkdir");
        std::fs::create_dir_all(&b).expect("mkdir");
        std::fs::write(b.join("secret.jsonl"), "{}\n").expect("write");
        std::os::unix::fs::symlink(&b, a.join("link")).expect("symlink");
        std::os::unix::fs::symlink(b.join("secret.jsonl"), a.join("file.jsonl")).expect("symlink");
        let g = grant(
            &[&format!("file://{}/", a.display())],
            &[&format!("file://{}/", a.display())],
        );
        for escape in ["link/secret.jsonl", "file.jsonl", "link/new/out/"] {
            let uri = format!("file://{}/{escape}", a.display());
            let e = g.check("spec.input.uri", &uri, Use::Read).expect_err(&uri);
            assert!(e.contains("symbolic link"), "{e}");
        }
        let e = g
            .check(
                "spec.output.uri",
                &format!("file://{}/link/out/", a.display()),
                Use::Write,
            )
            .expect_err("write through a link");
        assert!(e.contains("symbolic link"), "{e}");
        // What does not exist yet is judged by what exists above it.
        let fresh = format!("file://{}/new/deeper/out/", a.display());
        assert!(g.check("spec.output.uri", &fresh, Use::Write).is_ok());
        // A prefix that is itself reached through a link still covers what is under it.
        let alias = dir.path().join("alias");
        std::os::unix::fs::symlink(&a, &alias).expect("symlink");
        let g2 = grant(&[&format!("file://{}/", alias.display())], &[]);
        let inside = format!("file://{}/x.jsonl", alias.display());
        assert!(g2.check("f", &inside, Use::Read).is_ok());
        // ... but lexically first: the real path is not the prefix as written.
        let real = format!("file://{}/x.jsonl", a.display());
        assert!(g2.check("f", &real, Use::Read).is_err());
    }

    /// Credentials from a Secret holding `data`.
    fn secret_of(data: &[(&str, &[u8])]) -> Result<Credentials, String> {
        Credentials::from_secret(|k| data.iter().find(|(key, _)| *key == k).map(|(_, v)| *v))
    }

    #[test]
    fn credentials_come_from_a_secret_and_never_print() {
        let c = secret_of(&[
            ("AWS_ACCESS_KEY_ID", b"AKIA-TEAM-A"),
            ("AWS_SECRET_ACCESS_KEY", b"s3cr3t-value\n"),
            ("AWS_DEFAULT_REGION", b"eu-west-1"),
        ])
        .expect("creds");
        assert_eq!(c.secret_access_key, "s3cr3t-value");
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.secrets(), vec!["s3cr3t-value"]);
        let shown = format!("{c:?} {:?}", Some(&c));
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("AKIA"),
            "{shown}"
        );
        let e = secret_of(&[("AWS_ACCESS_KEY_ID", b"AKIA")]).expect_err("half");
        assert!(e.contains("without AWS_SECRET_ACCESS_KEY"), "{e}");
        let e = secret_of(&[
            ("AWS_ACCESS_KEY_ID", b"AKIA"),
            ("AWS_SECRET_ACCESS_KEY", b"s"),
            ("AWS_REGION", b"x@10.0.0.5:8443/#"),
        ])
        .expect_err("a host");
        assert!(e.contains("AWS_REGION"), "{e}");
        let e = secret_of(&[]).expect_err("empty");
        assert!(e.contains("neither"), "{e}");
        let e = secret_of(&[("token", &[0xff, 0xfe])]).expect_err("binary");
        assert!(e.contains("token") && !e.contains('\u{fffd}'), "{e}");
    }
}
