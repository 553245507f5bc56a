//! Models are content-addressed: the sha256 a Workload pins is the model that runs (agents
//! keep models by hash and refuse a download that hashes otherwise). When the object behind
//! the model's URI changed after it was pinned, the run says so at admission, instead of
//! silently running the cached model while its manifest names the new file.

use infermesh_io::Location;
use sha2::{Digest, Sha256};

/// The largest model the operator hashes at admission (larger ones are not read twice).
pub const HASH_AT_ADMISSION_MAX: u64 = 512 << 20;

/// What the object at `uri` hashes to now, when it is not the `pinned` sha256 (and small
/// enough to hash at admission); `None` when it matches, when nothing is pinned, or when it
/// cannot be read (admission reports a missing model itself).
pub async fn drift(uri: &str, pinned: &str) -> Option<String> {
    if pinned.is_empty() {
        return None;
    }
    let loc = Location::parse(uri).ok()?;
    if loc.size().await.ok()? > HASH_AT_ADMISSION_MAX {
        return None;
    }
    let data = loc.get().await.ok()?;
    let actual: String = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (!actual.eq_ignore_ascii_case(pinned)).then_some(actual)
}

/// The warning a drift gives, for the run output, the event log and a Kubernetes Event.
pub fn drift_warning(uri: &str, pinned: &str, actual: &str) -> String {
    format!(
        "ModelChanged: the model at {uri} now hashes to {actual}, not the pinned {pinned}; the \
         pinned model is what runs (agents run it from their cache, and fail with \
         ModelLoadFailed where they must download it); pin the new sha256 to run the new file"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_model_changed_behind_its_pin_is_found() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, b"the new model").expect("write");
        let uri = format!("file://{}", path.display());
        let new: String = Sha256::digest(b"the new model")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(drift(&uri, &new).await, None, "the pin matches");
        assert_eq!(drift(&uri, &new.to_uppercase()).await, None);
        let old = "a".repeat(64);
        assert_eq!(drift(&uri, &old).await.as_deref(), Some(new.as_str()));
        assert_eq!(drift(&uri, "").await, None, "nothing pinned");
        assert_eq!(drift("file:///no/such/model.onnx", &old).await, None);
        assert!(drift_warning(&uri, &old, &new).contains("pinned"));
    }
}
