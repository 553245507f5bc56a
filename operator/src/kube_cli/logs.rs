//! `infermesh logs workload NAME`: the workload's Kubernetes Events (shard failures, requeues,
//! the outcome), oldest first, its failure if it failed, and the lines of its Mesh's agent
//! pods' logs that mention it (by uid, or by `namespace/name`), each prefixed with its pod.
//! With `-f` new Events and log lines follow as they come.

use std::collections::HashSet;

use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use infermesh_crds::{Workload, WorkloadPhase};
use k8s_openapi::api::core::v1::{Event as KubeEvent, Pod};
use kube::api::{Api, ListParams, LogParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;

use super::render::{event_count, event_time};
use super::{
    AGENT_POD_LABEL, LogsArgs, Result, Sink, api_error, get_workload, workload_events_selector,
};

/// Whether a log line is about workload `namespace/name` (uid `uid`): it holds the uid, or
/// `namespace/name` as a whole (`team-a/foo` is not in `team-a/foobar`). Agents log a shard
/// as `namespace/name/uid#index@attempt`.
pub fn mentions_workload(line: &str, namespace: &str, name: &str, uid: &str) -> bool {
    if !uid.is_empty() && line.contains(uid) {
        return true;
    }
    let key = format!("{namespace}/{name}");
    // Characters of a Kubernetes name: one next to the match means it is part of another.
    let name_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_';
    let mut from = 0;
    while let Some(at) = line[from..].find(&key) {
        let start = from + at;
        let end = start + key.len();
        let before_ok = line[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !name_char(c) && c != '/');
        let after_ok = line[end..].chars().next().is_none_or(|c| !name_char(c));
        if before_ok && after_ok {
            return true;
        }
        from = start + 1;
        while !line.is_char_boundary(from) {
            from += 1;
        }
    }
    false
}

/// The lines of a pod's log about the workload, each prefixed `[pod/NAME] `.
pub fn filter_log(pod: &str, log: &str, namespace: &str, name: &str, uid: &str) -> Vec<String> {
    log.lines()
        .filter(|l| mentions_workload(l, namespace, name, uid))
        .map(|l| format!("[pod/{pod}] {l}"))
        .collect()
}

/// One Event as a log line: `[event] TIME TYPE REASON (xN): MESSAGE`, the message in full.
pub fn event_line(e: &KubeEvent) -> String {
    let when = event_time(e)
        .map(|t| t.to_string())
        .unwrap_or_else(|| "-".into());
    let count = event_count(e);
    let times = if count > 1 {
        format!(" (x{count})")
    } else {
        String::new()
    };
    format!(
        "[event] {when} {} {}{times}: {}",
        e.type_.as_deref().unwrap_or("Normal"),
        e.reason.as_deref().unwrap_or("-"),
        e.message.as_deref().unwrap_or("").trim_end()
    )
}

/// A Failed workload's failure, from its status: the `Failed` condition, else the reason and
/// message of `Complete`.
pub fn failure_line(w: &Workload) -> Option<String> {
    let s = w.status.as_ref()?;
    if s.phase != WorkloadPhase::Failed {
        return None;
    }
    let c = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed" && c.status == "True")
        .or_else(|| s.conditions.iter().find(|c| c.type_ == "Complete"))?;
    Some(format!(
        "[status] Failed: {}: {}",
        c.reason,
        c.message.trim_end()
    ))
}

/// The agent pods of a Mesh: those with the agent label and `infermesh.dev/mesh=<mesh>`.
pub fn agent_pods_selector(mesh: &str) -> String {
    format!("{AGENT_POD_LABEL},infermesh.dev/mesh={mesh}")
}

/// Runs `infermesh logs workload`.
pub async fn run(
    client: Client,
    namespace: &str,
    args: &LogsArgs,
    sink: &mut dyn Sink,
) -> Result<()> {
    let name = args.name.as_str();
    let w = get_workload(client.clone(), namespace, name).await?;
    let uid = w.uid().unwrap_or_default();
    let selector = workload_events_selector(&uid);
    let events_api: Api<KubeEvent> = Api::namespaced(client.clone(), namespace);
    let mut seen: HashSet<(String, String)> = HashSet::new();
    match events_api
        .list(&ListParams::default().fields(&selector))
        .await
    {
        Ok(list) => {
            for e in super::render::sort_events(list.items) {
                seen.insert(event_key(&e));
                sink.out(&format!("{}\n", event_line(&e)));
            }
        }
        Err(e) => sink.warn(&api_error(&e, &format!("listing Events in namespace {namespace}")).0),
    }
    if let Some(line) = failure_line(&w) {
        sink.out(&format!("{line}\n"));
    }
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &args.operator_namespace);
    let pods = match pods_api
        .list(&ListParams::default().labels(&agent_pods_selector(&w.spec.mesh)))
        .await
    {
        Ok(list) => {
            let mut names: Vec<String> = list.items.iter().map(|p| p.name_any()).collect();
            names.sort();
            names
        }
        Err(e) => {
            return Err(api_error(
                &e,
                &format!(
                    "listing the agent pods of mesh {} in namespace {} (--operator-namespace)",
                    w.spec.mesh, args.operator_namespace
                ),
            ));
        }
    };
    if pods.is_empty() {
        sink.warn(&format!(
            "no agent pods of mesh {} in namespace {} (is --operator-namespace right?)",
            w.spec.mesh, args.operator_namespace
        ));
    }
    if !args.follow {
        for pod in &pods {
            match pods_api.logs(pod, &LogParams::default()).await {
                Ok(log) => {
                    for line in filter_log(pod, &log, namespace, name, &uid) {
                        sink.out(&format!("{line}\n"));
                    }
                }
                Err(e) => sink.warn(&api_error(&e, &format!("reading the log of pod {pod}")).0),
            }
        }
        return Ok(());
    }
    follow(
        events_api, selector, seen, pods_api, pods, namespace, name, &uid, sink,
    )
    .await
}

