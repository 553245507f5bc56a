//! Tenancy in the core: a Mesh's `spec.tenants` checked at submission before any object is
//! touched, outputs that overlap a live workload's wait (`OutputInUse`), and a workload's
//! credentials and grant travelling in its Assigns — and never into the store.

use infermesh_crds::{MeshSpec, TenantSpec};
use infermesh_io::Credentials;

use super::tests::{Rx, attach, mesh, workload};
use super::*;
use crate::store::testing::Backend;
use crate::store::{AnyStore, EventFilter, Store};

/// A core with Mesh `m` whose tenants are `team-a` (reads `<root>/team-a/`, writes
/// `<root>/team-a/out/`) and `team-b` (likewise).
async fn tenanted(root: &std::path::Path) -> Core<AnyStore> {
    let core = Core::new(Backend::Sqlite.open().await);
    core.upsert_mesh("m", tenant_mesh(root))
        .await
        .expect("mesh");
    core
}

/// Mesh `m` whose tenants are `team-a` and `team-b`, each confined to `<root>/<ns>/`.
fn tenant_mesh(root: &std::path::Path) -> MeshSpec {
    let mut spec = mesh(30);
    let tenant = |ns: &str| TenantSpec {
        namespace: ns.into(),
        read: vec![format!("file://{}/{ns}/", root.display())],
        write: vec![format!("file://{}/{ns}/out/", root.display())],
    };
    spec.tenants = Some(vec![tenant("team-a"), tenant("team-b")]);
    spec
}

fn spec_in(root: &std::path::Path, ns_data: &str, output: &str) -> WorkloadSpec {
    let mut spec = workload(output, 3);
    spec.model.uri = format!("file://{}/{ns_data}/m.onnx", root.display());
    spec.input.uri = format!("file://{}/{ns_data}/in.jsonl", root.display());
    spec
}

fn submission(ns: &str, uid: &str, spec: WorkloadSpec) -> Submission {
    Submission {
        namespace: ns.into(),
        name: format!("w-{uid}"),
        uid: uid.into(),
        spec,
        input_size: 2048,
        input_version: None,
        input_files: None,
        credentials: None,
    }
}

fn assign_of(rx: &mut Rx) -> Option<pb::Assign> {
    while let Ok(msg) = rx.try_recv() {
        if let Ok(pb::OperatorMessage {
            msg: Some(pb::operator_message::Msg::Assign(a)),
        }) = msg
        {
            return Some(a);
        }
    }
    None
}

#[tokio::test]
async fn another_tenants_prefix_is_forbidden_in_every_field_and_nothing_is_touched() {
    let root = tempfile::tempdir().expect("tmp");
    let r = root.path();
    let core = tenanted(r).await;
    let b_out = format!("file://{}/team-b/out/run/", r.display());
    let a_out = format!("file://{}/team-a/out/run/", r.display());
    let a = |what: &str| format!("file://{}/team-a/{what}", r.display());
    let mut cases: Vec<(&str, WorkloadSpec)> = Vec::new();
    cases.push(("spec.input.uri", {
        let mut s = spec_in(r, "team-b", &b_out);
        s.input.uri = a("in.jsonl");
        s
    }));
    cases.push(("spec.model.uri", {
        let mut s = spec_in(r, "team-b", &b_out);
        s.model.uri = a("m.onnx");
        s
    }));
    cases.push(("spec.output.uri", spec_in(r, "team-b", &a_out)));
    cases.push(("spec.output.uri", {
        // Its own read prefix is not a write prefix.
        spec_in(
            r,
            "team-b",
            &format!("file://{}/team-b/elsewhere/", r.display()),
        )
    }));
    for (i, (field, spec)) in cases.into_iter().enumerate() {
        let err = core
            .submit(submission("team-b", &format!("u{i}"), spec))
            .await
            .expect_err(field);
        match err {
            CoreError::Invalid(e) => {
                assert_eq!(e.reason, "Forbidden", "{e}");
                assert!(e.message.starts_with(field), "{e}");
            }
            other => panic!("{field}: expected Forbidden, got {other}"),
        }
    }
    // Nothing was written: the output check (which lists and would create nothing, but
    // reads) never ran, no workload was stored, no folder appeared.
    assert!(!r.join("team-a").exists(), "team-a's prefix was touched");
    assert!(core.workloads().await.is_empty());
    let events = core
        .store()
        .events(&EventFilter::default())
        .await
        .expect("events");
    assert!(
        events.iter().all(|e| e.workload_uid.is_none()),
        "a refused workload left events: {events:?}"
    );
    // A namespace the Mesh does not list may use nothing.
    let err = core
        .submit(submission("team-c", "c1", spec_in(r, "team-c", &b_out)))
        .await
        .expect_err("unlisted");
    assert!(err.to_string().contains("may read nothing"), "{err}");
    // Its own locations are fine.
    core.submit(submission("team-b", "ok", spec_in(r, "team-b", &b_out)))
        .await
        .expect("its own prefixes");
}

