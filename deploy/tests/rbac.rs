//! The RBAC the chart renders grants exactly the calls listed in
//! `operator/src/controller/rbac.yaml` (kept next to the code that makes them): every verb the
//! operator uses and nothing beyond. Secrets: no cluster-wide access; in the release namespace
//! get on the TLS Secret only (by name) and create; in each tenant namespace
//! (`tenants.namespaces`) get, by a Role of its own. Agents get no RBAC at all.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{env_value, matrix, operator, rendered};
use infermesh_deploy::chart::Rendered;
use infermesh_deploy::rbac::{Grant, TLS_SECRET, grants, operator_rbac, operator_rbac_path};
use infermesh_deploy::strict::{Typed, check};
use infermesh_deploy::{NAMESPACE, chart_dir};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role, RoleBinding, Subject};

/// The tenant namespaces of `tenants.yaml`.
const TENANTS: [&str; 2] = ["team-a", "team-b"];

#[test]
fn the_charts_copy_of_the_operators_rbac_list_is_byte_identical() {
    let source = std::fs::read_to_string(operator_rbac_path()).expect("operator rbac.yaml");
    let copy = std::fs::read_to_string(chart_dir().join("files/rbac.yaml")).expect("chart copy");
    assert!(
        copy == source,
        "charts/infermesh/files/rbac.yaml differs from operator/src/controller/rbac.yaml: \
         run scripts/render-k8s.sh"
    );
}

fn cluster_role(r: &infermesh_deploy::chart::Rendered) -> ClusterRole {
    let roles: Vec<_> = r.of_kind("ClusterRole").collect();
    assert_eq!(roles.len(), 1, "one ClusterRole");
    match check(roles[0]).expect("typed") {
        Typed::ClusterRole(c) => *c,
        _ => unreachable!(),
    }
}

/// The Role in the release namespace.
fn role(r: &Rendered) -> Role {
    let roles: Vec<_> = r
        .of_kind("Role")
        .filter(|o| o.namespace() == NAMESPACE)
        .collect();
    assert_eq!(roles.len(), 1, "one Role in the release namespace");
    match check(roles[0]).expect("typed") {
        Typed::Role(c) => *c,
        _ => unreachable!(),
    }
}

/// The Roles and RoleBindings outside the release namespace (the tenants'), by namespace.
fn tenant_objects(r: &Rendered) -> BTreeMap<String, (Vec<Role>, Vec<RoleBinding>)> {
    let mut out: BTreeMap<String, (Vec<Role>, Vec<RoleBinding>)> = BTreeMap::new();
    for o in &r.objects {
        if o.namespace() == NAMESPACE || o.namespace().is_empty() {
            continue;
        }
        match check(o).expect("typed") {
            Typed::Role(role) => out.entry(o.namespace().into()).or_default().0.push(*role),
            Typed::RoleBinding(b) => out.entry(o.namespace().into()).or_default().1.push(*b),
            _ => {}
        }
    }
    out
}

/// Whether a render is one with `tenants.yaml`.
fn with_tenants(name: &str) -> bool {
    name.split(" + ").any(|v| v == "tenants.yaml")
}

#[test]
fn the_cluster_role_and_role_grant_exactly_the_operators_calls() {
    let listed = operator_rbac().unwrap_or_else(|e| panic!("{e:#}"));
    for (name, r) in matrix() {
        // The TLS Secret the Role names is the one the operator is told to read.
        let tls = env_value(&operator(&r), "INFERMESH_TLS_SECRET").expect("INFERMESH_TLS_SECRET");
        let wanted = listed
            .resolved(&[(TLS_SECRET, &tls)])
            .unwrap_or_else(|e| panic!("{e:#}"));
        let cluster = grants(&cluster_role(&r).rules.unwrap_or_default());
        let expected = grants(&wanted.cluster);
        assert_eq!(
            cluster,
            expected,
            "{name}: ClusterRole grants beyond the list: {:?}; lacks: {:?}",
            cluster.difference(&expected).collect::<Vec<_>>(),
            expected.difference(&cluster).collect::<Vec<_>>()
        );
        let namespaced = grants(&role(&r).rules.unwrap_or_default());
        let expected = grants(&wanted.namespace);
        assert_eq!(
            namespaced,
            expected,
            "{name}: Role grants beyond the list: {:?}; lacks: {:?}",
            namespaced.difference(&expected).collect::<Vec<_>>(),
            expected.difference(&namespaced).collect::<Vec<_>>()
        );
        let expected = grants(&wanted.tenant);
        for (ns, (roles, _)) in tenant_objects(&r) {
            for role in roles {
                let tenant = grants(&role.rules.unwrap_or_default());
                assert_eq!(
                    tenant,
                    expected,
                    "{name}: tenant Role in {ns} grants beyond the list: {:?}; lacks: {:?}",
                    tenant.difference(&expected).collect::<Vec<_>>(),
                    expected.difference(&tenant).collect::<Vec<_>>()
                );
            }
        }
    }
}

fn secret_grants(rules: &[k8s_openapi::api::rbac::v1::PolicyRule]) -> BTreeSet<Grant> {
    grants(rules)
        .into_iter()
        .filter(|(g, res, _, _)| g.is_empty() && (res == "secrets" || res == "*"))
        .collect()
}

fn grant(verb: &str, name: &str) -> Grant {
    (String::new(), "secrets".into(), verb.into(), name.into())
}

