//! The console's static files, built into the binary: htmx and uPlot as published on the
//! npm registry (pinned, with their sha256 in `assets/console/vendor/VENDORED.tsv`, checked by
//! a test and by `scripts/vendor-console.sh`), and the console's own script and styles.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// (name, content type, bytes).
pub const FILES: [(&str, &str, &[u8]); 5] = [
    (
        "htmx.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/console/vendor/htmx.min.js"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/console/vendor/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/console/vendor/uPlot.min.css"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/console/console.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/console/console.css"),
    ),
];

/// The vendored files' record: file, package, version, sha256, licence (tab-separated).
pub const VENDORED: &str = include_str!("../../assets/console/vendor/VENDORED.tsv");

/// `GET /assets/{file}`.
pub async fn serve(Path(file): Path<String>) -> Response {
    match FILES.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, bytes)) => {
            let mut res = bytes.into_response();
            res.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            res.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=3600"),
            );
            res
        }
        None => (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// Every vendored file is byte for byte what VENDORED.tsv pins, and every pinned file is
    /// served.
    #[test]
    fn vendored_files_match_their_recorded_sha256() {
        let mut checked = 0;
        for line in VENDORED
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let cols: Vec<&str> = line.split('\t').collect();
            assert_eq!(cols.len(), 5, "{line}");
            let (file, package, version, sha) = (cols[0], cols[1], cols[2], cols[3]);
            assert!(
                version.split('.').all(|p| p.parse::<u32>().is_ok()),
                "{package} is pinned to an exact version, not {version}"
            );
            let (_, _, bytes) = FILES
                .iter()
                .find(|(name, _, _)| *name == file)
                .unwrap_or_else(|| panic!("{file} is vendored but not served"));
            assert_eq!(
                hex::encode(Sha256::digest(bytes)),
                sha,
                "{file} is not {package}@{version} as published"
            );
            checked += 1;
        }
        assert_eq!(checked, 3, "htmx and uPlot's script and styles");
    }

    #[tokio::test]
    async fn an_unknown_asset_is_not_found() {
        let res = serve(Path("../Cargo.toml".into())).await;
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        let res = serve(Path("htmx.min.js".into())).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
    }
}
