//! Every object the chart renders, in every values case, types strictly (a misspelt or
//! misplaced template key fails here), and every pod template meets the Pod Security
//! Standards' "restricted" profile with a read-only root filesystem.

mod common;

use common::matrix;
use infermesh_deploy::podsecurity::restricted_violations;
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
fn every_pod_template_in_every_values_case_meets_the_restricted_pod_security_profile() {
    let mut pods = 0;
    for (name, r) in matrix() {
        for o in &r.objects {
            let typed = check(o).unwrap_or_else(|e| panic!("{name}: {}: {e:#}", o.id()));
            if let Some(spec) = typed.pod_spec() {
                pods += 1;
                let v = restricted_violations(spec);
                assert!(v.is_empty(), "{name}: {}:\n  {}", o.id(), v.join("\n  "));
            }
        }
    }
    // The operator in every case and Postgres in most.
    assert!(pods >= 9 + 7, "only {pods} pod templates seen");
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
