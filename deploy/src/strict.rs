//! Strict typing of rendered objects: each kind deserializes into its `k8s-openapi` type (the
//! CRDs into `CustomResourceDefinition`, infermesh resources into `infermesh-crds` types,
//! Prometheus Operator monitors and the Argo CD Application into the structs below), and every
//! field the type does not know is an error naming its path — so a misspelt or misplaced key
//! in a template (`readOnlyRootFilesytem`, `ports` one level too deep) fails, where the API
//! server would drop it silently or refuse it at install.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PodSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::object::Object;

/// Deserializes `value` into `T`, failing on any field `T` does not know (listed by path).
pub fn strict<T: DeserializeOwned>(value: &serde_json::Value) -> anyhow::Result<T> {
    let (parsed, unknown) =
        infermesh_crds::manifest::deserialize_strict(value).map_err(|e| anyhow!("{e}"))?;
    if !unknown.is_empty() {
        bail!("unknown field(s): {}", unknown.join(", "));
    }
    Ok(parsed)
}

/// An object in its type.
#[derive(Clone, Debug)]
pub enum Typed {
    /// apiextensions.k8s.io/v1 CustomResourceDefinition.
    CustomResourceDefinition(Box<CustomResourceDefinition>),
    /// apps/v1 Deployment.
    Deployment(Box<Deployment>),
    /// apps/v1 StatefulSet.
    StatefulSet(Box<StatefulSet>),
    /// apps/v1 DaemonSet.
    DaemonSet(Box<DaemonSet>),
    /// batch/v1 Job.
    Job(Box<Job>),
    /// batch/v1 CronJob.
    CronJob(Box<CronJob>),
    /// v1 Service.
    Service(Box<Service>),
    /// v1 Secret.
    Secret(Box<Secret>),
    /// v1 ConfigMap.
    ConfigMap(Box<ConfigMap>),
    /// v1 ServiceAccount.
    ServiceAccount(Box<ServiceAccount>),
    /// v1 Namespace.
    Namespace(Box<Namespace>),
    /// rbac.authorization.k8s.io/v1 ClusterRole.
    ClusterRole(Box<ClusterRole>),
    /// rbac.authorization.k8s.io/v1 ClusterRoleBinding.
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    /// rbac.authorization.k8s.io/v1 Role.
    Role(Box<Role>),
    /// rbac.authorization.k8s.io/v1 RoleBinding.
    RoleBinding(Box<RoleBinding>),
    /// networking.k8s.io/v1 NetworkPolicy.
    NetworkPolicy(Box<NetworkPolicy>),
    /// networking.k8s.io/v1 Ingress.
    Ingress(Box<Ingress>),
    /// policy/v1 PodDisruptionBudget.
    PodDisruptionBudget(Box<PodDisruptionBudget>),
    /// infermesh.dev/v1alpha1 Mesh.
    Mesh(Box<infermesh_crds::Mesh>),
    /// infermesh.dev/v1alpha1 Workload.
    Workload(Box<infermesh_crds::Workload>),
    /// monitoring.coreos.com/v1 ServiceMonitor.
    ServiceMonitor(Box<ServiceMonitor>),
    /// monitoring.coreos.com/v1 PodMonitor.
    PodMonitor(Box<PodMonitor>),
    /// argoproj.io/v1alpha1 Application.
    Application(Box<Application>),
}

impl Typed {
    /// The pod template of a workload object, if it has one.
    pub fn pod_spec(&self) -> Option<&PodSpec> {
        match self {
            Self::Deployment(d) => d.spec.as_ref()?.template.spec.as_ref(),
            Self::StatefulSet(s) => s.spec.as_ref()?.template.spec.as_ref(),
            Self::DaemonSet(d) => d.spec.as_ref()?.template.spec.as_ref(),
            Self::Job(j) => j.spec.as_ref()?.template.spec.as_ref(),
            Self::CronJob(c) => c
                .spec
                .as_ref()?
                .job_template
                .spec
                .as_ref()?
                .template
                .spec
                .as_ref(),
            _ => None,
        }
    }
}

