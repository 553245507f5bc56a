//! A workload over a dataset of files (here Parquet, by row group): what its Assigns carry,
//! what its reports may claim, and that a resumed run reads exactly the planned files.

use infermesh_crds::{Manifest, WorkloadSpec, parse_manifests};
use infermesh_io::Compression;
use infermesh_io::columnar::{self, PartColumns};
use infermesh_io::dataset::{DataFile, Dataset, Format, RowGroup};
use infermesh_proto as pb;
use pb::agent_message::Msg as Up;
use pb::operator_message::Msg as Down;

use super::tests::{Rx, attach, mesh};
use super::*;
use crate::store::testing::{Backend, both};
use crate::store::{AnyStore, Store};

fn spec(out: &str) -> WorkloadSpec {
    let yaml = format!(
        "apiVersion: infermesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w}}\nspec:\n  mesh: m\n  \
         model: {{uri: \"file:///m.onnx\", sha256: \"{}\"}}\n  task: {{tensor: {{inputs: [{{name: x, field: feats}}]}}}}\n  \
         input: {{uri: \"file:///data/\", format: parquet}}\n  output: {{uri: \"{out}\", format: parquet}}\n  \
         shardBytes: 1Ki\n",
        "a".repeat(64)
    );
    match parse_manifests(&yaml).expect("workload").pop() {
        Some(Manifest::Workload(w)) => w.spec,
        _ => panic!("workload"),
    }
}

/// Two Parquet files: row groups of 2,000 and 2,000 bytes (10 and 5 rows), and one of 1,500
/// bytes (7 rows).
fn dataset() -> Dataset {
    let file = |name: &str, groups: &[(u64, u64)]| DataFile {
        uri: format!("file:///data/{name}"),
        size: 9000,
        version: Some(format!("v-{name}")),
        compression: Compression::None,
        row_groups: groups
            .iter()
            .map(|&(bytes, rows)| RowGroup { bytes, rows })
            .collect(),
    };
    Dataset::new(
        Format::Parquet,
        vec![
            file("a.parquet", &[(2000, 10), (2000, 5)]),
            file("b.parquet", &[(1500, 7)]),
        ],
    )
}

fn submission(out: &str) -> Submission {
    let ds = dataset();
    Submission {
        namespace: "team-a".into(),
        name: "w".into(),
        uid: "u1".into(),
        spec: spec(out),
        input_size: ds.total(),
        input_version: None,
        input_files: Some(ds),
        credentials: None,
    }
}

fn assigns(rx: &mut Rx) -> Vec<pb::Assign> {
    std::iter::from_fn(|| rx.try_recv().ok())
        .filter_map(|m| match m {
            Ok(pb::OperatorMessage {
                msg: Some(Down::Assign(a)),
            }) => Some(a),
            _ => None,
        })
        .collect()
}

/// Writes a Parquet part of `rows` rows where `a` says, and the honest report of it.
fn parquet_part(a: &pb::Assign, rows: usize) -> pb::Completed {
    let ids: Vec<serde_json::Value> = (0..rows).map(|i| serde_json::json!(i)).collect();
    let refs: Vec<Option<&serde_json::Value>> = ids.iter().map(Some).collect();
    let data = columnar::write_part(
        "id",
        &refs,
        PartColumns::Tensors(vec![("y".into(), vec![vec![1.0]; rows])]),
        false,
    )
    .expect("part");
    let path = a.output_uri.strip_prefix("file://").expect("file uri");
    std::fs::create_dir_all(std::path::Path::new(path).parent().expect("dir")).expect("mkdir");
    std::fs::write(path, &data).expect("write");
    let facts = outputs::facts(&data);
    assert_eq!(
        facts.records, rows as u64,
        "rows are counted from the footer"
    );
    pb::Completed {
        shard: a.shard.clone(),
        records: rows as u64,
        output_uri: a.output_uri.clone(),
        sha256: facts.sha256,
        compute_seconds: 0.001,
        device: "cpu".into(),
        output_bytes: facts.bytes,
    }
}

async fn report(core: &Core<AnyStore>, who: &AgentHandle, c: pb::Completed) {
    core.handle(
        who,
        pb::AgentMessage {
            msg: Some(Up::Completed(c)),
        },
    )
    .await
    .expect("handled");
}

