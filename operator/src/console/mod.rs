//! The web console: the mesh, its agents, the workloads, the ledger and the live event log
//! in a browser, with the actions a person takes (suspend, resume, cancel, retry, drain).
//!
//! Served by `infermesh operator` on its HTTP port (reached with `kubectl port-forward` or
//! the chart's optional Ingress) and by `infermesh local --ui` on loopback. The pages are
//! rendered on the server ([`pages`]); htmx refreshes a page's live region when the event
//! log moves, which a page hears over Server-Sent Events ([`live`]); uPlot draws the
//! throughput chart. Both libraries are vendored at pinned versions with their sha256
//! ([`assets`]): nothing is fetched from the internet and there is no Node build step.
//!
//! Who may see and do what is [`auth`]'s: locally one random token; in a cluster the
//! person's own token, TokenReview and a SubjectAccessReview per read and action. Actions in
//! a cluster go through the Kubernetes API (a patch or a delete of the object, as `kubectl`
//! would send), so the controllers act on them as on any client's.

pub mod assets;
pub mod auth;
pub mod live;
pub mod pages;

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use futures::Stream;
use infermesh_crds::{Agent, Workload, WorkloadPhase};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use maud::Markup;
use tokio::sync::broadcast::error::RecvError;

use self::auth::{Access, Authority, Refusal, User};
use self::live::{Feed, Rates};
use self::pages::{EventQuery, Section};
use crate::core::progress::WorkloadSummary;
use crate::core::{Core, RetryOutcome, workload_key};
use crate::store::{EventFilter, EventRow, Store};

/// The session cookie: the person's bearer token, readable by no script.
pub const COOKIE: &str = "infermesh_session";
/// The field manager of the console's patches.
pub const FIELD_MANAGER: &str = "infermesh-console";
pub use infermesh_crds::workload::RETRY_ANNOTATION;
/// The Content-Security-Policy of every response: only this origin's scripts, styles and
/// connections; no inline script or style, no frames, forms only to this origin.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
/// How long the credits spent by a namespace are reused before the ledger is read again.
const SPENT_TTL: Duration = Duration::from_secs(5);

/// Credits spent by a namespace in the last hour and day, and when the ledger said so.
type Spent = (Instant, (i64, i64));

/// What the console needs: the core (what the operator believes now), who may see what,
/// and the live feeds.
pub struct Console<S: Store> {
    core: Arc<Core<S>>,
    authority: Authority,
    /// Signs the sessions' CSRF tokens; random per process.
    key: [u8; 32],
    feed: Arc<Feed>,
    rates: Arc<Rates>,
    /// Credits spent by a namespace in the last hour and day, and when that was read.
    spent: Mutex<HashMap<String, Spent>>,
    /// Pages rendered in the last [`PAGE_TTL`], by person and URL.
    pages: Mutex<HashMap<String, CachedPage>>,
    /// Moves at every action: a page rendered in an older generation is not served again.
    generation: std::sync::atomic::AtomicU64,
}

impl<S: Store> Console<S> {
    /// A console over `core`; call [`Console::start`] to make it live.
    pub fn new(core: Arc<Core<S>>, authority: Authority) -> Arc<Self> {
        use rand::Rng;
        Arc::new(Self {
            core,
            authority,
            key: rand::rng().random(),
            feed: Feed::new(),
            rates: Arc::new(Rates::default()),
            spent: Mutex::default(),
            pages: Mutex::default(),
            generation: Default::default(),
        })
    }

    /// Starts following the event log and sampling the rates (tasks that end with the
    /// runtime).
    pub fn start(self: &Arc<Self>) {
        tokio::spawn(self.feed.clone().follow(self.core.clone()));
        tokio::spawn(self.rates.clone().follow(self.core.clone()));
    }

    /// The event feed (for tests and benchmarks).
    pub fn feed(&self) -> &Arc<Feed> {
        &self.feed
    }

    /// The rates (for tests).
    pub fn rates(&self) -> &Arc<Rates> {
        &self.rates
    }
}

