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
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        Ok(Principal(user))
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

    fn authorize(&self, who: &Principal, mesh: &str) -> Result<(), Status> {
        let want = agent_user(&self.namespace, mesh);
        if who.0 == want {
            Ok(())
        } else {
            Err(Status::unauthenticated(format!(
                "{} may not serve mesh {mesh}: only {want} may",
                who.0
            )))
        }
    }
}
