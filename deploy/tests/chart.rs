//! The Helm chart, rendered and linted by the real Helm library (helm-python-sdk, pinned):
//! every values case renders, lint is clean, bad values fail with a message that says what to
//! fix, and each case renders what its values ask for.

mod common;

use std::collections::BTreeSet;

use common::{env, env_value, matrix, operator, rendered};
use infermesh_deploy::chart::{MATRIX, RenderError, lint, render, values_dir};
use infermesh_deploy::strict::{Typed, check};
use k8s_openapi::api::core::v1::Service;

#[test]
fn the_chart_renders_for_the_defaults_and_every_values_case() {
    for (name, r) in matrix() {
        let kinds: BTreeSet<&str> = r.objects.iter().map(|o| o.kind()).collect();
        for kind in [
            "CustomResourceDefinition",
            "Deployment",
            "Service",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        ] {
            assert!(kinds.contains(kind), "{name}: no {kind} in {kinds:?}");
        }
        assert_eq!(r.of_kind("CustomResourceDefinition").count(), 3, "{name}");
        assert!(!r.notes.is_empty(), "{name}: no NOTES");
    }
}

#[test]
fn every_values_file_is_in_the_matrix() {
    let used: BTreeSet<&str> = MATRIX.iter().flat_map(|v| v.iter().copied()).collect();
    for e in std::fs::read_dir(values_dir())
        .expect("values dir")
        .flatten()
    {
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with(".yaml") {
            assert!(used.contains(name.as_str()), "{name} is in no MATRIX case");
        }
    }
}

#[test]
fn helm_lint_is_clean_for_every_values_case() {
    for values in MATRIX {
        let report = lint(values).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            report.clean,
            "helm lint --strict with {values:?}:\n{}",
            report.output
        );
    }
}

#[test]
fn helm_lint_reports_values_that_break_the_schema() {
    let report = lint(&["bad/replicas-two.yaml"]).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!report.clean, "{}", report.output);
    assert!(report.output.contains("/replicas"), "{}", report.output);
}

fn rejection(values: &[&str]) -> String {
    match render(values) {
        Err(RenderError::Rejected(msg)) => msg,
        Err(RenderError::Setup(msg)) => panic!("{msg}"),
        Ok(_) => panic!("{values:?} rendered, but should have been refused"),
    }
}

#[test]
fn the_schema_rejects_bad_values_with_a_message_naming_the_key() {
    let cases: &[(&str, &[&str])] = &[
        (
            "bad/replicas-two.yaml",
            &["at '/replicas'", "got string, want integer"],
        ),
        (
            "bad/unknown-key.yaml",
            &["additional properties 'replicaCount' not allowed"],
        ),
        (
            "bad/bad-execution-provider.yaml",
            &["/mesh/executionProviders/1", "'cuda', 'tensorrt', 'cpu'"],
        ),
        (
            "bad/heartbeat-zero.yaml",
            &["/mesh/heartbeatSeconds", "minimum: got 0, want 1"],
        ),
        (
            "bad/bad-model-cache.yaml",
            &["/mesh/modelCache", "'EmptyDir', 'HostPath'"],
        ),
    ];
    for (file, expected) in cases {
        let msg = rejection(&[file]);
        assert!(
            msg.contains("values don't meet the specifications of the schema"),
            "{file}: {msg}"
        );
        for e in *expected {
            assert!(msg.contains(e), "{file}: {e:?} not in:\n{msg}");
        }
    }
}

#[test]
fn both_or_neither_database_is_refused_by_the_schema_naming_both_keys() {
    // Both set: the message says which of the two to clear.
    let both = rejection(&["bad/both-databases.yaml"]);
    assert!(both.contains("'oneOf' failed"), "{both}");
    assert!(
        both.contains("/database/existingSecret") && both.contains("/postgres/enabled"),
        "{both}"
    );
    assert!(both.contains("value must be false"), "{both}");
    // Neither: the message says which one to set.
    let neither = rejection(&["bad/no-database.yaml"]);
    assert!(
        neither.contains("/database/existingSecret") && neither.contains("minLength"),
        "{neither}"
    );
    assert!(neither.contains("value must be true"), "{neither}");
}

