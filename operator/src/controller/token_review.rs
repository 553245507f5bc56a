//! Agent authentication in cluster mode: the agent's projected ServiceAccount token (audience
//! `infermesh`) is checked with a TokenReview, cached briefly, and accepted only for the
//! ServiceAccount of the Mesh the agent says it serves.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tonic::Status;

use super::mesh::agent_user;
use crate::grpc::{Authenticator, Principal};

/// How long a review's answer is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(60);

/// The TokenReview `extra` key naming the node a projected token is bound to (Kubernetes
/// 1.30 and later).
pub const NODE_CLAIM: &str = "authentication.kubernetes.io/node-name";

/// The TokenReview `extra` key naming the pod a projected token is bound to.
pub const POD_CLAIM: &str = "authentication.kubernetes.io/pod-name";

/// A review's answer and when it was made.
type Review = (Instant, Result<Principal, String>);

/// Checks bearer tokens with the API server.
pub struct TokenReviewer {
    api: Api<TokenReview>,
    namespace: String,
    audience: String,
    cache: Mutex<HashMap<[u8; 32], Review>>,
    metrics: Option<crate::metrics::Metrics>,
}

impl TokenReviewer {
    /// Reviews tokens through `client`; agents' ServiceAccounts live in `namespace`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        metrics: Option<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            api: Api::all(client),
            namespace: namespace.into(),
            audience: super::TOKEN_AUDIENCE.into(),
            cache: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    async fn review(&self, token: &str) -> Result<Principal, String> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.into()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        if let Some(m) = &self.metrics {
            m.write("tokenreviews", "create");
        }
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("TokenReview failed: {e}"))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(format!(
                "token not authenticated{}",
                status.error.map(|e| format!(": {e}")).unwrap_or_default()
            ));
        }
        if let Some(aud) = &status.audiences
            && !aud.contains(&self.audience)
        {
            return Err(format!("token is not for audience `{}`", self.audience));
        }
        let user = status.user.unwrap_or_default();
        let claim = |name: &str| {
            user.extra
                .as_ref()
                .and_then(|e| e.get(name))
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        Ok(Principal {
            user: user.username.clone().unwrap_or_default(),
            agent: None,
            // Bound tokens carry their pod (and, from Kubernetes 1.30, their node).
            node: claim(NODE_CLAIM),
            instance: claim(POD_CLAIM),
        })
    }
}

impl Authenticator for TokenReviewer {
    async fn authenticate(&self, token: &str) -> Result<Principal, Status> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        {
            let cache = self.cache.lock().await;
            if let Some((at, answer)) = cache.get(&digest)
                && at.elapsed() < CACHE_TTL
            {
                return answer.clone().map_err(Status::unauthenticated);
            }
        }
        let answer = self.review(token).await;
        let mut cache = self.cache.lock().await;
        cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
        cache.insert(digest, (Instant::now(), answer.clone()));
        answer.map_err(Status::unauthenticated)
    }

    fn authorize(&self, who: &mut Principal, mesh: &str) -> Result<(), Status> {
        let want = agent_user(&self.namespace, mesh);
        if who.user != want {
            return Err(Status::unauthenticated(format!(
                "{} may not serve mesh {mesh}: only {want} may",
                who.user
            )));
        }
        // The agent of a node has one id on a Mesh; a token bound to a node may claim no other.
        if let Some(node) = &who.node {
            who.agent = Some(format!("{mesh}-{node}"));
        }
        Ok(())
    }
}
