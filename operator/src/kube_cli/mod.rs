//! The cluster-mode command line: `infermesh get|describe|logs|suspend|resume|cancel|retry|
//! drain|undrain`, talking to the Kubernetes API with the user's kubeconfig (and the same as
//! a kubectl plugin, `kubectl infermesh ...`, see [`invoked_as_kubectl_plugin`]).
//!
//! The logic is in pure functions over the typed objects ([`render`]: tables and `describe`
//! reports; [`logs`]: which log lines belong to a workload); the async functions here take a
//! [`kube::Client`], so the tests drive them against a mocked API server.

pub mod logs;
pub mod render;

#[cfg(test)]
mod tests;

use std::ffi::OsStr;
use std::fmt;

use futures::{StreamExt, TryStreamExt};
use infermesh_crds::{Agent, Mesh, Workload};
use k8s_openapi::api::core::v1::Event as KubeEvent;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use render::{Columns, Table};

pub use infermesh_crds::workload::RETRY_ANNOTATION;

/// The label every agent pod carries (see `controller::mesh::labels`).
pub const AGENT_POD_LABEL: &str = "app.kubernetes.io/name=infermesh-agent";

/// The namespace the operator's Recorder files Events of cluster-scoped objects (Agents) in.
pub const CLUSTER_EVENTS_NAMESPACE: &str = "default";

/// Whether the program was started as `kubectl-infermesh` (kubectl runs a plugin by that
/// file name for `kubectl infermesh ...`): the commands are the same, only the usage line
/// says `kubectl infermesh`.
pub fn invoked_as_kubectl_plugin(argv0: &OsStr) -> bool {
    let name = std::path::Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let name = name.strip_suffix(".exe").unwrap_or(name);
    name == "kubectl-infermesh"
}

// ---- command-line arguments --------------------------------------------------------------

/// The commands that talk to a cluster (flattened into `infermesh`'s subcommands).
#[derive(clap::Subcommand, Debug, Clone, PartialEq)]
pub enum ClusterCommand {
    /// List Meshes, Agents or Workloads from the cluster, like `kubectl get` (uses your
    /// kubeconfig).
    Get(GetArgs),
    /// Show a Workload or an Agent in detail: spec, phase, conditions, shards, progress,
    /// credits and its recent Kubernetes Events.
    Describe(DescribeArgs),
    /// A Workload's Kubernetes Events (shard failures and requeues, its outcome; oldest
    /// first), its failure, and the lines of its Mesh's agent pods' logs that mention it.
    Logs(LogsArgs),
    /// Stop dispatching a Workload's shards (running ones finish): sets `spec.suspend`.
    Suspend(WorkloadTarget),
    /// Resume a suspended Workload: clears `spec.suspend`.
    Resume(WorkloadTarget),
    /// Delete a Workload; the operator cancels its running shards.
    Cancel(WorkloadTarget),
    /// Ask the operator to re-queue a Failed Workload's failed shards (annotation
    /// `infermesh.dev/retry` set to now).
    Retry(WorkloadTarget),
    /// Stop giving an Agent new shards (running ones finish): sets `spec.unschedulable`.
    Drain(AgentTarget),
    /// Let a drained Agent take shards again: clears `spec.unschedulable`.
    Undrain(AgentTarget),
}

/// What `get` lists.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GetKind {
    /// Meshes (cluster-scoped).
    #[value(alias = "mesh")]
    Meshes,
    /// Agents (cluster-scoped).
    #[value(alias = "agent")]
    Agents,
    /// Workloads (namespaced).
    #[value(alias = "workload", alias = "wl")]
    Workloads,
}

/// `get -o`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// The table with more columns.
    Wide,
    /// A v1 List of the objects as the API returned them, as JSON.
    Json,
    /// The same as YAML.
    Yaml,
}

/// `infermesh get`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct GetArgs {
    /// meshes, agents or workloads.
    #[arg(value_enum)]
    pub kind: GetKind,
    /// The namespace of Workloads (default: your kubeconfig context's).
    #[arg(short = 'n', long, conflicts_with = "all_namespaces")]
    pub namespace: Option<String>,
    /// Workloads of every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Output format (default: a table).
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<OutputFormat>,
    /// After listing, print a line (or an object) for every change.
    #[arg(short = 'w', long)]
    pub watch: bool,
}