/// The console's routes; everything but the assets and the sign-in page needs a session.
pub fn router<S: Store>(console: Arc<Console<S>>) -> Router {
    let private = Router::new()
        .route("/", get(overview::<S>))
        .route("/agents", get(agents::<S>))
        .route("/agents/{id}/{action}", post(agent_action::<S>))
        .route("/workloads", get(workloads::<S>))
        .route("/workloads/{ns}/{name}/{uid}", get(workload::<S>))
        .route("/workloads/{ns}/{name}/{uid}/series", get(series::<S>))
        .route(
            "/workloads/{ns}/{name}/{uid}/{action}",
            post(workload_action::<S>),
        )
        .route("/ledger", get(ledger::<S>))
        .route("/events", get(events::<S>))
        .route("/events/stream", get(stream::<S>))
        .route("/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(console.clone(), cached::<S>))
        .route_layer(middleware::from_fn_with_state(
            console.clone(),
            authenticate::<S>,
        ));
    Router::new()
        .merge(private)
        .route("/login", get(login_page).post(login::<S>))
        .route("/assets/{file}", get(assets::serve))
        .layer(middleware::from_fn(security_headers))
        .with_state(console)
}

/// Headers on every response: the CSP, no sniffing, no referrer to other sites, not cached,
/// not framed.
async fn security_headers(req: Request, next: Next) -> Response {
    let is_asset = req.uri().path().starts_with("/assets/");
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        // Not `no-referrer`: with it a browser sends `Origin: null` on a form POST, and
        // the origin check could not tell this console's forms from another site's.
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !is_asset {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

/// The bearer token of a request: `Authorization: Bearer`, else the session cookie.
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some(t) = v.strip_prefix("Bearer ")
    {
        return Some(t.trim().to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

fn session_cookie(token: &str) -> String {
    format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/")
}

/// How long a rendered page is served again to the same person: many consoles open on one
/// page (a wall screen, a team) cost one render a second, not one each. Any action empties it.
pub const PAGE_TTL: Duration = Duration::from_secs(1);

/// A rendered page or region: when, the action generation it was rendered in, its head, its
/// body.
type CachedPage = (Instant, u64, http::response::Parts, axum::body::Bytes);

/// Serves a GET page again from the last second's render for the same person and URL (and
/// the same kind of request: the whole page or htmx's region); a POST (an action) empties
/// the cache, so the page it leads to shows what it did.
async fn cached<S: Store>(State(c): State<Arc<Console<S>>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if req.method() != axum::http::Method::GET || path == "/events/stream" {
        if req.method() == axum::http::Method::POST {
            // Before and after the action: a render already under way when it started must
            // not be stored as current.
            c.generation.fetch_add(1, Ordering::SeqCst);
            lock(&c.pages).clear();
            let res = next.run(req).await;
            c.generation.fetch_add(1, Ordering::SeqCst);
            lock(&c.pages).clear();
            return res;
        }
        return next.run(req).await;
    }
    let generation = c.generation.load(Ordering::SeqCst);
    let user = req
        .extensions()
        .get::<User>()
        .map(|u| u.name.clone())
        .unwrap_or_default();
    let key = format!(
        "{user}\0{}\0{}",
        req.uri(),
        req.headers().contains_key("hx-request")
    );
    if let Some((at, rendered_in, parts, body)) = lock(&c.pages).get(&key)
        && at.elapsed() < PAGE_TTL
        && *rendered_in == generation
    {
        return Response::from_parts(parts.clone(), axum::body::Body::from(body.clone()));
    }
    let res = next.run(req).await;
    if res.status() != StatusCode::OK {
        return res;
    }
    let (parts, body) = res.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 << 20).await else {
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Not rendered",
            "The page could not be rendered.",
        );
    };
    let mut pages = lock(&c.pages);
    if pages.len() >= 1_000 {
        pages.clear();
    }
    if c.generation.load(Ordering::SeqCst) == generation {
        pages.insert(
            key,
            (Instant::now(), generation, parts.clone(), bytes.clone()),
        );
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// A page's answer when something is refused or went wrong.
fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
    (status, Html(pages::problem(title, detail).into_string())).into_response()
}

fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// Signs the request in: the local token from `?token=` becomes a cookie (and leaves the
/// address bar), a session cookie or a bearer header is checked. A GET page without a
/// session goes to the sign-in page; anything else is answered 401.
async fn authenticate<S: Store>(
    State(c): State<Arc<Console<S>>>,
    mut req: Request,
    next: Next,
) -> Response {
    if c.authority.is_local()
        && req.method() == axum::http::Method::GET
        && let Some(query) = req.uri().query()
    {
        let mut token = None;
        let rest: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
            .filter_map(|(k, v)| {
                if k == "token" {
                    token = Some(v.into_owned());
                    None
                } else {
                    Some((k.into_owned(), v.into_owned()))
                }
            })
            .collect();
        if let Some(token) = token {
            if c.authority.authenticate(&token, &c.key).await.is_err() {
                return problem(
                    StatusCode::UNAUTHORIZED,
                    "Not signed in",
                    "This is not the token the console printed.",
                );
            }
            let mut to = req.uri().path().to_string();
            if !rest.is_empty() {
                to.push('?');
                to.push_str(
                    &url::form_urlencoded::Serializer::new(String::new())
                        .extend_pairs(rest)
                        .finish(),
                );
            }
            let mut res = Redirect::to(&to).into_response();
            if let Ok(v) = HeaderValue::from_str(&session_cookie(&token)) {
                res.headers_mut().insert(header::SET_COOKIE, v);
            }
            return res;
        }
    }
    let token = bearer(req.headers()).unwrap_or_default();
    match c.authority.authenticate(&token, &c.key).await {
        Ok(user) => {
            req.extensions_mut().insert(user);
            next.run(req).await
        }
        Err(Refusal::Unavailable(e)) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Cannot check your token",
            &format!("The API server could not be asked: {e}"),
        ),
        Err(e) => {
            if req.method() == axum::http::Method::GET
                && wants_html(req.headers())
                && !c.authority.is_local()
            {
                Redirect::to("/login").into_response()
            } else {
                problem(StatusCode::UNAUTHORIZED, "Not signed in", &e.to_string())
            }
        }
    }
}

async fn login_page() -> Html<String> {
    Html(pages::login(None).into_string())
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login<S: Store>(
    State(c): State<Arc<Console<S>>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if !same_origin(&headers) {
        return problem(
            StatusCode::FORBIDDEN,
            "Refused",
            "The sign-in form was posted from another site.",
        );
    }
    let token = f.token.trim();
    match c.authority.authenticate(token, &c.key).await {
        Ok(_) if token.bytes().all(|b| b.is_ascii_graphic() && b != b';') => {
            let mut res = Redirect::to("/").into_response();
            if let Ok(v) = HeaderValue::from_str(&session_cookie(token)) {
                res.headers_mut().insert(header::SET_COOKIE, v);
            }
            res
        }
        Ok(_) => (
            StatusCode::BAD_REQUEST,
            Html(
                pages::login(Some("That token has characters a session cannot hold."))
                    .into_string(),
            ),
        )
            .into_response(),
        Err(e) => (
            StatusCode::UNAUTHORIZED,
            Html(pages::login(Some(&e.to_string())).into_string()),
        )
            .into_response(),
    }
}

async fn logout() -> Response {
    let mut res = Redirect::to("/login").into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "infermesh_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
        ),
    );
    res
}

/// Whether a POST came from a page of this console: an `Origin` (or, failing that,
/// `Referer`) naming another host is refused. (The CSRF token is the main defence; this is
/// the second.)
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let from = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok());
    match (from, host) {
        (None, _) => true,
        (Some("null"), _) => false,
        (Some(from), Some(host)) => url::Url::parse(from).is_ok_and(|u| {
            let authority = match u.port() {
                Some(p) => format!("{}:{p}", u.host_str().unwrap_or_default()),
                None => u.host_str().unwrap_or_default().to_string(),
            };
            authority.eq_ignore_ascii_case(host)
        }),
        (Some(_), None) => false,
    }
}

