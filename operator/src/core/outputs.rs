//! Output parts are committed by the operator. Each attempt writes to its own location
//! (`<output>/_attempts/part-NNNNN.aK.jsonl`); when the operator accepts the completion it
//! checks the part (size, sha256, record count) and then moves it to the final name
//! (`<output>/part-NNNNN.jsonl`). A losing or late attempt never touches a committed part.
//! `_SUCCESS.json` lists only committed parts.

use infermesh_io::{Location, ObjectError};
use sha2::{Digest, Sha256};

/// The folder of attempt-scoped parts under an output location.
pub const ATTEMPTS: &str = "_attempts";

/// The manifest written when every shard is done.
pub const MANIFEST: &str = "_SUCCESS.json";

fn base(output: &str) -> &str {
    output.trim_end_matches('/')
}

/// The final name of shard `index`'s JSONL part.
pub fn part_name(index: u32) -> String {
    part_name_as(index, "jsonl")
}

/// The final name of shard `index`'s part with extension `ext` (`jsonl`, `parquet`).
pub fn part_name_as(index: u32, ext: &str) -> String {
    format!("part-{index:05}.{ext}")
}

/// The final URI of shard `index`'s JSONL part.
pub fn part_uri(output: &str, index: u32) -> String {
    part_uri_as(output, index, "jsonl")
}

/// The final URI of shard `index`'s part with extension `ext`.
pub fn part_uri_as(output: &str, index: u32, ext: &str) -> String {
    format!("{}/{}", base(output), part_name_as(index, ext))
}

/// The extension of a part's URI (`parquet` for `.../part-00001.parquet`), `jsonl` when it
/// names another.
pub fn extension(part: &str) -> &'static str {
    if part.ends_with(".parquet") {
        "parquet"
    } else {
        "jsonl"
    }
}

/// Where attempt `attempt` of shard `index` writes its JSONL part.
pub fn attempt_uri(output: &str, index: u32, attempt: u32) -> String {
    attempt_uri_as(output, index, attempt, "jsonl")
}

/// Where attempt `attempt` of shard `index` writes its part with extension `ext`.
pub fn attempt_uri_as(output: &str, index: u32, attempt: u32, ext: &str) -> String {
    format!(
        "{}/{ATTEMPTS}/part-{index:05}.a{attempt}.{ext}",
        base(output)
    )
}

/// What a part holds, as the operator found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartFacts {
    /// Bytes.
    pub bytes: u64,
    /// sha256, lowercase hex.
    pub sha256: String,
    /// Records: newline-terminated lines.
    pub records: u64,
}

/// Reads a part and measures it (outside any lock: this is I/O).
pub async fn inspect(uri: &str) -> Result<PartFacts, ObjectError> {
    let data = Location::parse(uri)?.get().await?;
    Ok(facts_for(uri, &data))
}

/// The facts of the part at `uri`: a `.parquet` part must be Parquet whose footer counts its
/// rows, and anything else is counted by lines. A part that is not what its name says counts
/// [`u64::MAX`] records, which no report can match.
pub fn facts_for(uri: &str, data: &[u8]) -> PartFacts {
    let mut f = facts(data);
    if extension(uri) == "parquet" && !infermesh_io::columnar::is_parquet(data) {
        f.records = u64::MAX;
    }
    f
}