#[test]
fn without_the_schema_the_templates_refuse_both_or_neither_database_in_words() {
    use std::process::Command;
    let python = infermesh_deploy::tools::python().unwrap_or_else(|e| panic!("{e:#}"));
    let run = |file: &str| {
        let out = Command::new(&python)
            .arg(infermesh_deploy::workspace().join("scripts/helm.py"))
            .args(["render", "--skip-schema-validation"])
            .arg(values_dir().join(file))
            .output()
            .expect("helm.py runs");
        assert_eq!(out.status.code(), Some(1), "{file} rendered");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let both = run("bad/both-databases.yaml");
    assert!(
        both.contains("set either database.existingSecret (your own Postgres) or postgres.enabled=true (the bundled one), not both"),
        "{both}"
    );
    let neither = run("bad/no-database.yaml");
    assert!(
        neither
            .contains("no database: set database.existingSecret to a Secret with key DATABASE_URL"),
        "{neither}"
    );
}

#[test]
fn a_heartbeat_not_shorter_than_the_lease_is_refused_in_words() {
    let msg = rejection(&["bad/heartbeat-not-below-lease.yaml"]);
    assert!(
        msg.contains("mesh.heartbeatSeconds (10) must be shorter than mesh.leaseSeconds (10)"),
        "{msg}"
    );
}

#[test]
fn the_operator_runs_two_leader_elected_replicas_with_its_settings() {
    let r = rendered(&[]);
    let d = operator(&r);
    let spec = d.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.as_ref().expect("pod");
    assert_eq!(pod.service_account_name.as_deref(), Some("infermesh"));
    assert_eq!(pod.automount_service_account_token, Some(true));
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/infermesh/infermesh-operator:0.1.0")
    );
    assert_eq!(
        c.command.as_deref(),
        Some(&["infermesh".to_string(), "operator".to_string()][..])
    );
    let expected = [
        ("INFERMESH_GRPC_ADDR", "0.0.0.0:7443"),
        ("INFERMESH_HTTP_ADDR", "0.0.0.0:8080"),
        (
            "INFERMESH_GRPC_ENDPOINT",
            "https://infermesh-grpc.infermesh.svc:7443",
        ),
        ("INFERMESH_TLS_SECRET", "infermesh-tls"),
        ("INFERMESH_TLS_PROVISION", "true"),
        (
            "INFERMESH_AGENT_IMAGE",
            "ghcr.io/infermesh/infermesh-agent:0.1.0",
        ),
        ("INFERMESH_LEADER_LEASE", "infermesh-leader"),
        ("INFERMESH_LOG_JSON", "true"),
    ];
    for (name, value) in expected {
        assert_eq!(env_value(&d, name).as_deref(), Some(value), "{name}");
    }
    for (name, path) in [
        ("INFERMESH_POD_NAME", "metadata.name"),
        ("INFERMESH_NAMESPACE", "metadata.namespace"),
    ] {
        let field = env(&d, name)
            .and_then(|e| e.value_from)
            .and_then(|v| v.field_ref)
            .map(|f| f.field_path);
        assert_eq!(field.as_deref(), Some(path), "{name}");
    }
    let db = env(&d, "INFERMESH_DATABASE_URL")
        .and_then(|e| e.value_from)
        .and_then(|v| v.secret_key_ref)
        .expect("database URL from a Secret");
    assert_eq!(
        (db.name.as_str(), db.key.as_str()),
        ("infermesh-database", "DATABASE_URL")
    );

    let ports: Vec<(Option<&str>, i32)> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref(), p.container_port))
        .collect();
    assert_eq!(ports, [(Some("grpc"), 7443), (Some("http"), 8080)]);
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p
            .as_ref()
            .and_then(|p| p.http_get.clone())
            .expect("httpGet probe");
        (get.path.unwrap_or_default(), get.port)
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(
        probe(&c.liveness_probe),
        ("/healthz".to_string(), IntOrString::String("http".into()))
    );
    assert_eq!(
        probe(&c.readiness_probe),
        ("/readyz".to_string(), IntOrString::String("http".into()))
    );
    let limits = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap_or_default();
    assert_eq!(limits.get("memory").map(|q| q.0.as_str()), Some("512Mi"));
}

fn service(r: &infermesh_deploy::chart::Rendered, name: &str) -> Service {
    match check(
        r.get("Service", name)
            .unwrap_or_else(|| panic!("Service {name}")),
    )
    .expect("typed")
    {
        Typed::Service(s) => *s,
        _ => unreachable!("a Service types as one"),
    }
}

#[test]
fn agents_reach_only_the_leader_through_the_grpc_service() {
    let r = rendered(&[]);
    let grpc = service(&r, "infermesh-grpc");
    let spec = grpc.spec.expect("spec");
    let selector = spec.selector.expect("selector");
    assert_eq!(
        selector.get("infermesh.dev/leader").map(String::as_str),
        Some("true")
    );
    // And the operator's own selector labels, so no other pod can be picked.
    let d = operator(&r);
    let own = d.spec.expect("spec").selector.match_labels.expect("labels");
    for (k, v) in &own {
        assert_eq!(selector.get(k), Some(v), "{k}");
    }
    let port = &spec.ports.expect("ports")[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("grpc"), 7443));

    let metrics = service(&r, "infermesh-metrics").spec.expect("spec");
    assert!(
        !metrics
            .selector
            .expect("selector")
            .contains_key("infermesh.dev/leader")
    );
    let port = &metrics.ports.expect("ports")[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("http"), 8080));
}

