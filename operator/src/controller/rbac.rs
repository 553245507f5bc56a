//! The RBAC the operator needs, kept in `rbac.yaml` next to the code that makes the calls.
//! The controller tests check every request they see against it ([`Rules::allows`]), and the
//! chart's rendered Roles must grant exactly it: `cluster` in its ClusterRole, `namespace` in
//! the Role in the operator's namespace, `tenant` in one Role per tenant namespace the admin
//! lists (`tenants.namespaces`).

use serde::Deserialize;

/// The rules file, as committed.
pub const RBAC_YAML: &str = include_str!("rbac.yaml");

/// One RBAC rule.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// API groups (`""` is core).
    pub api_groups: Vec<String>,
    /// Resources (`workloads/status` for a subresource).
    pub resources: Vec<String>,
    /// The only objects the rule covers (empty: any). An entry in braces
    /// ([`TLS_SECRET`]) is a name the install chooses; the chart fills it in.
    #[serde(default)]
    pub resource_names: Vec<String>,
    /// Verbs.
    pub verbs: Vec<String>,
}

/// In a rule's `resourceNames`: the gRPC TLS Secret, whose name the install chooses
/// (`tls.existingSecret`, or `<fullname>-tls`).
pub const TLS_SECRET: &str = "{tlsSecret}";

/// Cluster-wide rules, rules in the operator's namespace, and rules in tenant namespaces.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// For the ClusterRole.
    pub cluster: Vec<Rule>,
    /// For the Role in the operator's namespace.
    pub namespace: Vec<Rule>,
    /// For the Role in each tenant namespace (where Workloads name their credentials Secret).
    pub tenant: Vec<Rule>,
}

/// What an API request asks to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// API group.
    pub group: String,
    /// Resource, with `/subresource`.
    pub resource: String,
    /// RBAC verb.
    pub verb: String,
    /// Namespace of a namespaced request.
    pub namespace: Option<String>,
    /// Name of the object a request names (`get`, `patch`, ... of one object).
    pub name: Option<String>,
}

/// The RBAC access an HTTP request to the API server needs (the mapping the API server's
/// request-info resolver makes). `None` for a path that is not a resource.
pub fn access(method: &str, path: &str, query: &str) -> Option<Access> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => ((*group).to_string(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name) = match rest {
        [resource] => ((*resource).to_string(), None),
        [resource, name] => ((*resource).to_string(), Some((*name).to_string())),
        [resource, name, sub] => (format!("{resource}/{sub}"), Some((*name).to_string())),
        _ => return None,
    };
    let named = name.is_some();
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method, named) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return None,
    };
    Some(Access {
        group,
        resource,
        verb: verb.into(),
        namespace,
        name,
    })
}

impl Rules {
    /// The committed rules.
    pub fn committed() -> Result<Self, serde_yaml::Error> {
        serde_yaml::from_str(RBAC_YAML)
    }

    /// Whether the rules allow `access` for an operator running in `own_namespace`.
    ///
    /// `tenant` rules hold in every namespace but the operator's own: which namespaces are
    /// tenants is the admin's list, unknown here (a request in one the admin did not list is
    /// refused by the API server). A rule with `resourceNames` holds only for a request that
    /// names one of them; a name in braces (the install's choice, e.g. [`TLS_SECRET`]) stands
    /// for any one name, so the name itself is checked by the control-plane suite against the
    /// chart's rendered Role, not here.
    pub fn allows(&self, a: &Access, own_namespace: &str) -> bool {
        let matches = |r: &Rule| {
            r.api_groups.contains(&a.group)
                && r.resources.contains(&a.resource)
                && r.verbs.contains(&a.verb)
                && (r.resource_names.is_empty()
                    || a.name.as_ref().is_some_and(|n| {
                        r.resource_names
                            .iter()
                            .any(|allowed| allowed == n || is_placeholder(allowed))
                    }))
        };
        let own = a.namespace.as_deref() == Some(own_namespace);
        self.cluster.iter().any(matches)
            || (own && self.namespace.iter().any(matches))
            || (a.namespace.is_some() && !own && self.tenant.iter().any(matches))
    }
}