/// The facts of a part's bytes: records are newline-terminated lines, or, for a Parquet
/// part, the rows its footer counts (a footer that does not parse, or whose count is not its
/// row groups', counts [`u64::MAX`], which no report can match).
pub fn facts(data: &[u8]) -> PartFacts {
    let records = if infermesh_io::columnar::is_parquet(data) {
        infermesh_io::columnar::parquet_rows(data.to_vec().into()).unwrap_or(u64::MAX)
    } else {
        data.iter().filter(|&&b| b == b'\n').count() as u64
    };
    PartFacts {
        bytes: data.len() as u64,
        sha256: hex(&Sha256::digest(data)),
        records,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares what a report says of its part with what the operator found; `Err` names the
/// first difference.
pub fn compare(reported: &PartFacts, found: &PartFacts) -> Result<(), String> {
    if reported.bytes != found.bytes {
        return Err(format!(
            "the part has {} bytes, the report says {}",
            found.bytes, reported.bytes
        ));
    }
    if !reported.sha256.eq_ignore_ascii_case(&found.sha256) {
        return Err(format!(
            "the part's sha256 is {}, the report says {}",
            found.sha256, reported.sha256
        ));
    }
    if reported.records != found.records {
        return Err(format!(
            "the part has {} records, the report says {}",
            found.records, reported.records
        ));
    }
    Ok(())
}

/// Moves attempt `attempt`'s part of shard `index` to its final name. Idempotent: when the
/// attempt's part is gone and the final part is there (an earlier commit finished), there is
/// nothing to do.
pub async fn commit(output: &str, index: u32, attempt: u32, ext: &str) -> Result<(), ObjectError> {
    let from = Location::parse(&attempt_uri_as(output, index, attempt, ext))?;
    let to = Location::parse(&part_uri_as(output, index, ext))?;
    match from.rename_to(&to).await {
        Ok(()) => Ok(()),
        Err(ObjectError::NotFound { .. }) if to.size().await.is_ok() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes one attempt part; one that is not there is not an error.
pub async fn remove(attempt_part: &str) -> Result<(), ObjectError> {
    Location::parse(attempt_part)?.delete().await
}

/// Removes what attempts left under `output` (losing, late or failed attempts).
pub async fn clear_attempts(output: &str) -> Result<usize, ObjectError> {
    Location::parse(base(output))?
        .child(ATTEMPTS)
        .delete_all()
        .await
}

/// What a run writes under its output location (final parts, the manifest, attempt parts):
/// the objects `overwrite` clears and `error` refuses to find. Other files are left alone.
pub fn is_ours(output: &str, uri: &str) -> bool {
    let rel = uri
        .strip_prefix(base(output))
        .unwrap_or(uri)
        .trim_start_matches('/');
    rel == MANIFEST
        || rel.starts_with(&format!("{ATTEMPTS}/"))
        || (rel.starts_with("part-") && !rel.contains('/'))
}

/// Gets an output location ready for a new run (not a resumed one): it must be writable
/// (a probe object is written and removed), and, as `mode` says, hold nothing a run writes
/// (`error`, the default: refused, naming what is there) or be cleared of it (`overwrite`).
/// `Err` is (reason, message).
pub async fn prepare(output: &str, overwrite: bool) -> Result<(), (&'static str, String)> {
    let root = Location::parse(base(output))
        .map_err(|e| ("OutputNotWritable", format!("spec.output.uri: {e}")))?;
    let ours: Vec<(String, u64)> = root
        .list()
        .await
        .map_err(|e| {
            (
                "OutputNotWritable",
                format!("spec.output.uri {output}: cannot list: {e}"),
            )
        })?
        .into_iter()
        .filter(|(uri, _)| is_ours(output, uri))
        .collect();
    if !ours.is_empty() {
        if !overwrite {
            let names: Vec<&str> = ours
                .iter()
                .take(3)
                .map(|(u, _)| u.rsplit('/').next().unwrap_or_default())
                .collect();
            return Err((
                "OutputNotEmpty",
                format!(
                    "spec.output.uri {output} already holds {} object(s) of an earlier run ({}{}); \
                     choose an empty location, or set spec.output.mode: overwrite to replace them",
                    ours.len(),
                    names.join(", "),
                    if ours.len() > 3 { ", ..." } else { "" }
                ),
            ));
        }
        for (uri, _) in &ours {
            Location::parse(uri)
                .map_err(|e| ("OutputNotWritable", e.to_string()))?
                .delete()
                .await
                .map_err(|e| {
                    (
                        "OutputNotWritable",
                        format!("overwrite: cannot remove {uri}: {e}"),
                    )
                })?;
        }
        let _ = root.child(ATTEMPTS).delete_all().await;
    }
    // Writable? Found now, not after inference, three times over.
    let probe = root.child(".infermesh-probe");
    probe.put(b"probe\n".to_vec().into()).await.map_err(|e| {
        (
            "OutputNotWritable",
            format!("spec.output.uri {output} is not writable: {e}"),
        )
    })?;
    probe.delete().await.map_err(|e| {
        (
            "OutputNotWritable",
            format!("spec.output.uri {output}: {e}"),
        )
    })?;
    Ok(())
}

/// One committed part, as `_SUCCESS.json` lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestPart {
    /// Shard index.
    pub index: u32,
    /// Final URI.
    pub uri: String,
    /// Records.
    pub records: u64,
    /// sha256.
    pub sha256: String,
}

/// What `verify_outputs` found wrong with one workload's outputs; empty when all is well.
pub async fn verify_outputs(output: &str, expected: &[ManifestPart]) -> Vec<String> {
    let mut problems = Vec::new();
    let root = match Location::parse(base(output)) {
        Ok(l) => l,
        Err(e) => return vec![e.to_string()],
    };
    let manifest: Vec<ManifestPart> = match root.child(MANIFEST).get().await {
        Ok(bytes) => match serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| serde_json::from_value(v.get("parts")?.clone()).ok())
        {
            Some(parts) => parts,
            None => return vec![format!("{}/{MANIFEST} does not parse", base(output))],
        },
        Err(e) => return vec![format!("{MANIFEST}: {e}")],
    };
    if manifest != expected {
        problems.push(format!(
            "{MANIFEST} lists {} parts that differ from the {} the store committed",
            manifest.len(),
            expected.len()
        ));
    }
    for part in &manifest {
        match inspect(&part.uri).await {
            Ok(found) if found.sha256 == part.sha256 && found.records == part.records => {}
            Ok(found) => problems.push(format!(
                "{}: sha256 {} and {} records, the manifest says {} and {}",
                part.uri, found.sha256, found.records, part.sha256, part.records
            )),
            Err(e) => problems.push(format!("{}: {e}", part.uri)),
        }
    }
    match root.list().await {
        Ok(objects) => {
            let listed: std::collections::HashSet<&str> =
                manifest.iter().map(|p| p.uri.as_str()).collect();
            let manifest_uri = format!("{}/{MANIFEST}", base(output));
            for (uri, _) in objects {
                let name = uri.rsplit('/').next().unwrap_or_default();
                let ours = name.starts_with("part-") || uri.contains(&format!("/{ATTEMPTS}/"));
                if ours && !listed.contains(uri.as_str()) && uri != manifest_uri {
                    problems.push(format!("{uri}: a stray part the manifest does not list"));
                }
            }
        }
        Err(e) => problems.push(format!("listing {output}: {e}")),
    }
    problems
}

/// What `ledger verify --outputs` found for one succeeded workload.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OutputCheck {
    /// `namespace/name/uid`.
    pub workload: String,
    /// Its output location.
    pub output: String,
    /// Parts the store committed.
    pub parts: usize,
    /// What is wrong; empty when nothing is.
    pub problems: Vec<String>,
    /// A later workload that wrote to the same location (`output.mode: overwrite`): this
    /// one's outputs are gone by design and are not checked.
    pub superseded_by: Option<String>,
}

/// Checks the outputs of every succeeded workload in the store against its manifest.
pub async fn verify_stored(
    store: &impl crate::store::Store,
) -> Result<Vec<OutputCheck>, crate::store::StoreError> {
    let mut out = Vec::new();
    let succeeded = store.workloads_in_phase("Succeeded").await?;
    let output_of = |spec: &str| {
        serde_json::from_str::<serde_json::Value>(spec)
            .ok()
            .and_then(|v| v["output"]["uri"].as_str().map(str::to_string))
    };
    // In creation order: the last workload written to a location is the one it holds now.
    let mut latest: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for w in &succeeded {
        if let Some(o) = output_of(&w.record.spec_json) {
            let r = &w.record;
            latest.insert(
                base(&o).to_string(),
                format!("{}/{}/{}", r.namespace, r.name, r.uid),
            );
        }
    }
    for w in succeeded {
        let r = &w.record;
        let workload = format!("{}/{}/{}", r.namespace, r.name, r.uid);
        let Some(output) = output_of(&r.spec_json) else {
            out.push(OutputCheck {
                workload,
                output: String::new(),
                parts: 0,
                problems: vec!["the stored spec names no output".into()],
                superseded_by: None,
            });
            continue;
        };
        if let Some(later) = latest.get(base(&output)).filter(|l| **l != workload) {
            out.push(OutputCheck {
                workload,
                output,
                parts: w.shards.len(),
                problems: Vec::new(),
                superseded_by: Some(later.clone()),
            });
            continue;
        }
        let mut problems = Vec::new();
        let expected: Vec<ManifestPart> = w
            .shards
            .iter()
            .map(|s| {
                if s.state != "succeeded" {
                    problems.push(format!(
                        "shard {} is {} in a succeeded workload",
                        s.index, s.state
                    ));
                }
                ManifestPart {
                    index: s.index,
                    uri: s.output_uri.clone().unwrap_or_default(),
                    records: s.records,
                    sha256: s.sha256.clone().unwrap_or_default(),
                }
            })
            .collect();
        problems.extend(verify_outputs(&output, &expected).await);
        out.push(OutputCheck {
            workload,
            output,
            parts: expected.len(),
            problems,
            superseded_by: None,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_attempt_scoped_and_final_names_are_by_index() {
        assert_eq!(
            attempt_uri("file:///o/", 17, 3),
            "file:///o/_attempts/part-00017.a3.jsonl"
        );
        assert_eq!(part_uri("file:///o", 17), "file:///o/part-00017.jsonl");
    }

    #[tokio::test]
    async fn a_new_run_finds_its_output_empty_or_clears_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let out = format!("file://{}/", dir.path().display());
        prepare(&out, false).await.expect("an empty location");
        std::fs::write(dir.path().join("part-00001.jsonl"), "old\n").expect("write");
        std::fs::write(dir.path().join("_SUCCESS.json"), "{}").expect("write");
        std::fs::write(dir.path().join("notes.txt"), "mine").expect("write");
        let (reason, message) = prepare(&out, false).await.expect_err("not empty");
        assert_eq!(reason, "OutputNotEmpty");
        assert!(
            message.contains("2 object(s)") && message.contains("overwrite"),
            "{message}"
        );
        prepare(&out, true).await.expect("overwrite");
        assert!(!dir.path().join("part-00001.jsonl").exists());
        assert!(!dir.path().join("_SUCCESS.json").exists());
        assert!(
            dir.path().join("notes.txt").exists(),
            "what a run did not write stays"
        );
        assert!(!dir.path().join(".infermesh-probe").exists());
        // A file where a folder should be is not writable, and says so at once.
        let file = dir.path().join("notes.txt");
        let (reason, message) = prepare(&format!("file://{}/", file.display()), false)
            .await
            .expect_err("a file");
        assert_eq!(reason, "OutputNotWritable", "{message}");
    }

    #[test]
    fn facts_count_lines_and_hash() {
        let f = facts(b"{\"a\":1}\n{\"a\":2}\n");
        assert_eq!(f.records, 2);
        assert_eq!(f.bytes, 16);
        assert_eq!(f.sha256.len(), 64);
        let mut other = f.clone();
        other.records = 3;
        assert!(compare(&other, &f).unwrap_err().contains("2 records"));
        other = f.clone();
        other.sha256 = "0".repeat(64);
        assert!(compare(&other, &f).unwrap_err().contains("sha256"));
        assert_eq!(compare(&f, &f), Ok(()));
    }

    #[test]
    fn a_part_that_is_not_what_its_name_says_matches_no_report() {
        // JSONL written where a Parquet part was expected (an agent that ignored the format).
        let lines = b"{\"a\":1}\n{\"a\":2}\n";
        assert_eq!(
            facts_for("file:///o/part-00001.parquet", lines).records,
            u64::MAX
        );
        assert_eq!(facts_for("file:///o/part-00001.jsonl", lines).records, 2);
        // Bytes that look like Parquet but whose footer does not parse.
        assert_eq!(facts(b"PAR1 not a footer PAR1").records, u64::MAX);
        let ids = [
            serde_json::json!(1),
            serde_json::json!(2),
            serde_json::json!(3),
        ];
        let refs: Vec<Option<&serde_json::Value>> = ids.iter().map(Some).collect();
        let part = infermesh_io::columnar::write_part(
            "id",
            &refs,
            infermesh_io::columnar::PartColumns::Embeddings(vec![vec![0.5]; 3]),
            true,
        )
        .expect("part");
        assert_eq!(facts_for("file:///o/part-00001.parquet", &part).records, 3);
    }

    #[tokio::test]
    async fn commit_moves_the_attempt_and_is_idempotent() {
        let dir = tempfile::tempdir().expect("tmp");
        let out = format!("file://{}/", dir.path().display());
        let a = Location::parse(&attempt_uri(&out, 2, 1)).expect("uri");
        a.put(b"x\n".to_vec().into()).await.expect("put");
        commit(&out, 2, 1, "jsonl").await.expect("commit");
        commit(&out, 2, 1, "jsonl")
            .await
            .expect("again: nothing to do");
        assert!(dir.path().join("part-00002.jsonl").exists());
        assert!(
            commit(&out, 3, 1, "jsonl").await.is_err(),
            "nothing to commit"
        );
        let stray = Location::parse(&attempt_uri(&out, 2, 2)).expect("uri");
        stray.put(b"late\n".to_vec().into()).await.expect("put");
        assert_eq!(clear_attempts(&out).await.expect("clear"), 1);
        assert!(!dir.path().join("_attempts/part-00002.a2.jsonl").exists());
    }
}