/// Checks an action's CSRF token (form field `csrf` or header `X-CSRF-Token`) and origin.
fn check_csrf(user: &User, headers: &HeaderMap, form: Option<&str>) -> Result<(), Box<Response>> {
    let sent = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .or(form)
        .unwrap_or_default();
    if !auth::constant_time_eq(sent.as_bytes(), user.csrf.as_bytes()) {
        return Err(Box::new(problem(
            StatusCode::FORBIDDEN,
            "Refused",
            "The action did not carry this session's CSRF token: nothing was done. Reload the page and try again.",
        )));
    }
    if !same_origin(headers) {
        return Err(Box::new(problem(
            StatusCode::FORBIDDEN,
            "Refused",
            "The action came from another site: nothing was done.",
        )));
    }
    Ok(())
}

impl<S: Store> Console<S> {
    /// Whether `user` may do `access`; a refusal page when not, or when the API server
    /// cannot be asked.
    async fn require(&self, user: &User, access: Access) -> Result<(), Response> {
        match self.authority.allowed(user, &access).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(problem(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!("You ({}) may not {}.", user.name, access.describe()),
            )),
            Err(e) => Err(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Cannot check your access",
                &e.to_string(),
            )),
        }
    }

    async fn may(&self, user: &User, access: Access) -> bool {
        self.authority.allowed(user, &access).await.unwrap_or(false)
    }

    /// The workloads `user` may list, and how many namespaces were hidden.
    async fn visible_workloads(&self, user: &User) -> (Vec<WorkloadSummary>, usize) {
        let mut all = self.core.workloads().await;
        // In a cluster the core lets a finished workload go once its final status is
        // written: those come from the API server, as `kubectl get` shows them.
        if let Authority::Cluster { client, .. } = &self.authority
            && let Ok(list) = Api::<Workload>::all(client.clone())
                .list(&Default::default())
                .await
        {
            let held: std::collections::HashSet<String> =
                all.iter().map(|w| w.uid.clone()).collect();
            all.extend(
                list.items
                    .iter()
                    .map(summary_from_object)
                    .filter(|w| !held.contains(&w.uid)),
            );
        }
        if self.authority.is_local() || self.may(user, Access::all("list", "workloads")).await {
            return (all, 0);
        }
        let namespaces: BTreeSet<String> = all.iter().map(|w| w.namespace.clone()).collect();
        let mut allowed = BTreeSet::new();
        for ns in &namespaces {
            if self
                .may(user, Access::namespaced("list", "workloads", ns))
                .await
            {
                allowed.insert(ns.clone());
            }
        }
        let hidden = namespaces.len() - allowed.len();
        (
            all.into_iter()
                .filter(|w| allowed.contains(&w.namespace))
                .collect(),
            hidden,
        )
    }

    /// Credits spent by `namespace` in the last hour and day (micro-credits, positive).
    async fn spent(&self, namespace: &str) -> (i64, i64) {
        if let Some((at, v)) = lock(&self.spent).get(namespace).copied()
            && at.elapsed() < SPENT_TTL
        {
            return v;
        }
        let now = chrono::Utc::now();
        let fmt = |t: chrono::DateTime<chrono::Utc>| {
            t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        };
        let hour_ago = fmt(now - chrono::Duration::hours(1));
        let lines = self
            .core
            .store()
            .statement(
                &format!("namespace/{namespace}"),
                &fmt(now - chrono::Duration::days(1)),
                &fmt(now),
            )
            .await
            .unwrap_or_default();
        let (mut hour, mut day) = (0i64, 0i64);
        for l in lines.iter().filter(|l| l.kind == "charge") {
            let spent = l.amount.saturating_neg().max(0);
            day = day.saturating_add(spent);
            if l.at >= hour_ago {
                hour = hour.saturating_add(spent);
            }
        }
        lock(&self.spent).insert(namespace.to_string(), (Instant::now(), (hour, day)));
        (hour, day)
    }

    /// Whether `user` may read the event `e`: a workload's needs `get` on it (its namespace
    /// from the core; a workload the core no longer holds needs `list workloads` in every
    /// namespace), an agent's needs `list agents`.
    async fn may_read_event(
        &self,
        user: &User,
        e: &EventRow,
        namespaces: &HashMap<String, String>,
    ) -> bool {
        if self.authority.is_local() {
            return true;
        }
        match &e.workload_uid {
            Some(uid) => match namespaces.get(uid) {
                Some(ns) => {
                    self.may(user, Access::namespaced("get", "workloads", ns))
                        .await
                }
                None => self.may(user, Access::all("list", "workloads")).await,
            },
            None => self.may(user, Access::all("list", "agents")).await,
        }
    }

    async fn uid_namespaces(&self) -> HashMap<String, String> {
        self.core
            .workloads()
            .await
            .into_iter()
            .map(|w| (w.uid, w.namespace))
            .collect()
    }
}