/// The row groups an Assign reads, per file: (uri, first, end).
fn row_groups(a: &pb::Assign) -> Vec<(String, u32, u32)> {
    let input = a.input.as_ref().expect("input");
    assert_eq!(input.format, "parquet");
    assert!(
        input.uri.is_empty(),
        "a dataset shard names its files in parts"
    );
    input
        .parts
        .iter()
        .map(|p| (p.uri.clone(), p.row_group_start, p.row_group_end))
        .collect()
}

async fn a_dataset_workload_runs_by_row_group_and_resumes_with_its_files(backend: Backend) {
    let url = backend.fresh_url().await;
    let out = tempfile::tempdir().expect("tmp");
    let output = format!("file://{}/", out.path().display());
    let first = Core::new(crate::store::open(&url).await.expect("open"));
    first.upsert_mesh("m", mesh(30)).await.expect("mesh");
    first.submit(submission(&output)).await.expect("submit");
    let (agent, mut rx) = attach(&first, "a", 2, &Principal::user("t")).await;
    let mut got = assigns(&mut rx);
    assert_eq!(got.len(), 2, "two slots");
    got.sort_by_key(|a| a.shard.as_ref().map(|s| s.index));
    // Three row groups, cut whole: one shard each.
    assert_eq!(
        row_groups(&got[0]),
        [("file:///data/a.parquet".to_string(), 0, 1)]
    );
    assert_eq!(
        row_groups(&got[1]),
        [("file:///data/a.parquet".to_string(), 1, 2)]
    );
    let input = got[0].input.as_ref().expect("input");
    assert_eq!(input.parts[0].version, "v-a.parquet");
    assert_eq!(
        input.parts[0].row_groups.len(),
        2,
        "the file's row groups as planned"
    );
    assert_eq!(
        input.columns,
        ["feats", "id"],
        "the columns the task reads, and the id"
    );
    assert_eq!(got[0].output_format, "parquet");
    assert!(
        got[0]
            .output_uri
            .ends_with("/_attempts/part-00000.a1.parquet")
    );

    // A report may not claim more records than its row groups hold (10 here).
    let mut greedy = parquet_part(&got[0], 11);
    report(&first, &agent, greedy.clone()).await;
    assert!(
        first
            .store()
            .charges("u1")
            .await
            .expect("charges")
            .is_empty(),
        "11 records from a 10-row row group are not charged"
    );
    greedy = parquet_part(&got[0], 10);
    report(&first, &agent, greedy).await;
    assert_eq!(first.store().charges("u1").await.expect("charges").len(), 1);
    assert!(out.path().join("part-00000.parquet").exists(), "committed");
    drop(first);

    // A new operator takes the run up from the store: the last shard reads b.parquet as
    // planned, without listing anything (file:///data/ does not even exist).
    let second = Core::new(crate::store::open(&url).await.expect("reopen"));
    second.upsert_mesh("m", mesh(30)).await.expect("mesh");
    assert_eq!(second.resume().await.expect("resume"), 1);
    let (agent, mut rx) = attach(&second, "a", 3, &Principal::user("t")).await;
    let mut got = assigns(&mut rx);
    got.sort_by_key(|a| a.shard.as_ref().map(|s| s.index));
    assert_eq!(got.len(), 2, "shards 1 and 2 are left");
    assert_eq!(
        row_groups(&got[1]),
        [("file:///data/b.parquet".to_string(), 0, 1)]
    );
    report(&second, &agent, parquet_part(&got[0], 5)).await;
    report(&second, &agent, parquet_part(&got[1], 7)).await;
    let s = &second.workloads().await[0];
    assert_eq!((s.phase, s.records), (WorkloadPhase::Succeeded, 22));
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join(outputs::MANIFEST)).expect("manifest"),
    )
    .expect("json");
    let parts: Vec<&str> = manifest["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .filter_map(|p| p["uri"].as_str())
        .collect();
    assert_eq!(parts.len(), 3);
    assert!(parts.iter().all(|u| u.ends_with(".parquet")), "{parts:?}");
}
both!(a_dataset_workload_runs_by_row_group_and_resumes_with_its_files);