#[tokio::test]
async fn dot_segments_and_symbolic_links_cannot_lead_out_of_a_prefix() {
    let root = tempfile::tempdir().expect("tmp");
    let r = root.path();
    let core = tenanted(r).await;
    std::fs::create_dir_all(r.join("team-a")).expect("mkdir");
    std::fs::create_dir_all(r.join("team-b/out")).expect("mkdir");
    std::fs::write(r.join("team-a/in.jsonl"), "{}\n").expect("write");
    std::os::unix::fs::symlink(r.join("team-a"), r.join("team-b/door")).expect("symlink");
    std::os::unix::fs::symlink(r.join("team-a"), r.join("team-b/out/door")).expect("symlink");
    let b_out = format!("file://{}/team-b/out/run/", r.display());
    let mut dotted = spec_in(r, "team-b", &b_out);
    dotted.input.uri = format!("file://{}/team-b/../team-a/in.jsonl", r.display());
    let err = core
        .submit(submission("team-b", "d", dotted))
        .await
        .expect_err("..");
    assert!(err.to_string().contains("`..` is not allowed"), "{err}");
    let mut linked = spec_in(r, "team-b", &b_out);
    linked.input.uri = format!("file://{}/team-b/door/in.jsonl", r.display());
    let err = core
        .submit(submission("team-b", "l", linked))
        .await
        .expect_err("link in");
    assert!(
        err.to_string().contains("Forbidden") && err.to_string().contains("symbolic link"),
        "{err}"
    );
    let out_link = format!("file://{}/team-b/out/door/run/", r.display());
    let err = core
        .submit(submission("team-b", "o", spec_in(r, "team-b", &out_link)))
        .await
        .expect_err("link out");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert!(!r.join("team-a/run").exists());
}

#[tokio::test]
async fn an_overlapping_output_waits_until_the_live_workload_finishes() {
    let core = Core::new(Backend::Sqlite.open().await);
    core.upsert_mesh("m", mesh(30)).await.expect("mesh");
    let out = tempfile::tempdir().expect("tmp");
    let base = format!("file://{}/", out.path().display());
    let first = core
        .submit(submission(
            "team-a",
            "u1",
            workload(&format!("{base}run/"), 3),
        ))
        .await
        .expect("first");
    // Below it, above it, or the same: another namespace's included.
    for (i, o) in [format!("{base}run/"), format!("{base}run/x/"), base.clone()]
        .iter()
        .enumerate()
    {
        // Its own namespace is told which workload; another is not told another's names.
        let ns = if i == 0 { "team-a" } else { "team-b" };
        let err = core
            .submit(submission(ns, &format!("w{i}"), workload(o, 3)))
            .await
            .expect_err("overlap");
        match err {
            CoreError::OutputInUse(m) => {
                assert_eq!(m.contains(&first), i == 0, "{m}");
                assert_eq!(m.contains("another namespace"), i != 0, "{m}");
                assert!(m.starts_with("spec.output.uri"), "{m}");
            }
            other => panic!("expected OutputInUse, got {other}"),
        }
    }
    // A sibling is not an overlap.
    core.submit(submission(
        "team-b",
        "s",
        workload(&format!("{base}run-2/"), 3),
    ))
    .await
    .expect("sibling");
    // Once the first has finished, the location is free again.
    core.cancel(&first, "Cancelled", "test")
        .await
        .expect("cancel");
    core.submit(submission(
        "team-b",
        "later",
        workload(&format!("{base}run/x/"), 3),
    ))
    .await
    .expect("after the first finished");
}