/// What the console shows of a Workload the core no longer holds (finished, its final status
/// written and its summary released): its status as the API server has it.
pub fn summary_from_object(w: &Workload) -> WorkloadSummary {
    use kube::ResourceExt;
    let status = w.status.clone().unwrap_or_default();
    let (namespace, name) = (w.namespace().unwrap_or_default(), w.name_any());
    let uid = w.uid().unwrap_or_default();
    let pct: u64 = status
        .progress
        .as_deref()
        .and_then(|p| p.trim_end_matches('%').parse().ok())
        .unwrap_or(0);
    let time = |t: &Option<String>| {
        t.as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    };
    let elapsed = match (time(&status.start_time), time(&status.completion_time)) {
        (Some(a), Some(b)) => (b - a).to_std().unwrap_or_default(),
        (Some(a), None) => (chrono::Utc::now().fixed_offset() - a)
            .to_std()
            .unwrap_or_default(),
        _ => Duration::ZERO,
    };
    // The condition that says most: Failed, else Complete, else the newest.
    let conditions = serde_json::to_value(&status.conditions).unwrap_or_default();
    let pick = conditions.as_array().and_then(|c| {
        ["Failed", "Complete"]
            .iter()
            .find_map(|t| c.iter().find(|x| x["type"] == *t && x["status"] == "True"))
            .or_else(|| c.last())
            .cloned()
    });
    let field = |k: &str| {
        pick.as_ref()
            .and_then(|c| c[k].as_str())
            .unwrap_or_default()
            .to_string()
    };
    WorkloadSummary {
        key: workload_key(&namespace, &name, &uid),
        uid,
        namespace,
        name,
        mesh: w.spec.mesh.clone(),
        phase: status.phase,
        reason: field("reason"),
        message: field("message"),
        shards_total: status.shards.total,
        shards_pending: status.shards.pending,
        shards_running: status.shards.running,
        shards_succeeded: status.shards.succeeded,
        shards_failed: status.shards.failed,
        records: status.records,
        bytes_done: pct,
        input_bytes: 100,
        elapsed,
        credits: status
            .credits_spent
            .as_deref()
            .and_then(|c| c.parse::<f64>().ok())
            .and_then(|c| crate::core::pricing::credits_to_micro(c).ok())
            .unwrap_or(0),
        attempts_retried: status.attempts_retried,
        suspended: w.spec.suspend,
        output_uri: w.spec.output.uri.clone(),
        warnings: Vec::new(),
        waiting: None,
    }
}

/// Whether a name from a URL can be a Kubernetes object's name, namespace or uid (or an
/// agent id): 1 to 253 of `A-Z a-z 0-9 . - _`. Anything else (a `/`, `..` alone, a NUL) is
/// refused before it reaches an access review or an API path.
pub fn valid_name(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

fn bad_name() -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        "Not a name",
        "A namespace, name, uid or agent id in this address is not one Kubernetes allows.",
    )
}

/// Locks a console cache; a panic elsewhere while it was held leaves it usable (a cache
/// holds nothing that could be half-written into a wrong answer).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A page, or its live region alone for htmx's refresh.
struct Page<'a> {
    title: &'a str,
    section: Section,
    /// The page's own URL (what its live region is refreshed from).
    url: &'a str,
    /// The query of its live event stream.
    stream: &'a str,
}

fn respond(
    headers: &HeaderMap,
    user: &User,
    page: Page<'_>,
    before: Option<Markup>,
    body: Markup,
) -> Response {
    let region = pages::region(page.url, body);
    if headers.contains_key("hx-request") {
        return Html(region.into_string()).into_response();
    }
    let whole = maud::html! { @if let Some(b) = before { (b) } (region) };
    Html(pages::page(page.title, page.section, user, page.url, page.stream, whole).into_string())
        .into_response()
}

async fn overview<S: Store>(
    State(c): State<Arc<Console<S>>>,
    axum::Extension(user): axum::Extension<User>,
    headers: HeaderMap,
) -> Response {
    let agents_visible = c.may(&user, Access::all("list", "agents")).await;
    let agents = if agents_visible {
        c.core.agents().await
    } else {
        Vec::new()
    };
    let (workloads, _) = c.visible_workloads(&user).await;
    let mut o = pages::Overview {
        agents_visible,
        agents_total: agents.len(),
        ..Default::default()
    };
    for a in agents.iter().filter(|a| a.connected) {
        o.gpus += u64::from(a.gpus);
        o.slots_busy += u64::from(a.running);
        if !a.unschedulable {
            o.agents_ready += 1;
            o.slots_free += u64::from(a.slots.saturating_sub(a.running));
        }
    }
    let phases = [
        WorkloadPhase::Pending,
        WorkloadPhase::Running,
        WorkloadPhase::Succeeded,
        WorkloadPhase::Failed,
    ];
    o.phases = phases.map(|p| {
        (
            format!("{p:?}"),
            workloads.iter().filter(|w| w.phase == p).count(),
        )
    });
    let mut namespaces = BTreeSet::new();
    for w in &workloads {
        if !w.phase.is_terminal() {
            o.queue += u64::from(w.shards_pending);
        }
        o.records_per_second += c.rates.current(&w.key);
        namespaces.insert(w.namespace.clone());
    }
    if !namespaces.is_empty() {
        let (mut hour, mut day) = (0i64, 0i64);
        for ns in &namespaces {
            let (h, d) = c.spent(ns).await;
            hour = hour.saturating_add(h);
            day = day.saturating_add(d);
        }
        o.spent = Some((hour, day));
    }
    respond(
        &headers,
        &user,
        Page {
            title: "Overview",
            section: Section::Overview,
            url: "/",
            stream: "",
        },
        None,
        pages::overview(&o),
    )
}