/// What `describe` shows.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescribeKind {
    /// A Workload.
    #[value(alias = "workloads", alias = "wl")]
    Workload,
    /// An Agent.
    #[value(alias = "agents")]
    Agent,
}

/// `infermesh describe`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct DescribeArgs {
    /// workload or agent.
    #[arg(value_enum)]
    pub kind: DescribeKind,
    /// Its name.
    pub name: String,
    /// The Workload's namespace (default: your kubeconfig context's).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

/// The one kind a workload command takes (`workload`, or `wl`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    /// A Workload.
    #[value(alias = "workloads", alias = "wl")]
    Workload,
}

/// The one kind an agent command takes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentKind {
    /// An Agent.
    #[value(alias = "agents")]
    Agent,
}

/// `workload NAME [-n NS]`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct WorkloadTarget {
    /// workload.
    #[arg(value_enum)]
    pub kind: WorkloadKind,
    /// The Workload's name.
    pub name: String,
    /// Its namespace (default: your kubeconfig context's).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

/// `agent NAME`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct AgentTarget {
    /// agent.
    #[arg(value_enum)]
    pub kind: AgentKind,
    /// The Agent's name (`<mesh>-<node>`).
    pub name: String,
}

/// `infermesh logs`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct LogsArgs {
    /// workload.
    #[arg(value_enum)]
    pub kind: WorkloadKind,
    /// The Workload's name.
    pub name: String,
    /// Its namespace (default: your kubeconfig context's).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Keep printing new Events and log lines.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// The namespace the operator and its agent pods run in.
    #[arg(long, env = "INFERMESH_NAMESPACE", default_value = "infermesh")]
    pub operator_namespace: String,
}

// ---- errors and output --------------------------------------------------------------------

/// A command's failure: one line for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

/// Result of the cluster commands.
pub type Result<T, E = CliError> = std::result::Result<T, E>;

/// `Kind ns/name` or `Kind name`, as the errors name an object.
fn object_name(kind: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// The error of a call about `what` (`Workload team-a/foo`): a 404 says it is not found; any
/// other refusal by the API server shows the server's message (a 403 names the user and the
/// verb); anything else says the server could not be reached, with the cause.
pub fn api_error(e: &kube::Error, what: &str) -> CliError {
    match e {
        kube::Error::Api(s) if s.code == 404 => CliError(format!("{what} not found")),
        kube::Error::Api(s) => {
            let message = if s.message.is_empty() {
                s.reason.clone()
            } else {
                s.message.clone()
            };
            CliError(format!("{what}: {message} (HTTP {})", s.code))
        }
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(s) = source {
                let s_text = s.to_string();
                if !text.contains(&s_text) {
                    text.push_str(": ");
                    text.push_str(&s_text);
                }
                source = s.source();
            }
            CliError(format!("{what}: cannot talk to the Kubernetes API: {text}"))
        }
    }
}

/// A list that failed: a 404 there means the API has no such resource at all.
fn list_error(e: &kube::Error, plural: &str, scope: &str) -> CliError {
    match e {
        kube::Error::Api(s) if s.code == 404 => CliError(format!(
            "the cluster has no {plural}.infermesh.dev resource: are the infermesh CRDs installed? \
             (`infermesh crd | kubectl apply -f -`)"
        )),
        other => api_error(other, &format!("listing {plural}{scope}")),
    }
}

/// Where the commands write: standard output, and warnings to standard error.
pub trait Sink {
    /// Text for standard output (whole lines, each ending in `\n`).
    fn out(&mut self, text: &str);
    /// A warning for standard error (one line, without `\n`).
    fn warn(&mut self, text: &str);
}

/// The process's standard output (closed pipes end quietly) and standard error.
pub struct Stdio;

impl Sink for Stdio {
    fn out(&mut self, text: &str) {
        crate::out!("{text}");
    }
    fn warn(&mut self, text: &str) {
        eprintln!("infermesh: warning: {text}");
    }
}