#[test]
fn the_default_render_bundles_postgres_and_its_generated_secret() {
    let r = rendered(&[]);
    let sts = r
        .get("StatefulSet", "infermesh-postgres")
        .expect("StatefulSet");
    let Typed::StatefulSet(sts) = check(sts).expect("typed") else {
        unreachable!()
    };
    let spec = sts.spec.expect("spec");
    let pod = spec.template.spec.expect("pod");
    assert_eq!(pod.containers[0].image.as_deref(), Some("postgres:15"));
    let pgdata = pod.containers[0]
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "PGDATA")
        .and_then(|e| e.value.clone());
    assert_eq!(pgdata.as_deref(), Some("/var/lib/postgresql/data/pgdata"));
    let mounts: Vec<&str> = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(mounts.contains(&"/var/run/postgresql"), "{mounts:?}");
    let claims = spec.volume_claim_templates.expect("PVC template");
    let size = claims[0]
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map(|q| q.0.clone());
    assert_eq!(size.as_deref(), Some("8Gi"));
    assert!(r.get("Service", "infermesh-postgres").is_some());

    let secret = r
        .get("Secret", "infermesh-database")
        .expect("generated Secret");
    let Typed::Secret(secret) = check(secret).expect("typed") else {
        unreachable!()
    };
    let data = secret.data.expect("data");
    let password = String::from_utf8(data["POSTGRES_PASSWORD"].0.clone()).expect("utf-8");
    let url = String::from_utf8(data["DATABASE_URL"].0.clone()).expect("utf-8");
    assert_eq!(password.len(), 32);
    assert_eq!(
        url,
        format!(
            "postgres://infermesh:{password}@infermesh-postgres.infermesh.svc:5432/infermesh?sslmode=disable"
        )
    );
    assert_eq!(
        r.get("Secret", "infermesh-database")
            .and_then(|o| o.annotation("helm.sh/resource-policy")),
        Some("keep")
    );
}

#[test]
fn bundled_postgres_takes_its_storage_class_size_and_credentials_from_values() {
    let r = rendered(&["bundled-postgres.yaml"]);
    let sts = &r
        .get("StatefulSet", "infermesh-postgres")
        .expect("sts")
        .value;
    assert_eq!(
        sts.pointer("/spec/volumeClaimTemplates/0/spec/storageClassName"),
        Some(&serde_json::json!("local-path"))
    );
    assert_eq!(
        sts.pointer("/spec/volumeClaimTemplates/0/spec/resources/requests/storage"),
        Some(&serde_json::json!("20Gi"))
    );
    let Typed::Secret(secret) =
        check(r.get("Secret", "infermesh-database").expect("secret")).expect("typed")
    else {
        unreachable!()
    };
    let url =
        String::from_utf8(secret.data.expect("data")["DATABASE_URL"].0.clone()).expect("utf-8");
    assert_eq!(
        url,
        "postgres://mesh:s3cret-Pass.word@infermesh-postgres.infermesh.svc:5432/meshdb?sslmode=disable"
    );
}

#[test]
fn an_external_database_replaces_the_bundled_postgres() {
    let r = rendered(&["external-database.yaml"]);
    assert!(r.of_kind("StatefulSet").next().is_none());
    assert!(r.of_kind("Secret").next().is_none());
    let d = operator(&r);
    let db = env(&d, "INFERMESH_DATABASE_URL")
        .and_then(|e| e.value_from)
        .and_then(|v| v.secret_key_ref)
        .expect("from a Secret");
    assert_eq!(
        (db.name.as_str(), db.key.as_str()),
        ("infermesh-db-url", "DATABASE_URL")
    );
}

#[test]
fn an_existing_tls_secret_is_used_and_none_is_provisioned() {
    let r = rendered(&["existing-tls-secret.yaml"]);
    let d = operator(&r);
    assert_eq!(
        env_value(&d, "INFERMESH_TLS_SECRET").as_deref(),
        Some("infermesh-grpc-cert")
    );
    assert_eq!(
        env_value(&d, "INFERMESH_TLS_PROVISION").as_deref(),
        Some("false")
    );
}