async fn agents<S: Store>(
    State(c): State<Arc<Console<S>>>,
    axum::Extension(user): axum::Extension<User>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = c.require(&user, Access::all("list", "agents")).await {
        return r;
    }
    let can_drain = c.may(&user, Access::all("patch", "agents")).await;
    let mut list = c.core.agents().await;
    list.sort_by(|a, b| a.id.cmp(&b.id));
    respond(
        &headers,
        &user,
        Page {
            title: "Agents",
            section: Section::Agents,
            url: "/agents",
            stream: "",
        },
        None,
        pages::agents(&list, can_drain, &user.csrf),
    )
}

#[derive(serde::Deserialize, Default)]
struct PhaseQuery {
    #[serde(default)]
    phase: Option<String>,
}

async fn workloads<S: Store>(
    State(c): State<Arc<Console<S>>>,
    axum::Extension(user): axum::Extension<User>,
    headers: HeaderMap,
    Query(q): Query<PhaseQuery>,
) -> Response {
    let (mut list, hidden) = c.visible_workloads(&user).await;
    if let Some(p) = q.phase.as_deref().filter(|p| !p.is_empty()) {
        list.retain(|w| format!("{:?}", w.phase) == p);
    }
    let url = match q.phase.as_deref().filter(|p| !p.is_empty()) {
        Some(p) => format!("/workloads?phase={}", pages::enc(p)),
        None => "/workloads".into(),
    };
    respond(
        &headers,
        &user,
        Page {
            title: "Workloads",
            section: Section::Workloads,
            url: &url,
            stream: "",
        },
        None,
        pages::workloads(&list, hidden),
    )
}

/// The kinds shown on a workload's timeline (not every shard's assignment and completion).
const TIMELINE_KINDS: [&str; 9] = [
    "workload.admitted",
    "workload.held",
    "workload.model_changed",
    "workload.retried",
    "workload.succeeded",
    "workload.failed",
    "shard.failed",
    "shard.requeued",
    "shard.report_refused",
];

async fn workload<S: Store>(
    State(c): State<Arc<Console<S>>>,
    axum::Extension(user): axum::Extension<User>,
    headers: HeaderMap,
    Path((ns, name, uid)): Path<(String, String, String)>,
) -> Response {
    if ![&ns, &name, &uid].iter().all(|s| valid_name(s)) {
        return bad_name();
    }
    if let Err(r) = c
        .require(&user, Access::object("get", "workloads", Some(&ns), &name))
        .await
    {
        return r;
    }
    let key = workload_key(&ns, &name, &uid);
    let held = match c.core.workload(&key).await {
        Some(w) => Some(w),
        None => match &c.authority {
            Authority::Cluster { client, .. } => Api::<Workload>::namespaced(client.clone(), &ns)
                .get_opt(&name)
                .await
                .ok()
                .flatten()
                .map(|w| summary_from_object(&w))
                .filter(|w| w.uid == uid),
            Authority::Local { .. } => None,
        },
    };
    let Some(w) = held else {
        return problem(
            StatusCode::NOT_FOUND,
            "No such workload",
            &format!("The operator holds no workload {ns}/{name} with uid {uid}."),
        );
    };
    let store = c.core.store();
    let of_kind = |kind: &str, limit: i64| EventFilter {
        workload_uid: Some(uid.clone()),
        kind: Some(kind.to_string()),
        limit: Some(limit),
        ..Default::default()
    };
    let failures = store
        .events(&of_kind("shard.failed", 200))
        .await
        .unwrap_or_default();
    let mut timeline = Vec::new();
    for kind in TIMELINE_KINDS {
        timeline.extend(store.events(&of_kind(kind, 50)).await.unwrap_or_default());
    }
    timeline.sort_by_key(|e| e.seq);
    let skip = timeline.len().saturating_sub(100);
    timeline.drain(..skip);
    let grid = match c.core.shard_cells(&key) {
        Some(cells) => {
            let failed: HashMap<u32, (String, String)> = failures
                .iter()
                .filter_map(|e| {
                    let i = u32::try_from(e.shard?).ok()?;
                    Some((i, (e.at.clone(), e.message.clone())))
                })
                .collect();
            pages::grid_from_cells(&cells, &|i| failed.get(&i).cloned())
        }
        None => {
            let mut events = store
                .events(&of_kind("shard.completed", i64::from(w.shards_total) + 1))
                .await
                .unwrap_or_default();
            events.extend(failures.iter().cloned());
            events.sort_by_key(|e| e.seq);
            pages::grid_from_events(w.shards_total, &events)
        }
    };
    let can = pages::WorkloadActions {
        patch: c
            .may(
                &user,
                Access::object("patch", "workloads", Some(&ns), &name),
            )
            .await,
        delete: c
            .may(
                &user,
                Access::object("delete", "workloads", Some(&ns), &name),
            )
            .await,
    };
    let url = pages::workload_url(&w);
    let stream = EventQuery {
        workload: Some(uid.clone()),
        ..Default::default()
    }
    .query();
    respond(
        &headers,
        &user,
        Page {
            title: &format!("{}/{}", w.namespace, w.name),
            section: Section::Workloads,
            url: &url,
            stream: &stream,
        },
        Some(pages::chart(&format!("{url}/series"))),
        pages::workload(&w, &grid, &failures, &timeline, can, &user.csrf),
    )
}

