//! The Mesh controller: a Mesh becomes the core's pool (pricing, budgets, lease), one agent
//! DaemonSet and one agent ServiceAccount in the operator's namespace; its status counts the
//! agents and their capacity.
//!
//! `build_*` and [`mesh_status`] are pure; [`reconcile`] applies them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use infermesh_crds::{ExecutionProvider, Mesh, MeshStatus, ModelCache};
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    EnvVarSource, HTTPGetAction, HostPathVolumeSource, KeyToPath, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ProjectedVolumeSource, SeccompProfile, SecretEnvSource, SecretVolumeSource, SecurityContext,
    ServiceAccount, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};

use super::conditions::condition;
use super::{Config, Context, Error, FIELD_MANAGER, MESH_FINALIZER, MeshObserved, Result};
use crate::core::progress::AgentSummary;

/// Where the agent finds its projected ServiceAccount token.
pub const TOKEN_PATH: &str = "/var/run/secrets/infermesh/token";
/// Where the agent finds the CA of the operator's gRPC certificate.
pub const CA_PATH: &str = "/var/run/infermesh/tls/ca.crt";
/// The model cache inside the agent container: an emptyDir, or with `modelCache: HostPath`
/// the node's `/var/cache/infermesh/<mesh>`.
pub const CACHE_PATH: &str = "/var/cache/infermesh";
/// The agents' metrics and health port.
pub const AGENT_METRICS_PORT: i32 = 9091;
/// The agent's user: non-root.
pub const AGENT_UID: i64 = 65532;

/// Name of a Mesh's DaemonSet and ServiceAccount.
pub fn agent_name(mesh: &str) -> String {
    format!("infermesh-agent-{mesh}")
}

/// The user name the agents of `mesh` authenticate as.
pub fn agent_user(namespace: &str, mesh: &str) -> String {
    format!("system:serviceaccount:{namespace}:{}", agent_name(mesh))
}

/// Labels of everything made for a Mesh.
pub fn labels(mesh: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "infermesh-agent".into()),
        ("app.kubernetes.io/instance".into(), mesh.into()),
        (
            "app.kubernetes.io/managed-by".into(),
            "infermesh-operator".into(),
        ),
        ("infermesh.dev/mesh".into(), mesh.into()),
    ])
}