#[test]
fn a_data_claim_reaches_the_agents_and_is_mounted_in_the_operator() {
    let r = rendered(&["data-claim.yaml"]);
    let d = operator(&r);
    assert_eq!(
        env_value(&d, "INFERMESH_DATA_CLAIM").as_deref(),
        Some("infermesh-data")
    );
    assert_eq!(
        env_value(&d, "INFERMESH_OBJECT_STORE_SECRET").as_deref(),
        Some("minio-credentials")
    );
    let pod = d.spec.and_then(|s| s.template.spec).expect("pod");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "data")
        .and_then(|v| v.persistent_volume_claim.clone())
        .expect("data volume");
    assert_eq!(volume.claim_name, "infermesh-data");
    let mount = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "data")
        .expect("data mount");
    assert_eq!(mount.mount_path, "/data");
    assert!(env(&operator(&rendered(&[])), "INFERMESH_DATA_CLAIM").is_none());
    // Object-store credentials: named to the operator (for the agents) and loaded into it.
    let from = pod.containers[0].env_from.clone().expect("envFrom");
    assert_eq!(
        from[0].secret_ref.as_ref().map(|r| r.name.as_str()),
        Some("minio-credentials")
    );
}

#[test]
fn the_default_mesh_follows_values_and_can_be_left_out() {
    let r = rendered(&[]);
    let mesh = r.get("Mesh", "gpus").expect("default Mesh");
    assert_eq!(
        mesh.value.pointer("/spec/nodeSelector"),
        Some(&serde_json::json!({"nvidia.com/gpu.present": "true"}))
    );
    // The default cache keeps the agents' pods at Pod Security "restricted".
    assert_eq!(
        mesh.value.pointer("/spec/agent/modelCache"),
        Some(&serde_json::json!("EmptyDir"))
    );
    assert!(r.notes.contains("kubectl get agents"), "{}", r.notes);
    assert!(!r.notes.contains("kubectl apply -f examples/mesh.yaml"));

    let cpu = rendered(&["cpu-only-mesh.yaml"]);
    let mesh = cpu.get("Mesh", "cpus").expect("cpus Mesh");
    assert_eq!(
        mesh.value.pointer("/spec/nodeSelector"),
        Some(&serde_json::json!({}))
    );
    assert_eq!(
        mesh.value.pointer("/spec/agent"),
        Some(
            &serde_json::json!({"slots": 4, "executionProviders": ["cpu"], "modelCache": "EmptyDir"})
        )
    );
    assert_eq!(
        mesh.value.pointer("/spec/budgets"),
        Some(&serde_json::json!([
            {"namespace": "team-a", "credits": 1_000_000.0},
            {"namespace": "team-b", "credits": 2500.5}
        ]))
    );
    let d = operator(&cpu);
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(3));
    assert_eq!(
        env_value(&d, "INFERMESH_AGENT_IMAGE").as_deref(),
        Some("registry.example.com/infermesh/agent:0.1.0-rc.1")
    );

    // No tenants unless asked for; with them, the Mesh confines each namespace and parses as
    // the operator's own type.
    assert!(
        r.get("Mesh", "gpus")
            .expect("mesh")
            .value
            .pointer("/spec/tenants")
            .is_none()
    );
    let tenanted = rendered(&["tenants.yaml"]);
    let mesh = tenanted.get("Mesh", "gpus").expect("default Mesh");
    assert_eq!(
        mesh.value.pointer("/spec/tenants"),
        Some(&serde_json::json!([
            {"namespace": "team-a", "read": ["s3://team-a/", "s3://shared/models/"], "write": ["s3://team-a/out/"]},
            {"namespace": "team-b", "read": ["s3://team-b/"], "write": ["s3://team-b/out/"]}
        ]))
    );
    let spec: infermesh_crds::MeshSpec =
        serde_json::from_value(mesh.value["spec"].clone()).expect("a MeshSpec");
    assert_eq!(spec.tenants.map(|t| t.len()), Some(2));

    let none = rendered(&["no-default-mesh.yaml"]);
    assert!(none.of_kind("Mesh").next().is_none());
    assert!(
        none.notes.contains("kubectl apply -f examples/mesh.yaml"),
        "{}",
        none.notes
    );
}

#[test]
fn notes_say_what_to_run_next() {
    let notes = &rendered(&[]).notes;
    for line in [
        "kubectl -n infermesh rollout status deployment/infermesh",
        "kubectl get agents",
        "kubectl get workloads -A",
        "kubectl describe workload",
        "infermesh ledger balance",
        "infermesh ledger verify",
    ] {
        assert!(notes.contains(line), "{line:?} not in NOTES:\n{notes}");
    }
}

