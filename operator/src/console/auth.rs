//! Who is asking, and may they. Locally, one random token (in the URL `infermesh local --ui`
//! prints) stands for the person at the machine and may do everything. In a cluster, every
//! request carries the user's own bearer token (the one their kubeconfig uses, pasted once
//! into the sign-in form or sent as `Authorization: Bearer`): a TokenReview says who they are,
//! and a SubjectAccessReview for the matching Kubernetes verb on the matching object says
//! whether they may read or do what they ask, so the console never shows or does more than
//! `kubectl` would let them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

use super::lock;

/// How long a TokenReview's answer is reused.
pub const REVIEW_TTL: Duration = Duration::from_secs(30);
/// How long a SubjectAccessReview's answer is reused (a revoked RoleBinding takes effect
/// within this).
pub const ACCESS_TTL: Duration = Duration::from_secs(10);
/// The API group of the CRDs.
pub const GROUP: &str = "infermesh.dev";
/// The most answers kept in either cache before it is emptied.
const CACHE_MAX: usize = 10_000;

/// A signed-in person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Their name (`local` locally).
    pub name: String,
    /// Their uid, as the TokenReview gave it.
    pub uid: String,
    /// Their groups.
    pub groups: Vec<String>,
    /// Extra attributes, passed on to every access review.
    pub extra: BTreeMap<String, Vec<String>>,
    /// The session's CSRF token: what a form or an htmx request must send back with an
    /// action. Derived from the bearer token with the console's own key, so it reveals
    /// nothing of the token and cannot be made without the key.
    pub csrf: String,
}

/// What an access check asks: `verb` on `resource` (`workloads`, `agents`, `meshes`) in
/// `namespace` (`None`: cluster-scoped, or every namespace), and `name` (`None`: any).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// `get`, `list`, `patch`, `delete`.
    pub verb: &'static str,
    /// The resource.
    pub resource: &'static str,
    /// The namespace.
    pub namespace: Option<String>,
    /// The object.
    pub name: Option<String>,
}

impl Access {
    /// `verb` on `resource`, cluster-wide (or in every namespace).
    pub fn all(verb: &'static str, resource: &'static str) -> Self {
        Self {
            verb,
            resource,
            namespace: None,
            name: None,
        }
    }

    /// `verb` on `resource` in `namespace`.
    pub fn namespaced(verb: &'static str, resource: &'static str, namespace: &str) -> Self {
        Self {
            verb,
            resource,
            namespace: Some(namespace.to_string()),
            name: None,
        }
    }

    /// `verb` on one object.
    pub fn object(
        verb: &'static str,
        resource: &'static str,
        namespace: Option<&str>,
        name: &str,
    ) -> Self {
        Self {
            verb,
            resource,
            namespace: namespace.map(str::to_string),
            name: Some(name.to_string()),
        }
    }

    /// `kubectl auth can-i` words, for a refusal message.
    pub fn describe(&self) -> String {
        let mut s = format!("{} {}", self.verb, self.resource);
        if let Some(n) = &self.name {
            s.push('/');
            s.push_str(n);
        }
        match &self.namespace {
            Some(ns) => s.push_str(&format!(" in namespace {ns}")),
            None => s.push_str(" (cluster-wide)"),
        }
        s
    }
}

/// Why a request was turned away.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No token came with it.
    #[error("sign in: no token came with the request")]
    NoToken,
    /// The token is not valid (TokenReview said so, or it is not the local token).
    #[error("the token was not accepted: {0}")]
    BadToken(String),
    /// The API server could not be asked.
    #[error("cannot check the token or the access with the API server: {0}")]
    Unavailable(String),
}

/// A TokenReview's answer (the person, or why not) and when it came.
type Reviewed = (Instant, Result<User, String>);

/// How the console knows people.
pub enum Authority {
    /// `infermesh local --ui`: one token, which may do everything.
    Local {
        /// The token.
        token: String,
    },
    /// In a cluster: TokenReview and SubjectAccessReview.
    Cluster {
        /// The operator's client (it may create both reviews).
        client: kube::Client,
        /// Answers of TokenReviews, by sha256 of the token.
        reviews: Mutex<HashMap<[u8; 32], Reviewed>>,
        /// Answers of SubjectAccessReviews, by user and access.
        access: Mutex<HashMap<(String, Access), (Instant, bool)>>,
    },
}

impl Authority {
    /// The cluster authority.
    pub fn cluster(client: kube::Client) -> Self {
        Self::Cluster {
            client,
            reviews: Mutex::default(),
            access: Mutex::default(),
        }
    }

    /// Whether this is the local console (one token, everything allowed).
    pub fn is_local(&self) -> bool {
        matches!(self, Self::Local { .. })
    }