fn owned_meta(mesh: &Mesh, config: &Config) -> ObjectMeta {
    let name = mesh.name_any();
    ObjectMeta {
        name: Some(agent_name(&name)),
        namespace: Some(config.namespace.clone()),
        labels: Some(labels(&name)),
        owner_references: mesh.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The agents' ServiceAccount: no RBAC, no mounted API token (agents call no Kubernetes
/// API; they get a projected token of audience `infermesh` for the operator only).
pub fn build_service_account(mesh: &Mesh, config: &Config) -> ServiceAccount {
    ServiceAccount {
        metadata: owned_meta(mesh, config),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

fn runtime_default() -> Option<SeccompProfile> {
    Some(SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    })
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn provider_name(p: &ExecutionProvider) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The agent DaemonSet of a Mesh.
pub fn build_daemonset(mesh: &Mesh, config: &Config) -> DaemonSet {
    let name = mesh.name_any();
    let spec = &mesh.spec;
    let providers: Vec<String> = spec
        .agent
        .execution_providers
        .iter()
        .map(provider_name)
        .collect();
    let mut env_vars = vec![
        env("INFERMESH_OPERATOR", config.grpc_endpoint.clone()),
        env("INFERMESH_MESH", name.clone()),
        EnvVar {
            name: "INFERMESH_NODE".into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "spec.nodeName".into(),
                    api_version: None,
                }),
                ..EnvVarSource::default()
            }),
        },
        env("INFERMESH_TOKEN_FILE", TOKEN_PATH),
        env("INFERMESH_CA_CERT", CA_PATH),
        env("INFERMESH_SLOTS", spec.agent.slots.to_string()),
        env("INFERMESH_EXECUTION_PROVIDERS", providers.join(",")),
        env("INFERMESH_MODEL_CACHE", CACHE_PATH),
        env(
            "INFERMESH_METRICS_ADDR",
            format!("0.0.0.0:{AGENT_METRICS_PORT}"),
        ),
        env("INFERMESH_LOG_JSON", "true"),
    ];
    if !providers.is_empty() && !providers.iter().any(|p| p == "cpu") {
        env_vars.push(env("INFERMESH_REQUIRE_GPU", "true"));
    }
    if let Some(threads) = spec.agent.intra_op_threads {
        env_vars.push(env("INFERMESH_INTRA_OP_THREADS", threads.to_string()));
    }
    let mut mounts = vec![
        VolumeMount {
            name: "token".into(),
            mount_path: "/var/run/secrets/infermesh".into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tls".into(),
            mount_path: "/var/run/infermesh/tls".into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "model-cache".into(),
            mount_path: CACHE_PATH.into(),
            ..VolumeMount::default()
        },
        // The root filesystem is read-only; ONNX Runtime and the runtime may want a /tmp.
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        Volume {
            name: "token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(super::TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(3600),
                        path: "token".into(),
                    }),
                    ..VolumeProjection::default()
                }]),
                default_mode: None,
            }),
            ..Volume::default()
        },
        Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(config.tls_secret.clone()),
                items: Some(vec![KeyToPath {
                    key: "ca.crt".into(),
                    path: "ca.crt".into(),
                    mode: None,
                }]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    volumes.push(match spec.agent.model_cache {
        ModelCache::EmptyDir => Volume {
            name: "model-cache".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        ModelCache::HostPath => Volume {
            name: "model-cache".into(),
            host_path: Some(HostPathVolumeSource {
                path: format!("{CACHE_PATH}/{name}"),
                type_: Some("DirectoryOrCreate".into()),
            }),
            ..Volume::default()
        },
    });
    if let Some(claim) = &config.data_claim {
        mounts.push(VolumeMount {
            name: "data".into(),
            mount_path: "/data".into(),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: None,
            }),
            ..Volume::default()
        });
    }
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    };
    let restricted = SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(AGENT_UID),
        run_as_group: Some(AGENT_UID),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: runtime_default(),
        ..SecurityContext::default()
    };
    let image = spec
        .agent
        .image
        .clone()
        .unwrap_or_else(|| config.agent_image.clone());
    // A hostPath directory is made by the kubelet as root; one small init step hands it to
    // the agent's user (CHOWN only, nothing else), so the agent itself runs non-root. Running
    // as root and the hostPath volume are what put such a pod at the "privileged" level. An
    // emptyDir needs no such step: fsGroup gives it to the agent's group.
    let prepare_cache = (spec.agent.model_cache == ModelCache::HostPath).then(|| Container {
        name: "prepare-cache".into(),
        image: Some(image.clone()),
        command: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("chown {AGENT_UID}:{AGENT_UID} {CACHE_PATH}"),
        ]),
        volume_mounts: Some(vec![VolumeMount {
            name: "model-cache".into(),
            mount_path: CACHE_PATH.into(),
            ..VolumeMount::default()
        }]),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: Some(vec!["CHOWN".into()]),
            }),
            seccomp_profile: runtime_default(),
            ..SecurityContext::default()
        }),
        ..Container::default()
    });
    let agent = Container {
        name: "agent".into(),
        image: Some(image),
        env: Some(env_vars),
        env_from: config.object_store_secret.as_ref().map(|name| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: name.clone(),
                    optional: Some(false),
                }),
                ..EnvFromSource::default()
            }]
        }),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: AGENT_METRICS_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        liveness_probe: Some(probe("/healthz", 20)),
        readiness_probe: Some(probe("/readyz", 10)),
        resources: spec.agent.resources.clone(),
        volume_mounts: Some(mounts),
        security_context: Some(restricted),
        ..Container::default()
    };
    let labels = labels(&name);
    let selector = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "infermesh-agent".to_string(),
        ),
        ("infermesh.dev/mesh".to_string(), name.clone()),
    ]);
    DaemonSet {
        metadata: owned_meta(mesh, config),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector),
                match_expressions: None,
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: None,
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(agent_name(&name)),
                    automount_service_account_token: Some(false),
                    node_selector: Some(spec.node_selector.clone()),
                    tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
                    init_containers: prepare_cache.map(|c| vec![c]),
                    containers: vec![agent],
                    volumes: Some(volumes),
                    security_context: Some(PodSecurityContext {
                        seccomp_profile: runtime_default(),
                        fs_group: (spec.agent.model_cache == ModelCache::EmptyDir)
                            .then_some(AGENT_UID),
                        ..PodSecurityContext::default()
                    }),
                    // Shards in flight are requeued anyway; give running ones a moment.
                    termination_grace_period_seconds: Some(30),
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        }),
        status: None,
    }
}