/// Types `obj` by its `apiVersion` and `kind`, strictly. An object of a kind this list does not
/// know is an error too: a new kind in the chart needs its type added here.
pub fn check(obj: &Object) -> anyhow::Result<Typed> {
    let v = &obj.value;
    let typed = match (obj.api_version(), obj.kind()) {
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            Typed::CustomResourceDefinition(strict(v)?)
        }
        ("apps/v1", "Deployment") => Typed::Deployment(strict(v)?),
        ("apps/v1", "StatefulSet") => Typed::StatefulSet(strict(v)?),
        ("apps/v1", "DaemonSet") => Typed::DaemonSet(strict(v)?),
        ("batch/v1", "Job") => Typed::Job(strict(v)?),
        ("batch/v1", "CronJob") => Typed::CronJob(strict(v)?),
        ("v1", "Service") => Typed::Service(strict(v)?),
        ("v1", "Secret") => Typed::Secret(strict(v)?),
        ("v1", "ConfigMap") => Typed::ConfigMap(strict(v)?),
        ("v1", "ServiceAccount") => Typed::ServiceAccount(strict(v)?),
        ("v1", "Namespace") => Typed::Namespace(strict(v)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => Typed::ClusterRole(strict(v)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Typed::ClusterRoleBinding(strict(v)?)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => Typed::Role(strict(v)?),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => Typed::RoleBinding(strict(v)?),
        ("networking.k8s.io/v1", "NetworkPolicy") => Typed::NetworkPolicy(strict(v)?),
        ("networking.k8s.io/v1", "Ingress") => Typed::Ingress(strict(v)?),
        ("policy/v1", "PodDisruptionBudget") => Typed::PodDisruptionBudget(strict(v)?),
        ("infermesh.dev/v1alpha1", "Mesh") => Typed::Mesh(strict(v)?),
        ("infermesh.dev/v1alpha1", "Workload") => Typed::Workload(strict(v)?),
        ("monitoring.coreos.com/v1", "ServiceMonitor") => Typed::ServiceMonitor(strict(v)?),
        ("monitoring.coreos.com/v1", "PodMonitor") => Typed::PodMonitor(strict(v)?),
        ("argoproj.io/v1alpha1", "Application") => Typed::Application(strict(v)?),
        (api, kind) => bail!("no type known for {api} {kind}: add it to deploy/src/strict.rs"),
    };
    Ok(typed)
}

// --- Prometheus Operator (monitoring.coreos.com/v1): the fields this chart uses -----------

/// A ServiceMonitor (the subset of fields this project uses; any other is reported unknown).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitor {
    /// Standard metadata.
    pub metadata: ObjectMeta,
    /// What to scrape.
    pub spec: ServiceMonitorSpec,
}

/// `ServiceMonitor.spec`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    /// Services to scrape.
    pub selector: LabelSelector,
    /// Namespaces of those Services.
    #[serde(default)]
    pub namespace_selector: Option<NamespaceSelector>,
    /// Service ports to scrape.
    pub endpoints: Vec<Endpoint>,
    /// Label whose value names the job.
    #[serde(default)]
    pub job_label: Option<String>,
}

/// `PodMonitor`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMonitor {
    /// Standard metadata.
    pub metadata: ObjectMeta,
    /// What to scrape.
    pub spec: PodMonitorSpec,
}

/// `PodMonitor.spec`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMonitorSpec {
    /// Pods to scrape.
    pub selector: LabelSelector,
    /// Namespaces of those pods.
    #[serde(default)]
    pub namespace_selector: Option<NamespaceSelector>,
    /// Pod ports to scrape.
    pub pod_metrics_endpoints: Vec<Endpoint>,
    /// Label whose value names the job.
    #[serde(default)]
    pub job_label: Option<String>,
}

/// `namespaceSelector`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceSelector {
    /// All namespaces.
    #[serde(default)]
    pub any: Option<bool>,
    /// These namespaces.
    #[serde(default)]
    pub match_names: Vec<String>,
}

/// A scrape endpoint (`endpoints[]` / `podMetricsEndpoints[]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Port name.
    pub port: String,
    /// HTTP path.
    #[serde(default)]
    pub path: Option<String>,
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Scrape interval (`30s`).
    #[serde(default)]
    pub interval: Option<String>,
    /// Scrape timeout.
    #[serde(default)]
    pub scrape_timeout: Option<String>,
    /// Keep the target's labels over the scraper's on conflict.
    #[serde(default)]
    pub honor_labels: Option<bool>,
}

// --- Argo CD (argoproj.io/v1alpha1 Application): the fields this project uses ------------

/// An Argo CD Application.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Application {
    /// Standard metadata.
    pub metadata: ObjectMeta,
    /// What to sync where.
    pub spec: ApplicationSpec,
}

/// `Application.spec`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationSpec {
    /// Argo CD project.
    pub project: String,
    /// Where the manifests come from.
    pub source: ApplicationSource,
    /// The cluster and namespace to sync to.
    pub destination: ApplicationDestination,
    /// When and how to sync.
    #[serde(default)]
    pub sync_policy: Option<SyncPolicy>,
    /// Differences not to act on.
    #[serde(default)]
    pub ignore_differences: Vec<IgnoreDifference>,
    /// Sync history kept.
    #[serde(default)]
    pub revision_history_limit: Option<i64>,
    /// Free-form information shown in the UI.
    #[serde(default)]
    pub info: Vec<BTreeMap<String, String>>,
}

/// `spec.source`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationSource {
    /// Git repository.
    #[serde(rename = "repoURL")]
    pub repo_url: String,
    /// Branch, tag or commit.
    #[serde(default)]
    pub target_revision: Option<String>,
    /// Directory in the repository.
    #[serde(default)]
    pub path: Option<String>,
    /// Helm options.
    #[serde(default)]
    pub helm: Option<HelmSource>,
}