/// A client from the user's kubeconfig (or the in-cluster service account).
pub async fn connect() -> Result<Client> {
    Client::try_default().await.map_err(|e| {
        CliError(format!(
            "cannot load a Kubernetes client configuration: {e}"
        ))
    })
}

/// Runs one cluster command.
pub async fn run(client: Client, command: &ClusterCommand, sink: &mut dyn Sink) -> Result<()> {
    let default_ns = client.default_namespace().to_string();
    let ns = |n: &Option<String>| n.clone().unwrap_or_else(|| default_ns.clone());
    match command {
        ClusterCommand::Get(args) => get(client.clone(), args, sink).await,
        ClusterCommand::Describe(args) => {
            let text = match args.kind {
                DescribeKind::Workload => {
                    describe_workload(client.clone(), &ns(&args.namespace), &args.name).await?
                }
                DescribeKind::Agent => describe_agent(client.clone(), &args.name).await?,
            };
            sink.out(&text);
            Ok(())
        }
        ClusterCommand::Logs(args) => {
            logs::run(client.clone(), &ns(&args.namespace), args, sink).await
        }
        ClusterCommand::Suspend(t) | ClusterCommand::Resume(t) => {
            let suspend = matches!(command, ClusterCommand::Suspend(_));
            let line = set_suspend(client.clone(), &ns(&t.namespace), &t.name, suspend).await?;
            sink.out(&line);
            Ok(())
        }
        ClusterCommand::Cancel(t) => {
            let line = cancel(client.clone(), &ns(&t.namespace), &t.name).await?;
            sink.out(&line);
            Ok(())
        }
        ClusterCommand::Retry(t) => {
            let line = retry(client.clone(), &ns(&t.namespace), &t.name, Timestamp::now()).await?;
            sink.out(&line);
            Ok(())
        }
        ClusterCommand::Drain(t) | ClusterCommand::Undrain(t) => {
            let drain = matches!(command, ClusterCommand::Drain(_));
            let line = set_unschedulable(client.clone(), &t.name, drain).await?;
            sink.out(&line);
            Ok(())
        }
    }
}

// ---- get ----------------------------------------------------------------------------------

/// `infermesh get`.
pub async fn get(client: Client, args: &GetArgs, sink: &mut dyn Sink) -> Result<()> {
    match args.kind {
        GetKind::Meshes => get_kind::<Mesh>(client, None, args, sink).await,
        GetKind::Agents => get_kind::<Agent>(client, None, args, sink).await,
        GetKind::Workloads => {
            let ns = if args.all_namespaces {
                None
            } else {
                Some(
                    args.namespace
                        .clone()
                        .unwrap_or_else(|| client.default_namespace().to_string()),
                )
            };
            get_kind::<Workload>(client, ns, args, sink).await
        }
    }
}

/// Lists (and with `-w` watches) one kind as raw objects, so `-o json|yaml` prints them as
/// the API returned them; the table reads them as the typed resource.
async fn get_kind<K>(
    client: Client,
    namespace: Option<String>,
    args: &GetArgs,
    sink: &mut dyn Sink,
) -> Result<()>
where
    K: Resource<DynamicType = ()> + Columns + DeserializeOwned,
{
    let ar = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = match &namespace {
        Some(ns) => Api::namespaced_with(client, ns, &ar),
        None => Api::all_with(client, &ar),
    };
    let scope = match &namespace {
        Some(ns) => format!(" in namespace {ns}"),
        None => String::new(),
    };
    let all_ns = namespace.is_none() && ar.plural == "workloads";
    let wide = args.output == Some(OutputFormat::Wide);
    if args.watch {
        return watch_kind::<K>(api, &ar, &scope, all_ns, args.output, sink).await;
    }
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| list_error(&e, &ar.plural, &scope))?;
    let items: Vec<DynamicObject> = list.items;
    match args.output {
        Some(OutputFormat::Json) => sink.out(&render::list_json(&ar, &items)?),
        Some(OutputFormat::Yaml) => sink.out(&render::list_yaml(&ar, &items)?),
        _ => {
            if items.is_empty() {
                sink.warn(&format!("no {}{scope}", ar.plural));
                return Ok(());
            }
            let typed = items
                .iter()
                .map(render::typed::<K>)
                .collect::<Result<Vec<K>>>()?;
            let table = render::table(&typed, wide, all_ns, Timestamp::now());
            sink.out(&table.render());
        }
    }
    Ok(())
}