/// The status of a Mesh from its agents (as the core knows them), its DaemonSet, and whether
/// the operator's store answers (`StoreAvailable`: during an outage nothing is dispatched).
pub fn mesh_status(
    name: &str,
    previous: Option<&MeshStatus>,
    observed: &MeshObserved,
    agents: &[AgentSummary],
    store_available: bool,
) -> MeshStatus {
    let mine: Vec<&AgentSummary> = agents.iter().filter(|a| a.mesh == name).collect();
    let ready: Vec<&&AgentSummary> = mine
        .iter()
        .filter(|a| a.connected && !a.unschedulable)
        .collect();
    let total = (mine.len() as u32).max(observed.desired.unwrap_or(0).max(0) as u32);
    let prev = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let ready_count = ready.len() as u32;
    let cond = if ready_count > 0 {
        condition(
            prev,
            "Ready",
            true,
            "AgentsReady",
            format!("{ready_count} of {total} agents ready"),
            observed.generation,
        )
    } else if total == 0 {
        condition(
            prev,
            "Ready",
            false,
            "NoMatchingNodes",
            "no node matches the Mesh's nodeSelector (label GPU nodes, e.g. \
             `kubectl label node <node> nvidia.com/gpu.present=true`, or change spec.nodeSelector)",
            observed.generation,
        )
    } else {
        condition(
            prev,
            "Ready",
            false,
            "NoAgentsReady",
            format!(
                "0 of {total} agents ready: see `kubectl get pods -l infermesh.dev/mesh={name}`"
            ),
            observed.generation,
        )
    };
    let store = if store_available {
        condition(
            prev,
            "StoreAvailable",
            true,
            "StoreAnswers",
            "the operator's database answers",
            observed.generation,
        )
    } else {
        condition(
            prev,
            "StoreAvailable",
            false,
            "StoreUnavailable",
            "the operator's database does not answer: nothing is dispatched and completions \
             wait until it does (agents stay attached)",
            observed.generation,
        )
    };
    MeshStatus {
        agents_ready: ready_count,
        agents_total: total,
        slots: ready.iter().map(|a| a.slots).sum(),
        gpus: ready.iter().map(|a| a.gpus).sum(),
        observed_generation: observed.generation,
        conditions: vec![cond, store],
    }
}

/// Writes a Mesh's status (server-side apply on `/status`).
pub async fn patch_status(ctx: &Context, name: &str, status: &MeshStatus) -> Result<()> {
    super::apply_status(
        ctx,
        &Api::<Mesh>::all(ctx.client.clone()),
        name,
        status,
        false,
    )
    .await
}

