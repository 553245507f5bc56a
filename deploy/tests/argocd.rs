//! The Argo CD Application syncs the chart from this repository with client-side apply, makes
//! the namespace (Pod Security "restricted", as the k3s overlay's), and orders the sync so the
//! CRDs exist before the Mesh that needs them.

mod common;

use common::rendered;
use infermesh_deploy::object::parse_documents;
use infermesh_deploy::strict::{Application, Typed, check};
use infermesh_deploy::{NAMESPACE, RELEASE, chart_dir, workspace};

fn application() -> Application {
    let path = workspace().join("k8s/argocd/application.yaml");
    let text = std::fs::read_to_string(&path).expect("application.yaml");
    let mut docs = parse_documents("application.yaml", &text).expect("yaml");
    assert_eq!(docs.len(), 1);
    match check(&docs.remove(0)).unwrap_or_else(|e| panic!("{e:#}")) {
        Typed::Application(a) => *a,
        _ => panic!("not an Application"),
    }
}

#[test]
fn the_application_points_at_the_chart_in_this_repository() {
    let app = application();
    let src = &app.spec.source;
    assert_eq!(src.repo_url, "https://github.com/infermesh/infermesh");
    let path = src.path.as_deref().expect("path");
    assert_eq!(workspace().join(path), chart_dir());
    let chart = std::fs::read_to_string(workspace().join(path).join("Chart.yaml"))
        .expect("a chart at the Application's path");
    assert!(chart.contains("\nname: infermesh\n"), "{chart}");
    let helm = src.helm.as_ref().expect("helm source");
    // The release name fixes every object name (and k8s/base's), so it is pinned.
    assert_eq!(helm.release_name.as_deref(), Some(RELEASE));
    assert_ne!(
        helm.skip_crds,
        Some(true),
        "the chart's CRDs must be synced"
    );
    assert_eq!(app.spec.destination.namespace.as_deref(), Some(NAMESPACE));
}

#[test]
fn the_application_creates_the_namespace_and_uses_client_side_apply() {
    let app = application();
    let options = app.spec.sync_policy.expect("syncPolicy").sync_options;
    assert!(
        options.iter().any(|o| o == "CreateNamespace=true"),
        "{options:?}"
    );
    assert!(
        !options.iter().any(|o| o.starts_with("ServerSideApply")),
        "{options:?}"
    );
}

#[test]
fn the_namespace_argo_creates_enforces_the_same_pod_security_as_the_k3s_overlays() {
    // tests/apiserver.rs shows the chart's pods admitted under these labels.
    let app = application();
    let managed = app
        .spec
        .sync_policy
        .and_then(|p| p.managed_namespace_metadata)
        .expect("managedNamespaceMetadata");
    let path = workspace().join("k8s/overlays/k3s/namespace.yaml");
    let text = std::fs::read_to_string(&path).expect("namespace.yaml");
    let ns = parse_documents("namespace.yaml", &text)
        .expect("yaml")
        .remove(0);
    for mode in ["enforce", "warn", "audit"] {
        let key = format!("pod-security.kubernetes.io/{mode}");
        let overlay = ns
            .value
            .pointer("/metadata/labels")
            .and_then(|l| l.get(&key))
            .and_then(|v| v.as_str());
        assert_eq!(overlay, Some("restricted"), "k3s overlay: {key}");
        assert_eq!(
            managed.labels.get(&key).map(String::as_str),
            overlay,
            "Argo CD: {key}"
        );
    }
}

#[test]
fn the_mesh_syncs_in_a_later_wave_than_the_crds_and_skips_its_dry_run() {
    let r = rendered(&[]);
    let wave = |o: &infermesh_deploy::object::Object| -> i64 {
        o.annotation("argocd.argoproj.io/sync-wave")
            .map(|w| w.parse().expect("integer wave"))
            .unwrap_or(0)
    };
    let crd_wave = r
        .of_kind("CustomResourceDefinition")
        .map(wave)
        .max()
        .expect("CRDs");
    for o in &r.objects {
        if o.api_version().starts_with("infermesh.dev/") {
            assert!(
                wave(o) > crd_wave,
                "{} syncs with or before the CRDs",
                o.id()
            );
            let options = o
                .annotation("argocd.argoproj.io/sync-options")
                .unwrap_or("");
            assert!(
                options.contains("SkipDryRunOnMissingResource=true"),
                "{}: {options:?}",
                o.id()
            );
        }
    }
    // Nothing else waits behind the Mesh, so wave 1 holds only custom resources.
    for o in &r.objects {
        if wave(o) > crd_wave {
            assert!(o.api_version().starts_with("infermesh.dev/"), "{}", o.id());
        }
    }
}

#[test]
fn argo_keeps_the_first_generated_database_password() {
    // Argo CD renders with `helm template`, where `lookup` finds nothing: each render makes a
    // new password, which must not replace the one Postgres was initialised with.
    let app = application();
    let r = rendered(&[]);
    let secret = r
        .get("Secret", "infermesh-database")
        .expect("generated Secret");
    let ignored = app.spec.ignore_differences.iter().any(|d| {
        d.kind == "Secret"
            && d.name.as_deref() == Some(secret.name())
            && d.json_pointers.iter().any(|p| p == "/data")
    });
    assert!(ignored, "{:?}", app.spec.ignore_differences);
    let options = app.spec.sync_policy.expect("syncPolicy").sync_options;
    assert!(
        options.iter().any(|o| o == "RespectIgnoreDifferences=true"),
        "{options:?}"
    );
}