async fn series<S: Store>(
    State(c): State<Arc<Console<S>>>,
    axum::Extension(user): axum::Extension<User>,
    Path((ns, name, uid)): Path<(String, String, String)>,
) -> Response {
    if ![&ns, &name, &uid].iter().all(|s| valid_name(s)) {
        return bad_name();
    }
    if let Err(r) = c
        .require(&user, Access::object("get", "workloads", Some(&ns), &name))
        .await
    {
        return r;
    }
    let points = c.rates.series(&workload_key(&ns, &name, &uid));
    let (t, rps): (Vec<f64>, Vec<f64>) = points.into_iter().unzip();
    axum::Json(serde_json::json!({ "t": t, "rps": rps })).into_response()
}

#[derive(serde::Deserialize, Default)]
struct ActionForm {
    #[serde(default)]
    csrf: Option<String>,
}

async fn workload_action<S: Store>(
    State(c): State<Arc<Console<S>>>,
    axum::Extension(user): axum::Extension<User>,
    headers: HeaderMap,
    Path((ns, name, uid, action)): Path<(String, String, String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    if ![&ns, &name, &uid].iter().all(|s| valid_name(s)) {
        return bad_name();
    }
    if let Err(r) = check_csrf(&user, &headers, form.csrf.as_deref()) {
        return *r;
    }
    let verb = match action.as_str() {
        "suspend" | "resume" | "retry" => "patch",
        "cancel" => "delete",
        _ => {
            return problem(
                StatusCode::NOT_FOUND,
                "No such action",
                &format!("`{action}` is not an action on a workload."),
            );
        }
    };
    if let Err(r) = c
        .require(&user, Access::object(verb, "workloads", Some(&ns), &name))
        .await
    {
        return r;
    }
    let key = workload_key(&ns, &name, &uid);
    tracing::info!(user = %user.name, workload = %key, %action, "console action");
    let done = match &c.authority {
        Authority::Local { .. } => local_workload_action(&c.core, &key, &action, &user).await,
        Authority::Cluster { client, .. } => {
            cluster_workload_action(client, &ns, &name, &uid, &action).await
        }
    };
    match done {
        Ok(()) => Redirect::to(&format!(
            "/workloads/{}/{}/{}",
            pages::enc(&ns),
            pages::enc(&name),
            pages::enc(&uid)
        ))
        .into_response(),
        Err((status, detail)) => problem(status, "Not done", &detail),
    }
}

type ActionResult = Result<(), (StatusCode, String)>;

async fn local_workload_action<S: Store>(
    core: &Core<S>,
    key: &str,
    action: &str,
    user: &User,
) -> ActionResult {
    let unavailable = |e: crate::core::CoreError| (StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    let unknown = || {
        (
            StatusCode::NOT_FOUND,
            format!("the operator holds no workload {key}"),
        )
    };
    match action {
        "suspend" | "resume" => {
            if core
                .set_suspend(key, action == "suspend")
                .await
                .map_err(unavailable)?
            {
                Ok(())
            } else {
                Err(unknown())
            }
        }
        "cancel" => {
            let message = format!("cancelled from the console by {}", user.name);
            if core
                .cancel(key, "Cancelled", &message)
                .await
                .map_err(unavailable)?
            {
                Ok(())
            } else {
                Err(unknown())
            }
        }
        _ => match core.retry_failed(key).await.map_err(unavailable)? {
            RetryOutcome::Retried { .. } => Ok(()),
            RetryOutcome::NotFailed { phase } => Err((
                StatusCode::CONFLICT,
                format!("only a failed workload is retried; this one is {phase}"),
            )),
            RetryOutcome::Unknown => Err(unknown()),
            other => Err((StatusCode::SERVICE_UNAVAILABLE, format!("{other:?}"))),
        },
    }
}

async fn cluster_workload_action(
    client: &kube::Client,
    ns: &str,
    name: &str,
    uid: &str,
    action: &str,
) -> ActionResult {
    let api = Api::<Workload>::namespaced(client.clone(), ns);
    let params = PatchParams::apply(FIELD_MANAGER);
    let params = PatchParams {
        force: false,
        ..params
    };
    // The uid in the patch is a precondition: a Workload deleted and created again under the
    // same name since the page was drawn is not touched.
    let result = match action {
        "suspend" | "resume" => api
            .patch(
                name,
                &params,
                &Patch::Merge(serde_json::json!({
                    "metadata": {"uid": uid},
                    "spec": {"suspend": action == "suspend"}
                })),
            )
            .await
            .map(|_| ()),
        "retry" => api
            .patch(
                name,
                &params,
                &Patch::Merge(serde_json::json!({
                    "metadata": {"uid": uid, "annotations": {
                        RETRY_ANNOTATION: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                    }}
                })),
            )
            .await
            .map(|_| ()),
        _ => api
            .delete(
                name,
                &DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: Some(uid.to_string()),
                        resource_version: None,
                    }),
                    ..Default::default()
                },
            )
            .await
            .map(|_| ()),
    };
    result.map_err(api_error)
}