/// `get -w`: the table (or the objects) as listed, then one row (or object) per change.
async fn watch_kind<K>(
    api: Api<DynamicObject>,
    ar: &ApiResource,
    scope: &str,
    all_ns: bool,
    output: Option<OutputFormat>,
    sink: &mut dyn Sink,
) -> Result<()>
where
    K: Resource<DynamicType = ()> + Columns + DeserializeOwned,
{
    use kube::runtime::watcher::Event;
    let wide = output == Some(OutputFormat::Wide);
    let mut stream = watcher(api, watcher::Config::default()).boxed();
    let mut initial: Vec<DynamicObject> = Vec::new();
    // Column widths of the first table, which later rows keep to.
    let mut widths: Option<Vec<usize>> = None;
    loop {
        let event = match stream.try_next().await {
            Ok(Some(event)) => event,
            Ok(None) => return Ok(()),
            Err(e) => {
                let message = match &e {
                    watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) => {
                        list_error(e, &ar.plural, scope).0
                    }
                    other => format!("watching {}{scope}: {other}", ar.plural),
                };
                if widths.is_none() {
                    // Nothing listed yet: a refusal (no CRD, forbidden) ends the command.
                    return Err(CliError(message));
                }
                sink.warn(&message);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        let changed = match event {
            Event::Init => {
                initial.clear();
                continue;
            }
            Event::InitApply(o) => {
                initial.push(o);
                continue;
            }
            Event::InitDone => {
                if widths.is_some() {
                    // A relist after the watch expired: print nothing again.
                    continue;
                }
                let objects = std::mem::take(&mut initial);
                match output {
                    Some(OutputFormat::Json | OutputFormat::Yaml) => {
                        for o in &objects {
                            sink.out(&render::object_doc(
                                ar,
                                o,
                                output == Some(OutputFormat::Yaml),
                            )?);
                        }
                        widths = Some(Vec::new());
                    }
                    _ => {
                        let typed = objects
                            .iter()
                            .map(render::typed::<K>)
                            .collect::<Result<Vec<K>>>()?;
                        let table = render::table(&typed, wide, all_ns, Timestamp::now());
                        sink.out(&table.render());
                        widths = Some(table.widths());
                    }
                }
                continue;
            }
            Event::Apply(o) | Event::Delete(o) => o,
        };
        match output {
            Some(OutputFormat::Json | OutputFormat::Yaml) => {
                sink.out(&render::object_doc(
                    ar,
                    &changed,
                    output == Some(OutputFormat::Yaml),
                )?);
            }
            _ => {
                let typed = render::typed::<K>(&changed)?;
                let row = Table {
                    header: Vec::new(),
                    rows: vec![typed.row(wide, all_ns, Timestamp::now())],
                };
                sink.out(&row.render_with(widths.as_deref().unwrap_or(&[])));
            }
        }
    }
}

// ---- describe -----------------------------------------------------------------------------

/// Events about an object, oldest first. A refusal to list them is not fatal: the report
/// says why they are missing.
async fn events(
    client: Client,
    namespace: &str,
    field_selector: &str,
) -> std::result::Result<Vec<KubeEvent>, String> {
    let api: Api<KubeEvent> = Api::namespaced(client, namespace);
    match api
        .list(&ListParams::default().fields(field_selector))
        .await
    {
        Ok(list) => Ok(render::sort_events(list.items)),
        Err(e) => Err(api_error(&e, &format!("listing Events in namespace {namespace}")).0),
    }
}

/// The field selector of a Workload's Events (the operator's Events carry its uid).
pub fn workload_events_selector(uid: &str) -> String {
    format!("involvedObject.uid={uid}")
}

/// The field selector of an Agent's Events (the operator names the Agent by kind and name;
/// they are filed in the `default` namespace, as for every cluster-scoped object).
pub fn agent_events_selector(name: &str) -> String {
    format!("involvedObject.kind=Agent,involvedObject.name={name}")
}

/// Gets Workload `namespace/name`; 404 says it is not found.
pub async fn get_workload(client: Client, namespace: &str, name: &str) -> Result<Workload> {
    Api::<Workload>::namespaced(client, namespace)
        .get(name)
        .await
        .map_err(|e| api_error(&e, &object_name("Workload", Some(namespace), name)))
}

/// `infermesh describe workload`.
pub async fn describe_workload(client: Client, namespace: &str, name: &str) -> Result<String> {
    let w = get_workload(client.clone(), namespace, name).await?;
    let uid = w.metadata.uid.clone().unwrap_or_default();
    let events = events(client, namespace, &workload_events_selector(&uid)).await;
    Ok(render::describe_workload(&w, &events, Timestamp::now()))
}

/// `infermesh describe agent`.
pub async fn describe_agent(client: Client, name: &str) -> Result<String> {
    let a = Api::<Agent>::all(client.clone())
        .get(name)
        .await
        .map_err(|e| api_error(&e, &object_name("Agent", None, name)))?;
    let events = events(
        client,
        CLUSTER_EVENTS_NAMESPACE,
        &agent_events_selector(name),
    )
    .await;
    Ok(render::describe_agent(&a, &events, Timestamp::now()))
}

// ---- changes ------------------------------------------------------------------------------

/// Merge-patches Workload `namespace/name`.
async fn patch_workload(
    client: Client,
    namespace: &str,
    name: &str,
    patch: Value,
) -> Result<Workload> {
    Api::<Workload>::namespaced(client, namespace)
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(|e| api_error(&e, &object_name("Workload", Some(namespace), name)))
}

/// `infermesh suspend|resume workload`: sets `spec.suspend`.
pub async fn set_suspend(
    client: Client,
    namespace: &str,
    name: &str,
    suspend: bool,
) -> Result<String> {
    patch_workload(
        client,
        namespace,
        name,
        json!({"spec": {"suspend": suspend}}),
    )
    .await?;
    Ok(if suspend {
        format!(
            "workload {namespace}/{name} suspended: no new shards are dispatched; running ones finish\n"
        )
    } else {
        format!("workload {namespace}/{name} resumed\n")
    })
}

/// `infermesh cancel workload`: deletes it (its finalizer has the operator cancel its
/// running shards before it goes).
pub async fn cancel(client: Client, namespace: &str, name: &str) -> Result<String> {
    Api::<Workload>::namespaced(client, namespace)
        .delete(name, &DeleteParams::default())
        .await
        .map_err(|e| api_error(&e, &object_name("Workload", Some(namespace), name)))?;
    Ok(format!(
        "workload {namespace}/{name} deleted: the operator cancels its running shards\n"
    ))
}

/// `infermesh retry workload`: sets the retry annotation to `now`.
pub async fn retry(client: Client, namespace: &str, name: &str, now: Timestamp) -> Result<String> {
    let at = now
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap_or(now)
        .to_string();
    let patch = json!({"metadata": {"annotations": {RETRY_ANNOTATION: at}}});
    let w = patch_workload(client, namespace, name, patch).await?;
    let phase = w.status.as_ref().map(|s| s.phase).unwrap_or_default();
    let mut line = format!(
        "workload {namespace}/{name}: retry requested ({RETRY_ANNOTATION}={at}): the operator \
         re-queues its failed shards\n"
    );
    if phase != infermesh_crds::WorkloadPhase::Failed {
        line.push_str(&format!(
            "note: the workload is {phase:?}, not Failed; a retry re-queues the failed shards of a Failed workload\n"
        ));
    }
    Ok(line)
}

/// `infermesh drain|undrain agent`: sets `spec.unschedulable`.
pub async fn set_unschedulable(client: Client, name: &str, unschedulable: bool) -> Result<String> {
    Api::<Agent>::all(client)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": unschedulable}})),
        )
        .await
        .map_err(|e| api_error(&e, &object_name("Agent", None, name)))?;
    Ok(if unschedulable {
        format!("agent {name} drained: no new shards; running ones finish\n")
    } else {
        format!("agent {name} undrained: it takes shards again\n")
    })
}
