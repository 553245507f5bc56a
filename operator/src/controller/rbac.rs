//! The RBAC the operator needs, kept in `rbac.yaml` next to the code that makes the calls.
//! The controller tests check every request they see against it ([`Rules::allows`]), and the
//! chart's rendered Roles must grant exactly it.

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
    /// Verbs.
    pub verbs: Vec<String>,
}

/// Cluster-wide rules and rules in the operator's namespace.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// For the ClusterRole.
    pub cluster: Vec<Rule>,
    /// For the Role in the operator's namespace.
    pub namespace: Vec<Rule>,
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
    let (resource, named) = match rest {
        [resource] => ((*resource).to_string(), false),
        [resource, _name] => ((*resource).to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => return None,
    };
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
    })
}

impl Rules {
    /// The committed rules.
    pub fn committed() -> Result<Self, serde_yaml::Error> {
        serde_yaml::from_str(RBAC_YAML)
    }

    /// Whether the rules allow `access` for an operator running in `own_namespace`.
    pub fn allows(&self, a: &Access, own_namespace: &str) -> bool {
        let matches = |r: &Rule| {
            r.api_groups.contains(&a.group)
                && r.resources.contains(&a.resource)
                && r.verbs.contains(&a.verb)
        };
        self.cluster.iter().any(matches)
            || (a.namespace.as_deref() == Some(own_namespace) && self.namespace.iter().any(matches))
    }
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
}
