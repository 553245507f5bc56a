//! `infermesh operator`: start-up checks, leader election, then the controllers, the status
//! writer, the Event publisher, the lease reaper and the gRPC server, all while leading.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use infermesh_crds::{Agent, Mesh, Workload};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Controller;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;

use super::leader::LeaderElector;
use super::status::StatusWriter;
use super::token_review::TokenReviewer;
use super::{Config, Context, LEADER_LABEL, agent, events, mesh, tls, workload};
use crate::core::Core;
use crate::http::{self, Health};
use crate::metrics::Metrics;
use crate::store;

/// Flags of `infermesh operator` (each with an `INFERMESH_*` variable).
#[derive(clap::Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Postgres URL of the store (shards, ledger, event log).
    #[arg(long, env = "INFERMESH_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// The operator's namespace (the pod's, from the downward API).
    #[arg(long, env = "INFERMESH_NAMESPACE", default_value = "infermesh")]
    pub namespace: String,
    /// This replica's name in the leader election (the pod's name).
    #[arg(long, env = "INFERMESH_POD_NAME")]
    pub pod_name: String,
    /// Address of the agents' gRPC port.
    #[arg(long, env = "INFERMESH_GRPC_ADDR", default_value = "0.0.0.0:7443")]
    pub grpc_addr: SocketAddr,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "INFERMESH_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// URL the agents dial (the gRPC Service).
    #[arg(long, env = "INFERMESH_GRPC_ENDPOINT")]
    pub grpc_endpoint: String,
    /// Secret with tls.crt, tls.key and ca.crt for the gRPC port.
    #[arg(long, env = "INFERMESH_TLS_SECRET", default_value = "infermesh-tls")]
    pub tls_secret: String,
    /// Create the TLS Secret when it does not exist (off when the user supplies one).
    #[arg(long, env = "INFERMESH_TLS_PROVISION", default_value_t = true, action = clap::ArgAction::Set)]
    pub tls_provision: bool,
    /// Agent image for Meshes that do not name one.
    #[arg(
        long,
        env = "INFERMESH_AGENT_IMAGE",
        default_value = "ghcr.io/infermesh/infermesh-agent:0.1.0"
    )]
    pub agent_image: String,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "INFERMESH_LEADER_LEASE",
        default_value = "infermesh-operator-leader"
    )]
    pub leader_lease: String,
    /// Serve the web console on the HTTP port (`--console=false` turns it off).
    #[arg(long, env = "INFERMESH_CONSOLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub console: bool,
    /// Lease duration in seconds: a standby takes over this long after the leader stops.
    #[arg(long, env = "INFERMESH_LEADER_LEASE_SECONDS", default_value_t = 15)]
    pub leader_lease_seconds: u64,
    /// A PVC mounted at /data in the agents (for file:///data/... inputs and outputs).
    #[arg(long, env = "INFERMESH_DATA_CLAIM")]
    pub data_claim: Option<String>,
    /// A Secret passed to every agent as environment variables (object-store credentials
    /// for s3:// URIs: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT).
    #[arg(long, env = "INFERMESH_OBJECT_STORE_SECRET")]
    pub object_store_secret: Option<String>,
}

/// Fails with the command to install the CRDs when any is missing.
pub async fn check_crds(client: &Client) -> Result<(), String> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in infermesh_crds::all_crds() {
        let name = crd.name_any();
        match api.get_opt(&name).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(format!(
                    "CRD {name} is not installed. Install the CRDs with \
                     `infermesh crd | kubectl apply -f -` (or `kubectl apply -f crds/yaml/crds.yaml`, \
                     or `helm install` of charts/infermesh) and start the operator again"
                ));
            }
            Err(e) => return Err(format!("cannot read CRD {name}: {e}")),
        }
    }
    Ok(())
}

/// Labels (or unlabels) this replica's pod as the leader, so the gRPC Service reaches it.
async fn label_pod(
    client: &Client,
    namespace: &str,
    pod: &str,
    leader: bool,
) -> Result<(), kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let value = if leader {
        json!("true")
    } else {
        serde_json::Value::Null
    };
    pods.patch(
        pod,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {LEADER_LABEL: value}}})),
    )
    .await
    .map(|_| ())
}

/// Takes the leader label off every pod but `own`.
pub(super) async fn unlabel_others(
    client: &Client,
    namespace: &str,
    own: &str,
) -> Result<(), kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let labelled = pods
        .list(&ListParams::default().labels(&format!("{LEADER_LABEL}=true")))
        .await?;
    for pod in labelled.items {
        let name = pod.name_any();
        if name != own {
            tracing::info!(pod = %name, "former leader unlabelled");
            label_pod(client, namespace, &name, false).await?;
        }
    }
    Ok(())
}