fn api_error(e: kube::Error) -> (StatusCode, String) {
    match e {
        kube::Error::Api(s) => (
            StatusCode::from_u16(s.code).unwrap_or(StatusCode::BAD_GATEWAY),
            format!("the API server said: {}", s.message),
        ),
        other => (
            StatusCode::BAD_GATEWAY,
            format!("the API server could not be reached: {other}"),
        ),
    }
}

async fn agent_action<S: Store>(
    State(c): State<Arc<Console<S>>>,
    axum::Extension(user): axum::Extension<User>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    if !valid_name(&id) {
        return bad_name();
    }
    if let Err(r) = check_csrf(&user, &headers, form.csrf.as_deref()) {
        return *r;
    }
    let drain = match action.as_str() {
        "drain" => true,
        "undrain" => false,
        _ => {
            return problem(
                StatusCode::NOT_FOUND,
                "No such action",
                &format!("`{action}` is not an action on an agent."),
            );
        }
    };
    if let Err(r) = c
        .require(&user, Access::object("patch", "agents", None, &id))
        .await
    {
        return r;
    }
    tracing::info!(user = %user.name, agent = %id, %action, "console action");
    let done: ActionResult = match &c.authority {
        Authority::Local { .. } => {
            if c.core.agents().await.iter().any(|a| a.id == id) {
                c.core
                    .set_unschedulable(&id, drain)
                    .await
                    .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
            } else {
                Err((StatusCode::NOT_FOUND, format!("no agent {id}")))
            }
        }
        Authority::Cluster { client, .. } => Api::<Agent>::all(client.clone())
            .patch(
                &id,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &Patch::Merge(serde_json::json!({"spec": {"unschedulable": drain}})),
            )
            .await
            .map(|_| ())
            .map_err(api_error),
    };
    match done {
        Ok(()) => Redirect::to("/agents").into_response(),
        Err((status, detail)) => problem(status, "Not done", &detail),
    }
}

#[derive(serde::Deserialize, Default)]
struct LedgerQuery {
    #[serde(default)]
    account: Option<String>,
}

async fn ledger<S: Store>(
    State(c): State<Arc<Console<S>>>,
    axum::Extension(user): axum::Extension<User>,
    headers: HeaderMap,
    Query(q): Query<LedgerQuery>,
) -> Response {
    let store = c.core.store();
    let balances = match store.balances().await {
        Ok(b) => b,
        Err(e) => {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "The ledger cannot be read",
                &e.to_string(),
            );
        }
    };
    let mut view = pages::LedgerView::default();
    for (account, balance) in balances {
        if may_read_account(&c, &user, &account).await {
            view.balances.push((account, balance));
        } else {
            view.hidden += 1;
        }
    }
    if let Some(account) = q.account.filter(|a| !a.is_empty()) {
        if !may_read_account(&c, &user, &account).await {
            return problem(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!("You ({}) may not read the account {account}.", user.name),
            );
        }
        let lines = store
            .statement(&account, "0000-01-01T00:00:00Z", "9999-12-31T23:59:59Z")
            .await
            .unwrap_or_default();
        view.statement = Some((account, lines));
    }
    if c.may(&user, Access::all("list", "meshes")).await
        && c.may(&user, Access::all("list", "workloads")).await
    {
        view.verify = store.verify().await.ok();
    }
    let url = match &view.statement {
        Some((a, _)) => format!("/ledger?account={}", pages::enc(a)),
        None => "/ledger".into(),
    };
    respond(
        &headers,
        &user,
        Page {
            title: "Ledger",
            section: Section::Ledger,
            url: &url,
            stream: "",
        },
        None,
        pages::ledger(&view),
    )
}

/// Who may read an account: a namespace's, whoever may list workloads there; an agent's,
/// whoever may list agents; a Mesh's, whoever may list meshes.
async fn may_read_account<S: Store>(c: &Console<S>, user: &User, account: &str) -> bool {
    match account.split_once('/') {
        Some(("namespace", ns)) => {
            c.may(user, Access::namespaced("list", "workloads", ns))
                .await
        }
        Some(("agent", _)) => c.may(user, Access::all("list", "agents")).await,
        Some(("mesh", _)) => c.may(user, Access::all("list", "meshes")).await,
        _ => c.authority.is_local(),
    }
}

async fn events<S: Store>(
    State(c): State<Arc<Console<S>>>,
    axum::Extension(user): axum::Extension<User>,
    headers: HeaderMap,
    Query(q): Query<EventQuery>,
) -> Response {
    let namespaces = c.uid_namespaces().await;
    let mut rows = Vec::new();
    for r in c.feed.recent() {
        if q.matches(&r.event) && c.may_read_event(&user, &r.event, &namespaces).await {
            rows.push(r);
        }
    }
    let html: Vec<&str> = rows.iter().map(|r| r.html.as_str()).collect();
    let after = rows
        .last()
        .map_or_else(|| c.feed.last_seq(), |r| r.event.seq.max(c.feed.last_seq()));
    let mut stream = q.query();
    if !stream.is_empty() {
        stream.push('&');
    }
    stream.push_str(&format!("rows=1&after={after}"));
    let body = pages::events(&html, &q);
    // The table grows from the stream; it is not a refreshed region.
    if headers.contains_key("hx-request") {
        return Html(body.into_string()).into_response();
    }
    Html(pages::page("Events", Section::Events, &user, "/events", &stream, body).into_string())
        .into_response()
}