fn event_key(e: &KubeEvent) -> (String, String) {
    (
        e.metadata.name.clone().unwrap_or_default(),
        e.metadata.resource_version.clone().unwrap_or_default(),
    )
}

/// What the followers send: a line for standard output, or a warning.
enum Item {
    Out(String),
    Warn(String),
}

/// `-f`: each pod's log streamed from its start (filtered), and Events as they change, until
/// every stream ends or the user stops it.
#[allow(clippy::too_many_arguments)]
async fn follow(
    events_api: Api<KubeEvent>,
    selector: String,
    mut seen: HashSet<(String, String)>,
    pods_api: Api<Pod>,
    pods: Vec<String>,
    namespace: &str,
    name: &str,
    uid: &str,
    sink: &mut dyn Sink,
) -> Result<()> {
    let (tx, mut rx) = mpsc::channel::<Item>(1024);
    let mut tasks = Vec::new();
    for pod in pods {
        let (api, tx) = (pods_api.clone(), tx.clone());
        let (ns, wname, wuid) = (namespace.to_string(), name.to_string(), uid.to_string());
        tasks.push(tokio::spawn(async move {
            let lp = LogParams {
                follow: true,
                ..LogParams::default()
            };
            let reader = match api.log_stream(&pod, &lp).await {
                Ok(r) => r,
                Err(e) => {
                    let w = api_error(&e, &format!("following the log of pod {pod}")).0;
                    let _ = tx.send(Item::Warn(w)).await;
                    return;
                }
            };
            let mut lines = reader.lines();
            while let Some(line) = lines.next().await {
                match line {
                    Ok(l) if mentions_workload(&l, &ns, &wname, &wuid) => {
                        if tx
                            .send(Item::Out(format!("[pod/{pod}] {l}")))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let w = format!("the log of pod {pod} ended: {e}");
                        let _ = tx.send(Item::Warn(w)).await;
                        return;
                    }
                }
            }
        }));
    }
    {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let config = watcher::Config::default().fields(&selector);
            let mut stream = watcher(events_api, config).boxed();
            loop {
                match stream.try_next().await {
                    Ok(Some(watcher::Event::Apply(e) | watcher::Event::InitApply(e))) => {
                        if seen.insert(event_key(&e))
                            && tx.send(Item::Out(event_line(&e))).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return,
                    Err(e) => {
                        let w = format!("watching the workload's Events: {e}");
                        if tx.send(Item::Warn(w)).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    }
                }
            }
        }));
    }
    drop(tx);
    // Stops the followers when this future is dropped (the user stopped it, or a test ends).
    let _tasks = AbortOnDrop(tasks);
    while let Some(item) = rx.recv().await {
        match item {
            Item::Out(line) => sink.out(&format!("{line}\n")),
            Item::Warn(w) => sink.warn(&w),
        }
    }
    Ok(())
}

/// Aborts its tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}
