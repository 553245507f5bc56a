//! Operations the operator needs beyond reading and writing one object: committing an
//! attempt's part to its final name, listing and removing what a location holds.

use futures::TryStreamExt;

use crate::store::{Location, ObjectError};

impl Location {
    /// Moves this object to `to`, replacing what is there: an atomic rename on `file://`, a
    /// server-side copy then delete on `s3://`. Both must be in the same store.
    pub async fn rename_to(&self, to: &Location) -> Result<(), ObjectError> {
        self.store
            .rename(&self.path, &to.path)
            .await
            .map_err(|e| self.map_err(e))
    }

    /// Removes this object; a missing one is not an error.
    pub async fn delete(&self) -> Result<(), ObjectError> {
        match self.store.delete(&self.path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.map_err(e)),
        }
    }

    async fn metas(&self) -> Result<Vec<object_store::ObjectMeta>, ObjectError> {
        self.store
            .list(Some(&self.path))
            .try_collect()
            .await
            .map_err(|e| self.map_err(e))
    }

    /// Every object under this location taken as a directory, recursively: (URI, size).
    pub async fn list(&self) -> Result<Vec<(String, u64)>, ObjectError> {
        let base = self.uri.trim_end_matches('/').to_string();
        let prefix_len = self.path.as_ref().len();
        let mut out: Vec<(String, u64)> = self
            .metas()
            .await?
            .into_iter()
            .map(|m| {
                let rel = m.location.as_ref()[prefix_len..].trim_start_matches('/');
                (format!("{base}/{rel}"), m.size)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Every object under this location taken as a directory, recursively: (path relative
    /// to it, size, version), sorted by path.
    pub async fn list_versions(&self) -> Result<Vec<(String, u64, Option<String>)>, ObjectError> {
        let prefix_len = self.path.as_ref().len();
        let mut out: Vec<(String, u64, Option<String>)> = self
            .metas()
            .await?
            .into_iter()
            .map(|m| {
                let rel = m.location.as_ref()[prefix_len..].trim_start_matches('/');
                (rel.to_string(), m.size, m.e_tag)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Removes every object under this location taken as a directory; returns how many.
    pub async fn delete_all(&self) -> Result<usize, ObjectError> {
        let metas = self.metas().await?;
        for m in &metas {
            match self.store.delete(&m.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.map_err(e)),
            }
        }
        // The local file system keeps the emptied folders: take them away too.
        if let Some(dir) = url::Url::parse(&self.uri)
            .ok()
            .filter(|u| u.scheme() == "file")
            .and_then(|u| u.to_file_path().ok())
        {
            let mut dirs: Vec<std::path::PathBuf> = metas
                .iter()
                .filter_map(|m| {
                    let rel =
                        m.location.as_ref()[self.path.as_ref().len()..].trim_start_matches('/');
                    dir.join(rel).parent().map(|p| p.to_path_buf())
                })
                .collect();
            dirs.sort();
            dirs.dedup();
            // Deepest first; a folder that is not empty stays.
            for d in dirs.iter().rev().chain(std::iter::once(&dir)) {
                let _ = std::fs::remove_dir(d);
            }
        }
        Ok(metas.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rename_list_and_delete_on_the_file_system() {
        let dir = tempfile::tempdir().expect("tmp");
        let base = Location::parse(&format!("file://{}", dir.path().display())).expect("base");
        let a = base.child("_attempts").child("part-00000.a1.jsonl");
        a.put(bytes::Bytes::from_static(b"{}\n"))
            .await
            .expect("put");
        let listed = base.list().await.expect("list");
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert!(
            listed[0].0.ends_with("/_attempts/part-00000.a1.jsonl"),
            "{listed:?}"
        );
        assert_eq!(listed[0].1, 3);
        let fin = base.child("part-00000.jsonl");
        a.rename_to(&fin).await.expect("rename");
        assert_eq!(fin.get().await.expect("final"), b"{}\n".as_slice());
        assert!(matches!(a.size().await, Err(ObjectError::NotFound { .. })));
        a.delete().await.expect("deleting a missing object is fine");
        base.child("_attempts")
            .child("stray.jsonl")
            .put(bytes::Bytes::from_static(b"x"))
            .await
            .expect("put");
        assert_eq!(
            base.child("_attempts").delete_all().await.expect("delete"),
            1
        );
        let left: Vec<String> = base
            .list()
            .await
            .expect("list")
            .into_iter()
            .map(|(u, _)| u)
            .collect();
        assert_eq!(left.len(), 1, "only the final part is left: {left:?}");
        assert!(
            !dir.path().join("_attempts").exists(),
            "the emptied folder is gone too"
        );
    }
}