#[test]
fn monitors_scrape_the_operator_metrics_service_and_the_agents_metrics_port() {
    let r = rendered(&["service-monitor.yaml"]);
    let Typed::ServiceMonitor(sm) = check(
        r.get("ServiceMonitor", "infermesh")
            .expect("ServiceMonitor"),
    )
    .expect("typed") else {
        unreachable!()
    };
    let ep = &sm.spec.endpoints[0];
    assert_eq!(
        (ep.port.as_str(), ep.path.as_deref(), ep.interval.as_deref()),
        ("http", Some("/metrics"), Some("15s"))
    );
    // The selector picks the -metrics Service, and only it.
    let selector = sm.spec.selector.match_labels.clone().expect("matchLabels");
    let matches = |name: &str| {
        let labels = service(&r, name).metadata.labels.unwrap_or_default();
        selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    assert!(matches("infermesh-metrics"));
    assert!(!matches("infermesh-grpc"));
    assert_eq!(
        sm.metadata
            .labels
            .unwrap_or_default()
            .get("release")
            .map(String::as_str),
        Some("kube-prometheus-stack")
    );

    let Typed::PodMonitor(pm) =
        check(r.get("PodMonitor", "infermesh-agents").expect("PodMonitor")).expect("typed")
    else {
        unreachable!()
    };
    let labels = pm.spec.selector.match_labels.expect("matchLabels");
    assert_eq!(
        labels.get("app.kubernetes.io/name").map(String::as_str),
        Some("infermesh-agent")
    );
    let ep = &pm.spec.pod_metrics_endpoints[0];
    assert_eq!(
        (ep.port.as_str(), ep.path.as_deref()),
        ("metrics", Some("/metrics"))
    );

    assert!(rendered(&[]).of_kind("ServiceMonitor").next().is_none());
}

#[test]
fn the_dashboard_configmap_carries_the_dashboard_for_the_grafana_sidecar() {
    let r = rendered(&["service-monitor.yaml"]);
    let cm = r
        .get("ConfigMap", "infermesh-dashboard")
        .expect("dashboard ConfigMap");
    assert_eq!(cm.namespace(), "monitoring");
    assert_eq!(
        cm.value.pointer("/metadata/labels/grafana_dashboard"),
        Some(&serde_json::json!("1"))
    );
    let json = cm
        .value
        .pointer("/data/infermesh.json")
        .and_then(|v| v.as_str())
        .expect("dashboard JSON");
    let file =
        std::fs::read_to_string(infermesh_deploy::chart_dir().join("dashboards/infermesh.json"))
            .expect("dashboard file");
    assert_eq!(json.trim_end(), file.trim_end());
    assert!(rendered(&[]).of_kind("ConfigMap").next().is_none());
}

#[test]
fn network_policies_admit_only_agents_on_grpc_and_reach_only_api_dns_and_postgres() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let typed = |r: &infermesh_deploy::chart::Rendered, name: &str| -> NetworkPolicy {
        match check(r.get("NetworkPolicy", name).expect("policy")).expect("typed") {
            Typed::NetworkPolicy(p) => *p,
            _ => unreachable!(),
        }
    };
    let port_of = |p: &k8s_openapi::api::networking::v1::NetworkPolicyPort| match &p.port {
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i)) => *i,
        other => panic!("port {other:?}"),
    };
    for (values, postgres) in [
        (&["network-policy.yaml"][..], true),
        (
            &["external-database.yaml", "network-policy.yaml"][..],
            false,
        ),
    ] {
        let r = rendered(values);
        let spec = typed(&r, "infermesh").spec.expect("spec");
        let ingress = spec.ingress.expect("ingress");
        let in_ports: BTreeSet<i32> = ingress
            .iter()
            .flat_map(|rule| rule.ports.iter().flatten().map(port_of))
            .collect();
        assert_eq!(in_ports, BTreeSet::from([7443, 8080]), "{values:?}");
        let grpc = ingress
            .iter()
            .find(|rule| rule.ports.iter().flatten().any(|p| port_of(p) == 7443))
            .expect("7443 rule");
        let from = grpc.from.as_ref().expect("7443 only from some pods");
        let agent = from[0]
            .pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone())
            .expect("agent pod selector");
        assert_eq!(
            agent.get("app.kubernetes.io/name").map(String::as_str),
            Some("infermesh-agent")
        );

        let egress = spec.egress.expect("egress");
        let out_ports: BTreeSet<i32> = egress
            .iter()
            .flat_map(|rule| rule.ports.iter().flatten().map(port_of))
            .collect();
        assert_eq!(
            out_ports,
            BTreeSet::from([53, 443, 5432, 6443, 9000]),
            "{values:?}"
        );
        let pg_rule = egress
            .iter()
            .find(|rule| rule.ports.iter().flatten().any(|p| port_of(p) == 5432))
            .expect("postgres rule");
        let to = pg_rule.to.as_ref().expect("to");
        if postgres {
            assert!(
                to[0].pod_selector.is_some(),
                "bundled Postgres by pod selector"
            );
            let pg = typed(&r, "infermesh-postgres").spec.expect("spec");
            assert_eq!(pg.egress, Some(vec![]), "Postgres makes no connections");
        } else {
            assert!(to[0].ip_block.is_some(), "external database by CIDR");
            assert!(r.get("NetworkPolicy", "infermesh-postgres").is_none());
        }
    }
    assert!(rendered(&[]).of_kind("NetworkPolicy").next().is_none());
}