    /// Who `token` belongs to. `key` signs the session's CSRF token.
    pub async fn authenticate(&self, token: &str, key: &[u8; 32]) -> Result<User, Refusal> {
        if token.is_empty() {
            return Err(Refusal::NoToken);
        }
        let csrf = csrf_token(key, token);
        match self {
            Self::Local { token: expected } => {
                if constant_time_eq(token.as_bytes(), expected.as_bytes()) {
                    Ok(User {
                        name: "local".into(),
                        uid: String::new(),
                        groups: Vec::new(),
                        extra: BTreeMap::new(),
                        csrf,
                    })
                } else {
                    Err(Refusal::BadToken("not this console's token".into()))
                }
            }
            Self::Cluster {
                client, reviews, ..
            } => {
                let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                if let Some((at, answer)) = lock(reviews).get(&digest).cloned()
                    && at.elapsed() < REVIEW_TTL
                {
                    return answer.map_err(Refusal::BadToken);
                }
                let answer = token_review(client, token, csrf).await?;
                let mut cache = lock(reviews);
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
                cache.insert(digest, (Instant::now(), answer.clone()));
                answer.map_err(Refusal::BadToken)
            }
        }
    }

    /// Whether `user` may do `access`.
    pub async fn allowed(&self, user: &User, access: &Access) -> Result<bool, Refusal> {
        match self {
            Self::Local { .. } => Ok(true),
            Self::Cluster {
                client,
                access: cache,
                ..
            } => {
                let key = (user.name.clone(), access.clone());
                if let Some((at, ok)) = lock(cache).get(&key).copied()
                    && at.elapsed() < ACCESS_TTL
                {
                    return Ok(ok);
                }
                let ok = access_review(client, user, access).await?;
                let mut cache = lock(cache);
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
                cache.insert(key, (Instant::now(), ok));
                Ok(ok)
            }
        }
    }
}

async fn token_review(
    client: &kube::Client,
    token: &str,
    csrf: String,
) -> Result<Result<User, String>, Refusal> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            // The API server's own audience: the token a kubeconfig holds.
            audiences: None,
        },
        ..Default::default()
    };
    let answer = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| Refusal::Unavailable(e.to_string()))?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Ok(Err(status.error.filter(|e| !e.is_empty()).unwrap_or_else(
            || "the API server did not authenticate it".into(),
        )));
    }
    let info = status.user.unwrap_or_default();
    let Some(name) = info.username.filter(|n| !n.is_empty()) else {
        return Ok(Err("the API server named no user for it".into()));
    };
    Ok(Ok(User {
        name,
        uid: info.uid.unwrap_or_default(),
        groups: info.groups.unwrap_or_default(),
        extra: info.extra.unwrap_or_default(),
        csrf,
    }))
}

async fn access_review(
    client: &kube::Client,
    user: &User,
    access: &Access,
) -> Result<bool, Refusal> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            uid: (!user.uid.is_empty()).then(|| user.uid.clone()),
            groups: Some(user.groups.clone()),
            extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                resource: Some(access.resource.into()),
                verb: Some(access.verb.into()),
                namespace: access.namespace.clone(),
                name: access.name.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| Refusal::Unavailable(e.to_string()))?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// The CSRF token of the session `token`: HMAC-SHA256 under the console's key, hex.
pub fn csrf_token(key: &[u8; 32], token: &str) -> String {
    #[allow(clippy::expect_used)]
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any size");
    mac.update(b"infermesh-console-csrf\0");
    mac.update(token.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh random secret as hex (32 bytes).
pub fn random_hex() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_differ_by_session_and_by_key() {
        let k1 = [1u8; 32];
        let k2 = [2u8; 32];
        assert_eq!(csrf_token(&k1, "a"), csrf_token(&k1, "a"));
        assert_ne!(csrf_token(&k1, "a"), csrf_token(&k1, "b"));
        assert_ne!(csrf_token(&k1, "a"), csrf_token(&k2, "a"));
        assert_eq!(csrf_token(&k1, "a").len(), 64);
        assert!(!csrf_token(&k1, "secret-token").contains("secret"));
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[tokio::test]
    async fn the_local_authority_takes_its_own_token_only() {
        let key = [7u8; 32];
        let a = Authority::Local {
            token: "t0k3n".into(),
        };
        let u = a.authenticate("t0k3n", &key).await.expect("own token");
        assert_eq!(u.name, "local");
        assert_eq!(u.csrf, csrf_token(&key, "t0k3n"));
        assert!(matches!(
            a.authenticate("other", &key).await,
            Err(Refusal::BadToken(_))
        ));
        assert_eq!(a.authenticate("", &key).await, Err(Refusal::NoToken));
        assert!(
            a.allowed(&u, &Access::all("delete", "workloads"))
                .await
                .expect("local")
        );
    }

    #[test]
    fn an_access_reads_like_kubectl_auth_can_i() {
        assert_eq!(
            Access::object("delete", "workloads", Some("team-a"), "w").describe(),
            "delete workloads/w in namespace team-a"
        );
        assert_eq!(
            Access::all("list", "agents").describe(),
            "list agents (cluster-wide)"
        );
    }
}
