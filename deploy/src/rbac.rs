//! The operator's Kubernetes API calls as RBAC rules, read from
//! `operator/src/controller/rbac.yaml` (kept next to the controllers that make the calls), and
//! rules flattened to single grants so two rule lists compare regardless of how they group.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Context;
use k8s_openapi::api::rbac::v1::PolicyRule;
use serde::Deserialize;

use crate::strict::strict;
use crate::workspace;

/// `operator/src/controller/rbac.yaml`.
pub fn operator_rbac_path() -> PathBuf {
    workspace()
        .join("operator")
        .join("src")
        .join("controller")
        .join("rbac.yaml")
}

/// The operator's rules: cluster-wide, and in its own namespace.
#[derive(Clone, Debug, Deserialize)]
pub struct OperatorRbac {
    /// What goes in the ClusterRole.
    pub cluster: Vec<PolicyRule>,
    /// What goes in the Role in the operator's namespace.
    pub namespace: Vec<PolicyRule>,
}

/// Reads (strictly) `operator/src/controller/rbac.yaml`.
pub fn operator_rbac() -> anyhow::Result<OperatorRbac> {
    let path = operator_rbac_path();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_yaml::from_str(&text).with_context(|| format!("{} is not YAML", path.display()))?;
    strict(&value).with_context(|| format!("{}", path.display()))
}

/// One permission: an API group, a resource (with subresource), a verb, and the resource
/// name it is limited to (empty: any).
pub type Grant = (String, String, String, String);

/// Every single permission `rules` give.
pub fn grants(rules: &[PolicyRule]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for r in rules {
        let names: Vec<String> = match &r.resource_names {
            Some(n) if !n.is_empty() => n.clone(),
            _ => vec![String::new()],
        };
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    for n in &names {
                        out.insert((g.clone(), res.clone(), v.clone(), n.clone()));
                    }
                }
            }
        }
        for url in r.non_resource_urls.iter().flatten() {
            for v in &r.verbs {
                out.insert((
                    String::new(),
                    format!("url:{url}"),
                    v.clone(),
                    String::new(),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_flatten_rules_whatever_their_grouping() {
        let a: Vec<PolicyRule> = serde_yaml::from_str(
            "[{apiGroups: [apps], resources: [daemonsets, deployments], verbs: [get, list]}]",
        )
        .expect("rules");
        let b: Vec<PolicyRule> = serde_yaml::from_str(
            "[{apiGroups: [apps], resources: [deployments], verbs: [list, get]},
              {apiGroups: [apps], resources: [daemonsets], verbs: [get, list]}]",
        )
        .expect("rules");
        assert_eq!(grants(&a), grants(&b));
        assert_eq!(grants(&a).len(), 4);
    }

    #[test]
    fn the_operator_list_reads() {
        let rbac = operator_rbac().expect("rbac.yaml");
        assert!(!rbac.cluster.is_empty() && !rbac.namespace.is_empty());
    }
}