mod agent_policy {
    //! The agents' NetworkPolicy, and the object-store rule it shares with the operator's.

    use std::collections::{BTreeMap, BTreeSet};

    use infermesh_deploy::chart::Rendered;
    use infermesh_deploy::strict::{Typed, check};
    use infermesh_operator::controller::mesh::{AGENT_METRICS_PORT, labels};
    use k8s_openapi::api::networking::v1::{
        NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort,
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use serde_json::json;

    use super::common::{operator, rendered};

    fn policy(r: &Rendered, name: &str) -> NetworkPolicy {
        match check(r.get("NetworkPolicy", name).expect("policy")).expect("typed") {
            Typed::NetworkPolicy(p) => *p,
            _ => unreachable!(),
        }
    }

    /// (protocol, port) of each port of a rule.
    fn ports(p: &Option<Vec<NetworkPolicyPort>>) -> BTreeSet<(String, i32)> {
        p.iter()
            .flatten()
            .map(|p| {
                let port = match &p.port {
                    Some(IntOrString::Int(i)) => *i,
                    other => panic!("port {other:?}"),
                };
                (p.protocol.clone().unwrap_or_else(|| "TCP".into()), port)
            })
            .collect()
    }

    fn tcp(ports: &[i32]) -> BTreeSet<(String, i32)> {
        ports.iter().map(|p| ("TCP".to_string(), *p)).collect()
    }

    fn peers(v: serde_json::Value) -> Vec<NetworkPolicyPeer> {
        serde_json::from_value(v).expect("peers")
    }

    /// What the object-store values of a case render to: its peers and its ports.
    struct ObjectStore {
        to: Vec<NetworkPolicyPeer>,
        ports: BTreeSet<(String, i32)>,
    }

    /// A values case, its object store, and who may reach the agents' metrics (None: anyone).
    type Case = (
        &'static [&'static str],
        ObjectStore,
        Option<Vec<NetworkPolicyPeer>>,
    );

