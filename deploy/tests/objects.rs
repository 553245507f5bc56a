//! Every object the chart renders, in every values case, types strictly (a misspelt or
//! misplaced template key fails here), and its pods keep this project's own rules, which no Pod
//! Security level has: a read-only root filesystem, the expected non-root users, a token only
//! where one is used. Pod Security itself ("restricted") is the API server's check, in
//! `apiserver.rs`.

mod common;

use common::matrix;
use infermesh_deploy::strict::{Typed, check};

#[test]
fn every_rendered_object_deserializes_into_its_type_without_unknown_fields() {
    let mut checked = 0;
    for (name, r) in matrix() {
        for o in &r.objects {
            check(o).unwrap_or_else(|e| panic!("{name}: {} ({}): {e:#}", o.id(), o.source));
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} objects checked");
}

#[test]
fn every_container_in_every_values_case_has_a_read_only_root_filesystem() {
    // This project's rule, beyond Pod Security "restricted" (which admits a writable root
    // filesystem, as apiserver.rs shows): so the API server cannot check it for us.
    let mut containers = 0;
    for (name, r) in matrix() {
        for o in &r.objects {
            let typed = check(o).unwrap_or_else(|e| panic!("{name}: {}: {e:#}", o.id()));
            let Some(spec) = typed.pod_spec() else {
                continue;
            };
            for c in spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
            {
                containers += 1;
                let sc = c.security_context.clone().unwrap_or_default();
                assert_eq!(
                    sc.read_only_root_filesystem,
                    Some(true),
                    "{name}: {} container {}",
                    o.id(),
                    c.name
                );
            }
        }
    }
    // The operator in every case and Postgres in most.
    assert!(containers >= 9 + 7, "only {containers} containers seen");
}

#[test]
fn pod_templates_run_as_the_expected_non_root_users() {
    for (name, r) in matrix() {
        for o in &r.objects {
            let typed = check(o).expect("typed");
            let Some(spec) = typed.pod_spec() else {
                continue;
            };
            let uid = match &typed {
                Typed::Deployment(_) => 65532,
                Typed::StatefulSet(_) => 999, // the official postgres image's user
                _ => panic!("{name}: unexpected workload {}", o.id()),
            };
            let pod = spec.security_context.clone().unwrap_or_default();
            assert_eq!(pod.run_as_user, Some(uid), "{name}: {}", o.id());
            assert_eq!(pod.run_as_non_root, Some(true), "{name}: {}", o.id());
            for c in &spec.containers {
                let sc = c.security_context.clone().unwrap_or_default();
                assert_eq!(sc.run_as_user, Some(uid), "{name}: {} {}", o.id(), c.name);
            }
        }
    }
}

#[test]
fn only_the_operator_mounts_a_service_account_token() {
    for (name, r) in matrix() {
        for o in &r.objects {
            let typed = check(o).expect("typed");
            let Some(spec) = typed.pod_spec() else {
                continue;
            };
            let expected = matches!(typed, Typed::Deployment(_));
            assert_eq!(
                spec.automount_service_account_token,
                Some(expected),
                "{name}: {}",
                o.id()
            );
        }
    }
}