/// `spec.source.helm`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HelmSource {
    /// Release name (defaults to the Application's name).
    #[serde(default)]
    pub release_name: Option<String>,
    /// Values files in the chart directory.
    #[serde(default)]
    pub value_files: Vec<String>,
    /// Values inline, as an object.
    #[serde(default)]
    pub values_object: Option<serde_json::Value>,
    /// Leave the chart's `crds/` out.
    #[serde(default)]
    pub skip_crds: Option<bool>,
    /// Validate values against values.schema.json (false skips).
    #[serde(default)]
    pub skip_schema_validation: Option<bool>,
}

/// `spec.destination`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationDestination {
    /// API server URL.
    #[serde(default)]
    pub server: Option<String>,
    /// Cluster name (instead of `server`).
    #[serde(default)]
    pub name: Option<String>,
    /// Namespace of namespaced objects without one.
    #[serde(default)]
    pub namespace: Option<String>,
}

/// `spec.syncPolicy`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncPolicy {
    /// Sync on every change.
    #[serde(default)]
    pub automated: Option<Automated>,
    /// `CreateNamespace=true`, `ServerSideApply=true`, ...
    #[serde(default)]
    pub sync_options: Vec<String>,
    /// Retries of a failed sync.
    #[serde(default)]
    pub retry: Option<Retry>,
    /// Labels and annotations of the namespace `CreateNamespace=true` makes.
    #[serde(default)]
    pub managed_namespace_metadata: Option<ManagedNamespaceMetadata>,
}

/// `spec.syncPolicy.managedNamespaceMetadata`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagedNamespaceMetadata {
    /// Labels of the namespace.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations of the namespace.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// `spec.syncPolicy.automated`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Automated {
    /// Delete what left the source.
    #[serde(default)]
    pub prune: Option<bool>,
    /// Undo changes made in the cluster.
    #[serde(default)]
    pub self_heal: Option<bool>,
    /// Allow a sync that would leave the app empty.
    #[serde(default)]
    pub allow_empty: Option<bool>,
}

/// `spec.syncPolicy.retry`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    /// Attempts.
    #[serde(default)]
    pub limit: Option<i64>,
    /// Backoff between attempts.
    #[serde(default)]
    pub backoff: Option<Backoff>,
}

/// `spec.syncPolicy.retry.backoff`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    /// First wait (`5s`).
    #[serde(default)]
    pub duration: Option<String>,
    /// Growth factor.
    #[serde(default)]
    pub factor: Option<i64>,
    /// Longest wait.
    #[serde(default)]
    pub max_duration: Option<String>,
}

/// `spec.ignoreDifferences[]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IgnoreDifference {
    /// API group (empty for core).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind.
    pub kind: String,
    /// Object name.
    #[serde(default)]
    pub name: Option<String>,
    /// Object namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// JSON pointers to ignore.
    #[serde(default)]
    pub json_pointers: Vec<String>,
    /// jq paths to ignore.
    #[serde(default)]
    pub jq_path_expressions: Vec<String>,
    /// Field managers whose fields to ignore.
    #[serde(default)]
    pub managed_fields_managers: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::parse_documents;

    fn one(text: &str) -> Object {
        parse_documents("t.yaml", text)
            .expect("yaml")
            .pop()
            .expect("one")
    }

    const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers:
        - name: c
          image: i
          securityContext: {readOnlyRootFilesystem: true}
"#;

    #[test]
    fn a_correct_object_types() {
        let typed = check(&one(DEPLOYMENT)).expect("types");
        assert!(typed.pod_spec().is_some());
    }

    #[test]
    fn a_misspelt_field_deep_in_a_template_is_named() {
        let bad = DEPLOYMENT.replace("readOnlyRootFilesystem", "readOnlyRootFilesytem");
        let err = check(&one(&bad)).expect_err("typo").to_string();
        assert!(
            err.contains("spec.template.spec.containers.0.securityContext.readOnlyRootFilesytem"),
            "{err}"
        );
    }

    #[test]
    fn a_wrong_type_is_an_error() {
        let bad = DEPLOYMENT.replace("{readOnlyRootFilesystem: true}", "{runAsUser: \"x\"}");
        assert!(check(&one(&bad)).is_err());
    }

    #[test]
    fn an_unknown_kind_is_an_error() {
        let err = check(&one("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"))
            .expect_err("unknown")
            .to_string();
        assert!(err.contains("no type known for v1 Pod"), "{err}");
    }

    #[test]
    fn a_misspelt_monitor_field_is_named() {
        let sm = "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: m}\nspec:\n  selector: {matchLabels: {a: b}}\n  endpoints: [{port: http, pathh: /metrics}]\n";
        let err = check(&one(sm)).expect_err("typo").to_string();
        assert!(err.contains("spec.endpoints.0.pathh"), "{err}");
    }
}
