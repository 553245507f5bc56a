//! In-process agents for benchmarks: they attach to a core without gRPC, and complete every
//! assignment honestly after a fixed compute time, writing a one-record part where the
//! attempt is told to (the part the operator checks before it charges).

use std::sync::Arc;
use std::time::Duration;

use infermesh_proto as pb;
use pb::agent_message::Msg as Up;
use pb::operator_message::Msg as Down;
use tonic::Status;

use super::{Core, outputs};
use crate::grpc::Principal;
use crate::store::Store;

/// Attaches agent `id` on `node` of `mesh` with `slots` slots; each assignment completes
/// after `compute`. Runs until the core drops the agent's stream.
pub async fn attach_noop_agent<S: Store>(
    core: &Arc<Core<S>>,
    id: &str,
    node: &str,
    mesh: &str,
    slots: u32,
    compute: Duration,
) -> Result<(), Status> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let hello = pb::Hello {
        agent_id: id.into(),
        node: node.into(),
        mesh: mesh.into(),
        version: "bench".into(),
        capabilities: Some(pb::Capabilities {
            execution_providers: vec!["cpu".into()],
            slots,
            ..Default::default()
        }),
    };
    let handle = core.attach(hello, &Principal::user("bench"), tx).await?;
    let core = core.clone();
    tokio::spawn(async move {
        let body = b"{}\n".to_vec();
        let facts = outputs::facts(&body);
        while let Some(Ok(msg)) = rx.recv().await {
            let Some(Down::Assign(a)) = msg.msg else {
                continue;
            };
            let (core, handle, body, facts) =
                (core.clone(), handle.clone(), body.clone(), facts.clone());
            tokio::spawn(async move {
                tokio::time::sleep(compute).await;
                if let Ok(part) = infermesh_io::Location::parse(&a.output_uri) {
                    let _ = part.put(body.into()).await;
                }
                let done = pb::Completed {
                    shard: a.shard,
                    records: facts.records,
                    output_uri: a.output_uri,
                    sha256: facts.sha256,
                    compute_seconds: compute.as_secs_f64(),
                    device: "cpu".into(),
                    output_bytes: facts.bytes,
                };
                let msg = pb::AgentMessage {
                    msg: Some(Up::Completed(done)),
                };
                let _ = core.handle(&handle, msg).await;
            });
        }
    });
    Ok(())
}