/// Whether a `resourceNames` entry is a name the install chooses (`{tlsSecret}`).
pub fn is_placeholder(name: &str) -> bool {
    name.starts_with('{') && name.ends_with('}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_map_to_rbac_verbs_like_the_api_server_does() {
        let a = access(
            "PATCH",
            "/apis/infermesh.dev/v1alpha1/namespaces/t/workloads/w/status",
            "",
        )
        .expect("access");
        assert_eq!(
            (a.group.as_str(), a.resource.as_str(), a.verb.as_str()),
            ("infermesh.dev", "workloads/status", "patch")
        );
        assert_eq!(a.namespace.as_deref(), Some("t"));
        let a = access("GET", "/api/v1/nodes/n1", "").expect("access");
        assert_eq!(
            (a.group.as_str(), a.resource.as_str(), a.verb.as_str()),
            ("", "nodes", "get")
        );
        let a = access(
            "GET",
            "/apis/infermesh.dev/v1alpha1/agents",
            "watch=true&resourceVersion=1",
        )
        .expect("access");
        assert_eq!(a.verb, "watch");
        let a = access(
            "PUT",
            "/apis/coordination.k8s.io/v1/namespaces/im/leases/l",
            "",
        )
        .expect("access");
        assert_eq!(a.verb, "update");
    }

    #[test]
    fn the_committed_rules_allow_the_operators_calls_and_nothing_else() {
        let rules = Rules::committed().expect("rbac.yaml parses");
        let ok = |m, p| rules.allows(&access(m, p, "").expect("access"), "im");
        assert!(ok(
            "PATCH",
            "/apis/infermesh.dev/v1alpha1/meshes/gpus/status"
        ));
        assert!(ok(
            "PUT",
            "/apis/coordination.k8s.io/v1/namespaces/im/leases/leader"
        ));
        // Namespaced rules hold in the operator's namespace only.
        assert!(!ok(
            "PUT",
            "/apis/coordination.k8s.io/v1/namespaces/other/leases/leader"
        ));
        assert!(!ok("DELETE", "/api/v1/nodes/n1"));
        assert!(
            !ok("GET", "/api/v1/namespaces/im/secrets"),
            "secrets are never listed"
        );
    }

    #[test]
    fn secrets_are_read_by_name_only_the_tls_one_at_home_and_credentials_in_tenants() {
        let rules = Rules::committed().expect("rbac.yaml parses");
        let ok = |m, p, q| rules.allows(&access(m, p, q).expect("access"), "im");
        // At home: the TLS Secret, by name (the placeholder), and create.
        assert!(ok("GET", "/api/v1/namespaces/im/secrets/im-tls", ""));
        assert!(ok("POST", "/api/v1/namespaces/im/secrets", ""));
        // In a tenant namespace: get by name; never list, watch, create or change.
        assert!(ok("GET", "/api/v1/namespaces/team-a/secrets/s3-creds", ""));
        for (m, p, q) in [
            ("GET", "/api/v1/namespaces/team-a/secrets", ""),
            ("GET", "/api/v1/namespaces/team-a/secrets", "watch=true"),
            ("POST", "/api/v1/namespaces/team-a/secrets", ""),
            ("PATCH", "/api/v1/namespaces/team-a/secrets/s3-creds", ""),
            ("DELETE", "/api/v1/namespaces/team-a/secrets/s3-creds", ""),
            // Cluster-wide: nothing.
            ("GET", "/api/v1/secrets", ""),
            ("GET", "/api/v1/secrets", "watch=true"),
        ] {
            assert!(!ok(m, p, q), "{m} {p}?{q} is allowed");
        }
        // The tenant rule does not reach the operator's own namespace.
        let tenant_only = Rules {
            cluster: vec![],
            namespace: vec![],
            tenant: rules.tenant.clone(),
        };
        let a = access("GET", "/api/v1/namespaces/im/secrets/db", "").expect("access");
        assert!(!tenant_only.allows(&a, "im"));
        // No rule but the TLS one names objects, and none grants more than get on secrets
        // outside the operator's namespace.
        for r in rules.cluster.iter().chain(&rules.tenant) {
            if r.resources.iter().any(|x| x == "secrets") {
                assert_eq!(r.verbs, ["get"], "{r:?}");
            }
        }
        assert!(
            !rules
                .cluster
                .iter()
                .any(|r| r.resources.iter().any(|x| x == "secrets")),
            "no cluster-wide Secret access"
        );
        let named: Vec<&Rule> = rules
            .cluster
            .iter()
            .chain(&rules.namespace)
            .chain(&rules.tenant)
            .filter(|r| !r.resource_names.is_empty())
            .collect();
        assert_eq!(named.len(), 1, "{named:?}");
        assert_eq!(named[0].resource_names, [TLS_SECRET]);
        assert_eq!(named[0].verbs, ["get"]);
        // A rule with names holds for no collection request.
        let list = access("GET", "/api/v1/namespaces/im/secrets", "").expect("access");
        assert_eq!(list.name, None);
        assert!(!rules.allows(&list, "im"));
    }
}
