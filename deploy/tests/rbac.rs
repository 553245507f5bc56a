//! The RBAC the chart renders grants exactly the calls listed in
//! `operator/src/controller/rbac.yaml` (kept next to the code that makes them): every verb the
//! operator uses and nothing beyond. Agents get no RBAC at all.

mod common;

use std::collections::BTreeSet;

use common::{matrix, operator, rendered};
use infermesh_deploy::rbac::{grants, operator_rbac, operator_rbac_path};
use infermesh_deploy::strict::{Typed, check};
use infermesh_deploy::{NAMESPACE, chart_dir};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role, Subject};

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

fn role(r: &infermesh_deploy::chart::Rendered) -> Role {
    let roles: Vec<_> = r.of_kind("Role").collect();
    assert_eq!(roles.len(), 1, "one Role");
    assert_eq!(
        roles[0].namespace(),
        NAMESPACE,
        "the Role is in the release namespace"
    );
    match check(roles[0]).expect("typed") {
        Typed::Role(c) => *c,
        _ => unreachable!(),
    }
}

#[test]
fn the_cluster_role_and_role_grant_exactly_the_operators_calls() {
    let wanted = operator_rbac().unwrap_or_else(|e| panic!("{e:#}"));
    for (name, r) in matrix() {
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
    }
}

#[test]
fn no_rule_uses_a_wildcard() {
    let r = rendered(&[]);
    let rules = cluster_role(&r)
        .rules
        .unwrap_or_default()
        .into_iter()
        .chain(role(&r).rules.unwrap_or_default());
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
            } else {
                role(&r).metadata.name
            };
            assert_eq!(Some(role_ref.name), target, "{name}: {}", o.id());
        }
        assert_eq!(bindings, 2, "{name}");
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