    /// The cases with the agents' policy, and what each asks for.
    fn cases() -> Vec<Case> {
        vec![
            (
                &["network-policy.yaml"],
                ObjectStore {
                    to: peers(json!([{"ipBlock": {"cidr": "0.0.0.0/0"}}])),
                    ports: tcp(&[443]),
                },
                None,
            ),
            (
                &["external-database.yaml", "network-policy.yaml"],
                ObjectStore {
                    to: peers(json!([{"ipBlock": {"cidr": "0.0.0.0/0"}}])),
                    ports: tcp(&[443]),
                },
                None,
            ),
            (
                &["network-policy.yaml", "network-policy-object-store.yaml"],
                ObjectStore {
                    to: peers(json!([
                        {"ipBlock": {"cidr": "10.20.0.0/16", "except": ["10.20.0.1/32"]}},
                        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "minio"}},
                         "podSelector": {"matchLabels": {"app": "minio"}}}
                    ])),
                    ports: tcp(&[9000]),
                },
                Some(peers(json!([
                    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
                ]))),
            ),
        ]
    }

    #[test]
    fn agents_take_only_metrics_and_reach_only_the_operator_dns_and_the_object_store() {
        for (values, store, metrics_from) in cases() {
            let r = rendered(values);
            let agents = policy(&r, "infermesh-agents");
            assert_eq!(
                agents.metadata.namespace.as_deref(),
                Some(infermesh_deploy::NAMESPACE),
                "{values:?}: where the operator makes the agents"
            );
            let spec = agents.spec.expect("spec");
            // The agent pods, by the chart's agent selector labels, which the DaemonSet the
            // operator builds puts on every agent pod.
            let selector = spec
                .pod_selector
                .as_ref()
                .and_then(|s| s.match_labels.clone())
                .expect("matchLabels");
            assert_eq!(
                selector,
                BTreeMap::from([(
                    "app.kubernetes.io/name".to_string(),
                    "infermesh-agent".to_string()
                )]),
                "{values:?}"
            );
            let pod_labels = labels("gpus");
            for (k, v) in &selector {
                assert_eq!(
                    pod_labels.get(k),
                    Some(v),
                    "{values:?}: agent pods lack {k}"
                );
            }
            assert_eq!(
                spec.policy_types,
                Some(vec!["Ingress".to_string(), "Egress".to_string()]),
                "{values:?}"
            );

            // Ingress: the metrics port only, from anyone or from metricsFrom.
            let ingress = spec.ingress.expect("ingress");
            assert_eq!(ingress.len(), 1, "{values:?}: {ingress:?}");
            assert_eq!(
                ports(&ingress[0].ports),
                tcp(&[AGENT_METRICS_PORT]),
                "{values:?}"
            );
            assert_eq!(ingress[0].from, metrics_from, "{values:?}");

            // Egress: each rule has peers and ports (a rule without either allows everything),
            // and is the operator's gRPC, DNS, the object store, or agents.extraEgress.
            let egress = spec.egress.expect("egress");
            let operator_labels = operator(&r)
                .spec
                .expect("spec")
                .selector
                .match_labels
                .expect("operator selector");
            let mut seen = BTreeSet::new();
            for rule in &egress {
                let to = rule.to.clone().unwrap_or_default();
                assert!(!to.is_empty(), "{values:?}: a rule to anywhere: {rule:?}");
                assert!(
                    !ports(&rule.ports).is_empty(),
                    "{values:?}: a rule on every port: {rule:?}"
                );
                let kind = if to.len() == 1
                    && to[0].namespace_selector.is_none()
                    && to[0]
                        .pod_selector
                        .as_ref()
                        .and_then(|s| s.match_labels.as_ref())
                        == Some(&operator_labels)
                {
                    assert_eq!(ports(&rule.ports), tcp(&[7443]), "{values:?}");
                    "operator"
                } else if ports(&rule.ports)
                    == BTreeSet::from([("TCP".to_string(), 53), ("UDP".to_string(), 53)])
                {
                    let kube_system = to[0]
                        .namespace_selector
                        .as_ref()
                        .and_then(|s| s.match_labels.clone())
                        .unwrap_or_default();
                    assert_eq!(
                        kube_system
                            .get("kubernetes.io/metadata.name")
                            .map(String::as_str),
                        Some("kube-system"),
                        "{values:?}"
                    );
                    assert!(to[0].pod_selector.is_some(), "{values:?}: DNS pods only");
                    "dns"
                } else if to == store.to {
                    assert_eq!(ports(&rule.ports), store.ports, "{values:?}");
                    "object store"
                } else if to[0].ip_block.as_ref().map(|b| b.cidr.as_str()) == Some("10.30.0.5/32") {
                    assert_eq!(ports(&rule.ports), tcp(&[3128]), "{values:?}");
                    "agents.extraEgress"
                } else {
                    panic!("{values:?}: an agent egress rule of no known kind: {rule:?}")
                };
                assert!(seen.insert(kind), "{values:?}: two {kind} rules");
            }
            for kind in ["operator", "dns", "object store"] {
                assert!(seen.contains(kind), "{values:?}: no {kind} rule");
            }

            // No API server: not its port behind the Service, and not the operator's API
            // server rule (whose CIDRs and ports are networkPolicy.apiServer's).
            let all_ports: BTreeSet<i32> = egress
                .iter()
                .flat_map(|e| ports(&e.ports))
                .map(|(_, p)| p)
                .collect();
            assert!(!all_ports.contains(&6443), "{values:?}: {all_ports:?}");
            let op = policy(&r, "infermesh").spec.expect("spec");
            let api: Vec<&NetworkPolicyEgressRule> = op
                .egress
                .iter()
                .flatten()
                .filter(|e| ports(&e.ports).contains(&("TCP".to_string(), 6443)))
                .collect();
            assert_eq!(api.len(), 1, "{values:?}: the operator's API server rule");
            assert!(
                !egress.contains(api[0]),
                "{values:?}: agents reach the API server"
            );

            // The operator reaches the same object store with the same rule.
            let store_rules: Vec<&NetworkPolicyEgressRule> = op
                .egress
                .iter()
                .flatten()
                .filter(|e| e.to.as_ref() == Some(&store.to) && ports(&e.ports) == store.ports)
                .collect();
            assert_eq!(
                store_rules.len(),
                1,
                "{values:?}: the operator's object-store rule"
            );
            assert_eq!(ports(&store_rules[0].ports), store.ports, "{values:?}");
            // And the operator's own policy still admits the agents on 7443.
            let grpc_from = op
                .ingress
                .iter()
                .flatten()
                .find(|i| ports(&i.ports) == tcp(&[7443]))
                .and_then(|i| i.from.clone())
                .expect("7443 from the agents");
            assert_eq!(
                grpc_from[0]
                    .pod_selector
                    .as_ref()
                    .and_then(|s| s.match_labels.clone()),
                Some(selector),
                "{values:?}"
            );
        }
        assert!(
            rendered(&[])
                .get("NetworkPolicy", "infermesh-agents")
                .is_none()
        );
    }

    #[test]
    fn an_object_store_with_no_destination_renders_no_rule_rather_than_one_to_anywhere() {
        let file = std::env::temp_dir().join(format!(
            "infermesh-deploy-no-object-store-{}.yaml",
            std::process::id()
        ));
        std::fs::write(
            &file,
            "networkPolicy:\n  enabled: true\n  objectStore:\n    cidrs: []\n    extraTo: []\n",
        )
        .expect("write values");
        let r = rendered(&[file.to_str().expect("utf-8 path")]);
        let _ = std::fs::remove_file(&file);
        for name in ["infermesh", "infermesh-agents"] {
            let spec = policy(&r, name).spec.expect("spec");
            for rule in spec.egress.iter().flatten() {
                assert!(
                    rule.to.as_ref().is_some_and(|t| !t.is_empty()),
                    "{name}: a rule to anywhere: {rule:?}"
                );
                assert!(
                    !ports(&rule.ports).contains(&("TCP".to_string(), 443))
                        || ports(&rule.ports).contains(&("TCP".to_string(), 6443)),
                    "{name}: an object-store rule is left: {rule:?}"
                );
            }
        }
    }
}