#[test]
fn secrets_are_readable_only_by_name_in_tenant_namespaces_and_the_tls_one_at_home() {
    for (name, r) in matrix() {
        // Cluster-wide: nothing at all on Secrets.
        let cluster = cluster_role(&r).rules.unwrap_or_default();
        for rule in &cluster {
            assert!(
                !rule
                    .resources
                    .iter()
                    .flatten()
                    .any(|res| res.contains("secret")),
                "{name}: the ClusterRole mentions secrets: {rule:?}"
            );
        }
        // The release namespace: get the TLS Secret (by its name), and create it.
        let tls = env_value(&operator(&r), "INFERMESH_TLS_SECRET").expect("INFERMESH_TLS_SECRET");
        assert_eq!(
            secret_grants(&role(&r).rules.unwrap_or_default()),
            BTreeSet::from([grant("get", &tls), grant("create", "")]),
            "{name}: Secrets in the release namespace"
        );
        // Tenant namespaces: exactly those of tenants.namespaces, one Role and one RoleBinding
        // each, get (no name: each Workload names its own) and nothing else.
        let tenants = tenant_objects(&r);
        let expected: BTreeSet<&str> = if with_tenants(&name) {
            TENANTS.into()
        } else {
            BTreeSet::new()
        };
        assert_eq!(
            tenants.keys().map(String::as_str).collect::<BTreeSet<_>>(),
            expected,
            "{name}: namespaces with a tenant Role"
        );
        for (ns, (roles, bindings)) in &tenants {
            assert_eq!(roles.len(), 1, "{name}: Roles in {ns}");
            assert_eq!(bindings.len(), 1, "{name}: RoleBindings in {ns}");
            let rules = roles[0].rules.clone().unwrap_or_default();
            assert_eq!(
                grants(&rules),
                BTreeSet::from([grant("get", "")]),
                "{name}: the tenant Role in {ns}"
            );
            let b = &bindings[0];
            assert_eq!(
                (b.role_ref.kind.as_str(), Some(&b.role_ref.name)),
                ("Role", roles[0].metadata.name.as_ref()),
                "{name}: the RoleBinding in {ns} binds its Role"
            );
        }
    }
}

#[test]
fn the_release_namespace_is_refused_as_a_tenant_and_tenant_names_are_checked() {
    use infermesh_deploy::chart::{RenderError, render};
    let refused = |file: &str| match render(&[file]) {
        Err(RenderError::Rejected(m)) => m,
        Err(RenderError::Setup(m)) => panic!("{m}"),
        Ok(_) => panic!("{file} rendered"),
    };
    let m = refused("bad/tenant-release-namespace.yaml");
    assert!(
        m.contains("tenants.namespaces lists the release namespace infermesh"),
        "{m}"
    );
    let m = refused("bad/tenant-bad-namespace.yaml");
    assert!(m.contains("/tenants/namespaces/0"), "{m}");
}

#[test]
fn no_rule_uses_a_wildcard() {
    let r = rendered(&["tenants.yaml"]);
    let rules = cluster_role(&r)
        .rules
        .unwrap_or_default()
        .into_iter()
        .chain(role(&r).rules.unwrap_or_default())
        .chain(
            tenant_objects(&r)
                .into_values()
                .flat_map(|(roles, _)| roles)
                .flat_map(|role| role.rules.unwrap_or_default()),
        );
    for rule in rules {
        let words = rule
            .api_groups
            .iter()
            .flatten()
            .chain(rule.resources.iter().flatten())
            .chain(&rule.verbs);
        for w in words {
            assert_ne!(w, "*", "wildcard in {rule:?}");
        }
    }
}

#[test]
fn the_bindings_give_the_roles_to_the_operators_service_account_only() {
    for (name, r) in matrix() {
        let d = operator(&r);
        let sa = d
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.service_account_name.clone())
            .expect("operator service account");
        let only = vec![Subject {
            kind: "ServiceAccount".into(),
            name: sa.clone(),
            namespace: Some(NAMESPACE.into()),
            api_group: None,
        }];
        let mut bindings = 0;
        for o in &r.objects {
            let (subjects, role_ref) = match check(o).expect("typed") {
                Typed::ClusterRoleBinding(b) => (b.subjects, b.role_ref),
                Typed::RoleBinding(b) => (b.subjects, b.role_ref),
                _ => continue,
            };
            bindings += 1;
            assert_eq!(subjects.as_ref(), Some(&only), "{name}: {}", o.id());
            let target = if o.kind() == "ClusterRoleBinding" {
                cluster_role(&r).metadata.name
            } else if o.namespace() == NAMESPACE {
                role(&r).metadata.name
            } else {
                tenant_objects(&r)[o.namespace()].0[0].metadata.name.clone()
            };
            assert_eq!(Some(role_ref.name), target, "{name}: {}", o.id());
        }
        let tenants = if with_tenants(&name) {
            TENANTS.len()
        } else {
            0
        };
        assert_eq!(bindings, 2 + tenants, "{name}");
    }
}

#[test]
fn agents_get_no_service_account_and_no_rbac_from_the_chart() {
    // The operator makes one ServiceAccount per Mesh (infermesh-agent-<mesh>) for its agents;
    // agents call no Kubernetes API, so nothing binds them to anything.
    for (name, r) in matrix() {
        let accounts: BTreeSet<&str> = r.of_kind("ServiceAccount").map(|o| o.name()).collect();
        assert_eq!(accounts, BTreeSet::from(["infermesh"]), "{name}");
        for o in &r.objects {
            let text = serde_json::to_string(&o.value).expect("json");
            if matches!(o.kind(), "RoleBinding" | "ClusterRoleBinding") {
                assert!(
                    !text.contains("infermesh-agent"),
                    "{name}: {} binds an agent",
                    o.id()
                );
            }
        }
    }
}