#[derive(serde::Deserialize, Default)]
struct StreamQuery {
    #[serde(flatten)]
    filter: EventQuery,
    #[serde(default)]
    after: Option<i64>,
    /// `rows=1`: the rows themselves (the events page); otherwise a `tick` when rows the
    /// page would show moved.
    #[serde(default)]
    rows: Option<u8>,
}

/// The most rows one message carries (a page keeps no more).
const ROWS_PER_MESSAGE: usize = 100;

/// The live event log as Server-Sent Events. With `rows=1` (the events page) each message is
/// `event: rows` with the rows' HTML; otherwise `event: tick` with no data, telling the page its
/// rows moved so it refreshes its region. `id:` is the last sequence number the message covers.
/// A page that reconnects sends `Last-Event-ID` (or `?after=`) and gets what it missed from the
/// store first.
async fn stream<S: Store>(
    State(c): State<Arc<Console<S>>>,
    axum::Extension(user): axum::Extension<User>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .or(q.after);
    let rx = c.feed.subscribe();
    let last = resume.unwrap_or_else(|| c.feed.last_seq());
    let state = StreamState {
        console: c,
        user,
        filter: q.filter,
        rows: q.rows == Some(1),
        rx,
        last,
        caught_up: resume.is_none(),
        namespaces: (None, HashMap::new()),
    };
    let events = futures::stream::unfold(state, |mut st| async move {
        loop {
            if !st.caught_up {
                st.caught_up = true;
                let missed = st.missed().await;
                if let Some(msg) = st.message(&missed).await {
                    return Some((Ok(msg), st));
                }
                continue;
            }
            match st.rx.recv().await {
                Ok(batch) => {
                    // The batch is shared by every page: borrowed, never copied per page.
                    let from = batch.rows.partition_point(|r| r.event.seq <= st.last);
                    if let Some(msg) = st.message(&batch.rows[from..]).await {
                        return Some((Ok(msg), st));
                    }
                }
                // This page fell behind the feed: what it missed comes from the store.
                Err(RecvError::Lagged(_)) => st.caught_up = false,
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

struct StreamState<S: Store> {
    console: Arc<Console<S>>,
    user: User,
    filter: EventQuery,
    /// Send the rows (the events page), or only a tick.
    rows: bool,
    rx: tokio::sync::broadcast::Receiver<Arc<live::Batch>>,
    /// The last sequence number this page has (sent, or skipped by its filter).
    last: i64,
    caught_up: bool,
    /// Workload uid -> namespace, refreshed at most every few seconds.
    namespaces: (Option<Instant>, HashMap<String, String>),
}

impl<S: Store> StreamState<S> {
    /// What the store has after `last`, at most a page's worth (the newest).
    async fn missed(&mut self) -> Vec<live::Row> {
        let rows = self
            .console
            .core
            .store()
            .events(&EventFilter {
                after_seq: Some(self.last),
                workload_uid: self.filter.workload.clone().filter(|s| !s.is_empty()),
                agent: self.filter.agent.clone().filter(|s| !s.is_empty()),
                kind: self.filter.kind.clone().filter(|s| !s.is_empty()),
                limit: Some(10_000),
                ..Default::default()
            })
            .await
            .unwrap_or_default();
        rows.into_iter()
            .map(|event| live::Row {
                html: pages::event_row(&event).into_string(),
                event,
            })
            .collect()
    }

    /// The message for `rows` (those this page wants and may read), or none.
    async fn message(&mut self, rows: &[live::Row]) -> Option<SseEvent> {
        let last = rows.last().map(|r| r.event.seq)?;
        self.last = self.last.max(last);
        if !self.console.authority.is_local()
            && self
                .namespaces
                .0
                .is_none_or(|at| at.elapsed() > Duration::from_secs(5))
        {
            self.namespaces = (Some(Instant::now()), self.console.uid_namespaces().await);
        }
        // A page other than the events page only needs to hear that its rows moved (it
        // refreshes its region): one tiny `tick`, not the rows.
        let wanted = if self.rows { ROWS_PER_MESSAGE } else { 1 };
        let mut picked: Vec<&str> = Vec::new();
        for r in rows.iter().rev() {
            if picked.len() == wanted {
                break;
            }
            if self.filter.matches(&r.event)
                && self
                    .console
                    .may_read_event(&self.user, &r.event, &self.namespaces.1)
                    .await
            {
                picked.push(&r.html);
            }
        }
        if picked.is_empty() {
            return None;
        }
        let event = SseEvent::default().id(self.last.to_string());
        Some(if self.rows {
            // Oldest first within the message.
            picked.reverse();
            event.event("rows").data(picked.concat())
        } else {
            // An event with no data is never dispatched by a browser's EventSource.
            event.event("tick").data("1")
        })
    }
}

/// Serves a console on `listener` until the process ends (the local console's own port;
/// the operator merges [`router`] into its HTTP port instead).
pub async fn serve<S: Store>(
    listener: tokio::net::TcpListener,
    console: Arc<Console<S>>,
) -> std::io::Result<()> {
    axum::serve(listener, router(console)).await
}

#[cfg(test)]
mod tests;