#[test]
fn the_disruption_budget_keeps_a_standby_through_drains() {
    let r = rendered(&[]);
    let pdb = r.get("PodDisruptionBudget", "infermesh").expect("PDB");
    assert_eq!(
        pdb.value.pointer("/spec/minAvailable"),
        Some(&serde_json::json!(1))
    );
    let d = operator(&r);
    assert_eq!(
        pdb.value.pointer("/spec/selector/matchLabels"),
        Some(&serde_json::to_value(d.spec.expect("spec").selector.match_labels).expect("json"))
    );
}

#[test]
fn every_object_carries_the_standard_labels() {
    for (name, r) in matrix() {
        for o in &r.objects {
            if o.kind() == "CustomResourceDefinition" {
                continue; // crds/ is not templated: Helm installs it as generated
            }
            let labels = o
                .value
                .pointer("/metadata/labels")
                .cloned()
                .unwrap_or_default();
            for key in [
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/version",
                "app.kubernetes.io/managed-by",
                "helm.sh/chart",
            ] {
                assert!(
                    labels.get(key).is_some(),
                    "{name}: {} has no label {key}",
                    o.id()
                );
            }
        }
    }
}

#[test]
fn the_console_is_the_leaders_http_port_and_its_ingress_is_opt_in() {
    let defaults = rendered(&[]);
    let service = match check(
        defaults
            .get("Service", "infermesh-console")
            .expect("the console Service"),
    )
    .expect("typed")
    {
        Typed::Service(s) => *s,
        _ => unreachable!(),
    };
    let spec = service.spec.expect("spec");
    let selector = spec.selector.expect("selector");
    assert_eq!(
        selector.get("infermesh.dev/leader").map(String::as_str),
        Some("true"),
        "only the leader holds the live core: {selector:?}"
    );
    assert_eq!(spec.ports.expect("ports")[0].port, 8080);
    assert!(defaults.of_kind("Ingress").next().is_none());

    let with = rendered(&["console-ingress.yaml"]);
    let ingress =
        match check(with.get("Ingress", "infermesh-console").expect("Ingress")).expect("typed") {
            Typed::Ingress(i) => *i,
            _ => unreachable!(),
        };
    let spec = ingress.spec.expect("spec");
    assert_eq!(spec.ingress_class_name.as_deref(), Some("traefik"));
    assert_eq!(
        spec.tls.expect("tls")[0].secret_name.as_deref(),
        Some("infermesh-console-tls")
    );
    let rule = &spec.rules.expect("rules")[0];
    assert_eq!(rule.host.as_deref(), Some("infermesh.example.com"));
    let backend = rule.http.as_ref().expect("http").paths[0]
        .backend
        .service
        .clone()
        .expect("service backend");
    assert_eq!(backend.name, "infermesh-console");
    assert_eq!(backend.port.and_then(|p| p.name).as_deref(), Some("http"));
}