/// Runs the operator until it stops leading or fails.
pub async fn run(args: OperatorArgs) -> ExitCode {
    match run_inner(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "operator stopped");
            eprintln!("infermesh operator: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_inner(args: OperatorArgs) -> Result<(), String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("cannot configure the Kubernetes client: {e}"))?;
    // A database that starts along with the operator (the chart's own Postgres) or is
    // restarting is waited for, a minute at most, instead of a crash loop.
    let store = store::patiently(
        "opening the store",
        std::time::Duration::from_secs(60),
        store::StoreError::is_transient,
        async || store::open(&args.database_url).await,
    )
    .await
    .map_err(|e| format!("cannot open the store: {e}"))?;
    let core = Arc::new(Core::new(store));
    let metrics = Metrics::new(core.counters());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.http_addr))?;
    let health = Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
        store: core.store_flag(),
    };
    // The web console shares the HTTP port; each person signs in with their own token
    // (TokenReview) and sees and does what their RBAC allows (SubjectAccessReview).
    let mut app = http::router(health);
    if args.console {
        let console = crate::console::Console::new(
            core.clone(),
            crate::console::auth::Authority::cluster(client.clone()),
        );
        console.start();
        app = app.merge(crate::console::router(console));
    }
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    check_crds(&client).await?;
    ready.store(true, Ordering::Relaxed);
    if let Err(e) = label_pod(&client, &args.namespace, &args.pod_name, false).await {
        tracing::warn!(error = %e, "cannot clear the leader label on this pod");
    }

    let elector = LeaderElector::new(
        Api::<Lease>::namespaced(client.clone(), &args.namespace),
        &args.leader_lease,
        &args.pod_name,
        Duration::from_secs(args.leader_lease_seconds.max(3)),
    );
    tracing::info!(lease = %args.leader_lease, identity = %args.pod_name, "waiting to lead");
    elector.acquire().await;
    tracing::info!("leading");
    metrics.leader.set(1);

    let config = Config {
        namespace: args.namespace.clone(),
        grpc_endpoint: args.grpc_endpoint.clone(),
        agent_image: args.agent_image.clone(),
        tls_secret: args.tls_secret.clone(),
        data_claim: args.data_claim.clone(),
        object_store_secret: args.object_store_secret.clone(),
        ..Config::for_namespace(&args.namespace)
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        core.clone(),
        config,
        metrics.clone(),
        &args.pod_name,
    ));

    // Meshes first, then what the store says is still running: a fail-over resumes.
    let meshes: Api<Mesh> = Api::all(client.clone());
    let list = meshes
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("cannot list Meshes: {e}"))?;
    for m in list.items {
        if let Err(e) = core.upsert_mesh(&m.name_any(), m.spec.clone()).await {
            tracing::warn!(mesh = %m.name_any(), error = %e, "cannot load mesh");
        }
    }
    let resumed = core
        .resume()
        .await
        .map_err(|e| format!("cannot resume from the store: {e}"))?;
    tracing::info!(resumed, "resumed workloads from the store");

    // The gRPC port, with TLS.
    let host = url::Url::parse(&args.grpc_endpoint)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| format!("infermesh-grpc.{}.svc", args.namespace));
    let material = tls::ensure(
        &Api::<Secret>::namespaced(client.clone(), &args.namespace),
        &args.tls_secret,
        &tls::subject_names(&host),
        args.tls_provision,
    )
    .await
    .map_err(|e| e.to_string())?;
    let grpc_listener = tokio::net::TcpListener::bind(args.grpc_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.grpc_addr))?;
    let auth = Arc::new(TokenReviewer::new(
        client.clone(),
        &args.namespace,
        Some(metrics.clone()),
    ));
    let grpc = tokio::spawn(crate::grpc::serve(
        grpc_listener,
        core.clone(),
        auth,
        Some(tls::server_config(&material)),
        std::future::pending(),
    ));
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(crate::grpc::reap_leases(core.clone(), stop_rx));
    tokio::spawn(StatusWriter::new(ctx.clone()).run());
    tokio::spawn(events::run(ctx.clone()));
    if let Err(e) = label_pod(&client, &args.namespace, &args.pod_name, true).await {
        tracing::warn!(error = %e, "cannot label this pod as the leader; agents may not reach it");
    }
    // A leader that died without a clean exit (killed, frozen, its node gone) still carries
    // the label, and the Service would send agents to it too.
    if let Err(e) = unlabel_others(&client, &args.namespace, &args.pod_name).await {
        tracing::warn!(error = %e, "cannot clear the leader label of former leaders");
    }

    let mesh_ctl = Controller::new(meshes, watcher::Config::default())
        .owns(
            Api::<DaemonSet>::namespaced(client.clone(), &args.namespace),
            watcher::Config::default().labels("app.kubernetes.io/managed-by=infermesh-operator"),
        )
        .shutdown_on_signal()
        .run(mesh::reconcile, super::error_policy("mesh"), ctx.clone())
        .for_each(|_| async {});
    let workload_ctl = Controller::new(
        Api::<Workload>::all(client.clone()),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(
        workload::reconcile,
        super::error_policy("workload"),
        ctx.clone(),
    )
    .for_each(|_| async {});
    let agent_ctl = Controller::new(
        Api::<Agent>::all(client.clone()),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(agent::reconcile, super::error_policy("agent"), ctx.clone())
    .for_each(|_| async {});

    tokio::select! {
        _ = async { tokio::join!(mesh_ctl, workload_ctl, agent_ctl) } => {
            core.drain_all("operator shutting down").await;
            Ok(())
        }
        () = elector.hold() => {
            metrics.leader.set(0);
            Err("lost the leader Lease; stopping so this replica restarts as a standby".into())
        }
        r = grpc => Err(format!("gRPC server stopped: {r:?}")),
    }
}