#[tokio::test]
async fn credentials_and_the_grant_travel_in_the_assign_and_a_resumed_run_waits_for_them() {
    let root = tempfile::tempdir().expect("tmp");
    let r = root.path();
    let db = r.join("state.db");
    let url = format!("sqlite://{}?mode=rwc", db.display());
    let secret = "wJalrXUtnFEMI-team-b-secret";
    let creds = Credentials {
        access_key_id: "AKIA-TEAM-B".into(),
        secret_access_key: secret.into(),
        ..Default::default()
    };
    let b_out = format!("file://{}/team-b/out/run/", r.display());
    let mut spec = spec_in(r, "team-b", &b_out);
    spec.credentials = Some(infermesh_crds::CredentialsRef {
        secret_ref: infermesh_crds::SecretRef {
            name: "team-b-s3".into(),
        },
    });
    let key = {
        let core = Core::new(crate::store::open(&url).await.expect("store"));
        core.upsert_mesh("m", tenant_mesh(r)).await.expect("mesh");
        // Named but not handed over: refused, nothing stored.
        let err = core
            .submit(submission("team-b", "u0", spec.clone()))
            .await
            .expect_err("no credentials");
        assert!(err.to_string().contains("CredentialsNotFound"), "{err}");
        let mut sub = submission("team-b", "u1", spec.clone());
        sub.credentials = Some(creds.clone());
        let key = core.submit(sub).await.expect("submit");
        let (_a, mut rx) = attach(&core, "a", 1, &Principal::user("t")).await;
        let assign = assign_of(&mut rx).expect("an assign");
        let c = assign.credentials.as_ref().expect("credentials");
        assert_eq!(c.access_key_id, "AKIA-TEAM-B");
        assert_eq!(c.secret_access_key, secret);
        let access = assign.access.as_ref().expect("access");
        assert_eq!(
            access.write,
            vec![format!("file://{}/team-b/out/", r.display())]
        );
        // Nothing the store holds carries the secret.
        let stored = core.store().active_workloads().await.expect("stored");
        let text = format!("{:?}", stored.iter().map(|s| &s.record).collect::<Vec<_>>());
        assert!(
            !text.contains(secret) && text.contains("team-b-s3"),
            "{text}"
        );
        key
    };
    let raw = std::fs::read(&db).expect("db file");
    assert!(
        !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the secret reached the database file"
    );
    // Taken up after a restart: no dispatch until the credentials come again.
    let core = Core::new(crate::store::open(&url).await.expect("store"));
    core.upsert_mesh("m", tenant_mesh(r)).await.expect("mesh");
    assert_eq!(core.resume().await.expect("resume"), 1);
    let (_a, mut rx) = attach(&core, "a", 1, &Principal::user("t")).await;
    assert!(
        assign_of(&mut rx).is_none(),
        "dispatched without credentials"
    );
    assert!(
        core.set_credentials(&key, Some(creds.clone()))
            .await
            .expect("set")
    );
    let assign = assign_of(&mut rx).expect("dispatched once handed over");
    assert_eq!(
        assign.credentials.map(|c| c.secret_access_key).as_deref(),
        Some(secret)
    );
    // The same credentials again (every reconcile hands them over) change nothing.
    assert!(!core.set_credentials(&key, Some(creds)).await.expect("set"));
}
