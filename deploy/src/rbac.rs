//! The operator's Kubernetes API calls as RBAC rules, read from
//! `operator/src/controller/rbac.yaml` (kept next to the controllers that make the calls), and
//! rules flattened to single grants so two rule lists compare regardless of how they group.
//! A `resourceNames` entry in braces (`{tlsSecret}`) is a name the install chooses; the chart
//! fills it in, and [`OperatorRbac::resolved`] does the same for a comparison.

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

/// The operator's rules: cluster-wide, in its own namespace, and in each tenant namespace.
#[derive(Clone, Debug, Deserialize)]
pub struct OperatorRbac {
    /// What goes in the ClusterRole.
    pub cluster: Vec<PolicyRule>,
    /// What goes in the Role in the operator's namespace.
    pub namespace: Vec<PolicyRule>,
    /// What goes in the Role in each namespace of the chart's `tenants.namespaces`.
    pub tenant: Vec<PolicyRule>,
}

/// The `resourceNames` placeholder of the gRPC TLS Secret.
pub const TLS_SECRET: &str = "{tlsSecret}";

impl OperatorRbac {
    /// The rules with every `resourceNames` placeholder replaced by its name in `names`
    /// (placeholder, name); a placeholder not in `names` is an error.
    pub fn resolved(&self, names: &[(&str, &str)]) -> anyhow::Result<Self> {
        let resolve = |rules: &[PolicyRule]| -> anyhow::Result<Vec<PolicyRule>> {
            rules
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    if let Some(list) = r.resource_names.as_mut() {
                        for n in list.iter_mut() {
                            if n.starts_with('{') {
                                let (_, to) = names
                                    .iter()
                                    .find(|(p, _)| p == n)
                                    .with_context(|| format!("no name for {n}"))?;
                                *n = (*to).to_string();
                            }
                        }
                    }
                    Ok(r)
                })
                .collect()
        };
        Ok(Self {
            cluster: resolve(&self.cluster)?,
            namespace: resolve(&self.namespace)?,
            tenant: resolve(&self.tenant)?,
        })
    }
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
        assert!(!rbac.cluster.is_empty() && !rbac.namespace.is_empty() && !rbac.tenant.is_empty());
    }

    #[test]
    fn placeholders_resolve_to_the_installs_names() {
        let rbac = operator_rbac().expect("rbac.yaml");
        assert!(rbac.resolved(&[]).is_err(), "{TLS_SECRET} is used");
        let named = rbac.resolved(&[(TLS_SECRET, "x-tls")]).expect("resolves");
        let names: Vec<Grant> = grants(&named.namespace)
            .into_iter()
            .filter(|g| !g.3.is_empty())
            .collect();
        assert_eq!(
            names,
            [(
                String::new(),
                "secrets".to_string(),
                "get".to_string(),
                "x-tls".to_string()
            )]
        );
    }
}