/// Reconciles a Mesh (behind its finalizer).
pub async fn reconcile(mesh: Arc<Mesh>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = super::ReconcileTimer::start(&ctx, "mesh");
    let api: Api<Mesh> = Api::all(ctx.client.clone());
    ctx.pace_finalizer(mesh.as_ref(), MESH_FINALIZER, "meshes")
        .await;
    finalizer(&api, MESH_FINALIZER, mesh, |event| async {
        match event {
            Finalizer::Apply(mesh) => apply(&mesh, &ctx).await,
            Finalizer::Cleanup(mesh) => cleanup(&mesh, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn apply(mesh: &Mesh, ctx: &Context) -> Result<Action> {
    let name = mesh.name_any();
    ctx.core.upsert_mesh(&name, mesh.spec.clone()).await?;
    let ssa = PatchParams::apply(FIELD_MANAGER).force();
    let sa = build_service_account(mesh, &ctx.config);
    let sa_name = agent_name(&name);
    let sas: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    ctx.write("serviceaccounts", "patch").await;
    sas.patch(&sa_name, &ssa, &Patch::Apply(&sa))
        .await
        .map_err(|source| Error::ApplyServiceAccount {
            name: sa_name.clone(),
            source,
        })?;
    let ds = build_daemonset(mesh, &ctx.config);
    let dss: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    ctx.write("daemonsets", "patch").await;
    let applied = dss
        .patch(&sa_name, &ssa, &Patch::Apply(&ds))
        .await
        .map_err(|source| Error::ApplyDaemonSet {
            name: sa_name.clone(),
            source,
        })?;
    let observed = MeshObserved {
        generation: mesh.metadata.generation,
        desired: applied.status.map(|s| s.desired_number_scheduled),
    };
    ctx.meshes
        .lock()
        .await
        .insert(name.clone(), observed.clone());
    let status = mesh_status(
        &name,
        mesh.status.as_ref(),
        &observed,
        &ctx.core.agents().await,
        ctx.core.store_available(),
    );
    if mesh.status.as_ref() != Some(&status) {
        patch_status(ctx, &name, &status).await?;
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

async fn cleanup(mesh: &Mesh, ctx: &Context) -> Result<Action> {
    let name = mesh.name_any();
    ctx.core.remove_mesh(&name).await;
    ctx.meshes.lock().await.remove(&name);
    let owned = agent_name(&name);
    let dss: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    ctx.write("daemonsets", "delete").await;
    if let Err(source) = dss.delete(&owned, &DeleteParams::default()).await
        && !super::is_not_found(&source)
    {
        return Err(Error::DeleteOwned {
            what: format!("DaemonSet {owned}"),
            source,
        });
    }
    let sas: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    ctx.write("serviceaccounts", "delete").await;
    if let Err(source) = sas.delete(&owned, &DeleteParams::default()).await
        && !super::is_not_found(&source)
    {
        return Err(Error::DeleteOwned {
            what: format!("ServiceAccount {owned}"),
            source,
        });
    }
    tracing::info!(mesh = %name, "mesh removed: agent DaemonSet and ServiceAccount deleted");
    Ok(Action::await_change())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use infermesh_crds::{Manifest, parse_manifests};

    fn mesh(spec: &str) -> Mesh {
        let yaml = format!(
            "apiVersion: infermesh.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: gpus}}\nspec:\n{spec}"
        );
        match parse_manifests(&yaml).expect("mesh").pop() {
            Some(Manifest::Mesh(m)) => *m,
            _ => panic!("mesh"),
        }
    }

    pub(crate) fn summary(
        id: &str,
        mesh: &str,
        connected: bool,
        unschedulable: bool,
        gpus: u32,
    ) -> AgentSummary {
        AgentSummary {
            id: id.into(),
            mesh: mesh.into(),
            node: format!("node-{id}"),
            connected,
            unschedulable,
            slots: 2,
            running: 0,
            completed: 0,
            credits: 0,
            providers: if gpus > 0 {
                vec!["cuda".into(), "cpu".into()]
            } else {
                vec!["cpu".into()]
            },
            gpus,
            gpu_product: if gpus > 0 {
                "NVIDIA L4".into()
            } else {
                String::new()
            },
            gpu_memory: u64::from(gpus) * (24 << 30),
            models_loaded: vec![],
            models_cached: vec![],
            since_heartbeat: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_daemonset_runs_restricted_agents_with_the_meshs_settings() {
        let m = mesh(
            "  nodeSelector: {pool: gpu}\n  tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]\n  \
             agent: {image: my/agent:1, slots: 3, executionProviders: [cuda], intraOpThreads: 4, \
             resources: {limits: {nvidia.com/gpu: \"1\"}}}\n",
        );
        let mut config = Config::for_namespace("im");
        config.data_claim = Some("datasets".into());
        config.object_store_secret = Some("minio-credentials".into());
        let ds = build_daemonset(&m, &config);
        assert_eq!(ds.metadata.name.as_deref(), Some("infermesh-agent-gpus"));
        assert_eq!(ds.metadata.namespace.as_deref(), Some("im"));
        let pod = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.clone())
            .expect("pod");
        assert_eq!(
            pod.node_selector
                .expect("selector")
                .get("pool")
                .map(String::as_str),
            Some("gpu")
        );
        assert_eq!(
            pod.tolerations.expect("tolerations")[0].key.as_deref(),
            Some("nvidia.com/gpu")
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
        let agent = &pod.containers[0];
        assert_eq!(agent.image.as_deref(), Some("my/agent:1"));
        let sc = agent.security_context.clone().expect("security context");
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_string()])
        );
        let env: BTreeMap<String, String> = agent
            .env
            .clone()
            .expect("env")
            .into_iter()
            .filter_map(|e| e.value.map(|v| (e.name, v)))
            .collect();
        assert_eq!(env["INFERMESH_SLOTS"], "3");
        assert_eq!(env["INFERMESH_EXECUTION_PROVIDERS"], "cuda");
        assert_eq!(
            env["INFERMESH_REQUIRE_GPU"], "true",
            "no cpu provider: the GPU is required"
        );
        assert_eq!(env["INFERMESH_INTRA_OP_THREADS"], "4");
        assert_eq!(env["INFERMESH_TOKEN_FILE"], TOKEN_PATH);
        assert_eq!(env["INFERMESH_CA_CERT"], CA_PATH);
        let limits = agent
            .resources
            .clone()
            .and_then(|r| r.limits)
            .expect("limits");
        assert!(limits.contains_key("nvidia.com/gpu"));
        let volumes = pod.volumes.expect("volumes");
        let token = volumes
            .iter()
            .find(|v| v.name == "token")
            .and_then(|v| v.projected.clone())
            .expect("token");
        let projection = token.sources.expect("sources")[0]
            .service_account_token
            .clone()
            .expect("sa token");
        assert_eq!(projection.audience.as_deref(), Some("infermesh"));
        let cache = volumes
            .iter()
            .find(|v| v.name == "model-cache")
            .expect("model cache");
        assert!(
            cache.empty_dir.is_some() && cache.host_path.is_none(),
            "the default cache is an emptyDir: {cache:?}"
        );
        let data = volumes
            .iter()
            .find(|v| v.name == "data")
            .and_then(|v| v.persistent_volume_claim.clone())
            .expect("data");
        assert_eq!(data.claim_name, "datasets");
        let tls = volumes
            .iter()
            .find(|v| v.name == "tls")
            .and_then(|v| v.secret.clone())
            .expect("tls");
        assert_eq!(tls.secret_name.as_deref(), Some("infermesh-tls"));
    }

    fn cache_of(pod: &PodSpec) -> &Volume {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == "model-cache")
            .expect("model-cache volume")
    }

    #[test]
    fn an_empty_dir_model_cache_keeps_every_container_non_root() {
        for agent in ["  agent: {}\n", "  agent: {modelCache: EmptyDir}\n"] {
            let ds = build_daemonset(&mesh(agent), &Config::for_namespace("im"));
            let pod = ds.spec.and_then(|s| s.template.spec).expect("pod");
            assert!(cache_of(&pod).empty_dir.is_some(), "{agent}");
            assert!(cache_of(&pod).host_path.is_none(), "{agent}");
            assert_eq!(pod.init_containers, None, "{agent}: no root init step");
            let psc = pod.security_context.clone().expect("pod security context");
            assert_eq!(psc.fs_group, Some(AGENT_UID), "the volume's group");
            for c in &pod.containers {
                let sc = c.security_context.clone().expect("security context");
                assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
                assert_eq!(sc.run_as_user, Some(AGENT_UID), "{}", c.name);
                let caps = sc.capabilities.expect("capabilities");
                assert_eq!(caps.add, None, "{}", c.name);
            }
            let mount = pod.containers[0]
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == "model-cache")
                .expect("mount");
            assert_eq!(mount.mount_path, CACHE_PATH);
        }
    }

    #[test]
    fn a_host_path_model_cache_is_the_nodes_directory_handed_over_by_a_root_init_step() {
        let ds = build_daemonset(
            &mesh("  agent: {modelCache: HostPath}\n"),
            &Config::for_namespace("im"),
        );
        let pod = ds.spec.and_then(|s| s.template.spec).expect("pod");
        let host = cache_of(&pod).host_path.clone().expect("hostPath");
        assert_eq!(host.path, "/var/cache/infermesh/gpus");
        assert_eq!(host.type_.as_deref(), Some("DirectoryOrCreate"));
        let init = pod.init_containers.clone().expect("init containers");
        assert_eq!(init.len(), 1);
        assert_eq!(init[0].name, "prepare-cache");
        let sc = init[0].security_context.clone().expect("security context");
        assert_eq!(sc.run_as_user, Some(0));
        let caps = sc.capabilities.expect("capabilities");
        assert_eq!(caps.add, Some(vec!["CHOWN".to_string()]), "CHOWN only");
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let psc = pod.security_context.expect("pod security context");
        assert_eq!(psc.fs_group, None, "fsGroup does not apply to a hostPath");
        // The agent itself still runs as its own user.
        let agent = pod.containers[0].security_context.clone().expect("agent");
        assert_eq!(agent.run_as_user, Some(AGENT_UID));
        assert_eq!(agent.run_as_non_root, Some(true));
    }

    #[test]
    fn defaults_select_gpu_nodes_and_let_agents_fall_back_to_cpu() {
        let ds = build_daemonset(&mesh("  agent: {}\n"), &Config::for_namespace("im"));
        let pod = ds.spec.and_then(|s| s.template.spec).expect("pod");
        assert_eq!(
            pod.node_selector
                .expect("selector")
                .get("nvidia.com/gpu.present")
                .map(String::as_str),
            Some("true")
        );
        let env = pod.containers[0].env.clone().expect("env");
        assert!(
            !env.iter().any(|e| e.name == "INFERMESH_REQUIRE_GPU"),
            "cpu is in the default providers"
        );
        assert_eq!(
            pod.containers[0].image.as_deref(),
            Some("ghcr.io/infermesh/infermesh-agent:0.1.0")
        );
    }

    #[test]
    fn mesh_status_counts_ready_agents_and_their_capacity() {
        let observed = MeshObserved {
            generation: Some(2),
            desired: Some(3),
        };
        let agents = vec![
            summary("a", "gpus", true, false, 1),
            summary("b", "gpus", true, true, 2),
            summary("c", "gpus", false, false, 1),
            summary("d", "other", true, false, 4),
        ];
        let s = mesh_status("gpus", None, &observed, &agents, true);
        assert_eq!(
            (s.agents_ready, s.agents_total, s.slots, s.gpus),
            (1, 3, 2, 1)
        );
        assert_eq!(s.conditions[0].reason, "AgentsReady");
        assert_eq!(s.conditions[0].observed_generation, Some(2));
        let none = mesh_status("gpus", None, &observed, &agents[2..3], true);
        assert_eq!(none.conditions[0].reason, "NoAgentsReady");
        let empty = mesh_status("gpus", None, &MeshObserved::default(), &[], true);
        assert_eq!(s.conditions[1].type_, "StoreAvailable");
        assert_eq!(s.conditions[1].status, "True");
        let outage = mesh_status("gpus", Some(&s), &observed, &agents, false);
        assert_eq!(
            (
                outage.conditions[1].status.as_str(),
                outage.conditions[1].reason.as_str()
            ),
            ("False", "StoreUnavailable")
        );
        assert_eq!(outage.conditions[0], s.conditions[0], "Ready is unchanged");
        assert_eq!(empty.conditions[0].reason, "NoMatchingNodes");
        assert!(empty.conditions[0].message.contains("kubectl label node"));
    }
}
