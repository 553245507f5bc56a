//! The console's HTML: pure functions from what the core, the store and the access checks
//! said to markup (maud escapes every value it writes). Each page is a layout around one
//! live region; an htmx request for the page's own URL gets the region alone, so a page is
//! refreshed in place when the event log moves, never reloaded.

use std::time::Duration;

use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::auth::User;
use crate::core::pricing::format_credits;
use crate::core::progress::{AgentSummary, ShardCell, WorkloadSummary, format_duration};
use crate::store::{EventRow, StatementLine, VerifyReport};

/// The most cells of the shard grid: a larger workload shows ranges of shards per cell.
pub const GRID_CELLS: usize = 2_000;

/// Which section a page belongs to (the navigation marks it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// `/`.
    Overview,
    /// `/agents`.
    Agents,
    /// `/workloads`.
    Workloads,
    /// `/ledger`.
    Ledger,
    /// `/events`.
    Events,
}

const SECTIONS: [(Section, &str, &str); 5] = [
    (Section::Overview, "/", "Overview"),
    (Section::Agents, "/agents", "Agents"),
    (Section::Workloads, "/workloads", "Workloads"),
    (Section::Ledger, "/ledger", "Ledger"),
    (Section::Events, "/events", "Events"),
];

/// A whole page: `region` inside the layout. `stream` is the query of the page's live event
/// stream (`workload=UID`), `url` the page's own URL (what a refresh asks for).
pub fn page(
    title: &str,
    section: Section,
    user: &User,
    url: &str,
    stream: &str,
    region: Markup,
) -> Markup {
    let csrf_header = format!(r#"{{"X-CSRF-Token":"{}"}}"#, user.csrf);
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                // htmx may not inject styles (the CSP allows none inline) or evaluate code.
                meta name="htmx-config" content=r#"{"includeIndicatorStyles":false,"allowEval":false,"allowScriptTags":false,"historyCacheSize":0}"#;
                title { (title) " · infermesh" }
                link rel="stylesheet" href="/assets/uPlot.min.css";
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/htmx.min.js" defer {}
                script src="/assets/uPlot.iife.min.js" defer {}
                script src="/assets/console.js" defer {}
            }
            body hx-headers=(csrf_header) data-stream=(stream) data-url=(url) {
                a.skip href="#main" { "Skip to content" }
                header {
                    span.brand { "infermesh" }
                    nav aria-label="Sections" {
                        ul {
                            @for (s, href, label) in SECTIONS {
                                li {
                                    a href=(href) aria-current=[(s == section).then_some("page")] { (label) }
                                }
                            }
                        }
                    }
                    span.who { (user.name) }
                    span #live-status role="status" aria-live="polite" { "connecting" }
                }
                main #main tabindex="-1" {
                    h1 { (title) }
                    (region)
                }
            }
        }
    }
}

/// The live region of a page: refreshed from `url` when the event log moves.
pub fn region(url: &str, body: Markup) -> Markup {
    html! {
        div #region hx-get=(url) hx-trigger="im:refresh from:body" hx-swap="outerHTML" {
            (body)
        }
    }
}

/// What the overview shows.
#[derive(Clone, Debug, Default)]
pub struct Overview {
    /// Agents whose stream is up (and not drained).
    pub agents_ready: usize,
    /// Agents known.
    pub agents_total: usize,
    /// GPUs of the connected agents.
    pub gpus: u64,
    /// Slots running a shard.
    pub slots_busy: u64,
    /// Slots free on connected, schedulable agents.
    pub slots_free: u64,
    /// Whether the person may see the agents (else the figures above are hidden).
    pub agents_visible: bool,
    /// Shards waiting, over the workloads the person may see.
    pub queue: u64,
    /// Workloads by phase.
    pub phases: [(String, usize); 4],
    /// Records per second now, over the workloads the person may see.
    pub records_per_second: f64,
    /// Credits spent in the last hour and day (micro-credits), where the person may see them.
    pub spent: Option<(i64, i64)>,
}

/// The overview's region.
pub fn overview(o: &Overview) -> Markup {
    html! {
        section aria-labelledby="h-mesh" {
            h2 #h-mesh { "Mesh" }
            dl.tiles {
                @if o.agents_visible {
                    div { dt { "Agents ready" } dd #agents-ready { (o.agents_ready) " / " (o.agents_total) } }
                    div { dt { "GPUs" } dd { (o.gpus) } }
                    div { dt { "Slots busy / free" } dd #slots { (o.slots_busy) " / " (o.slots_free) } }
                } @else {
                    div { dt { "Agents" } dd { "hidden: you may not list agents" } }
                }
                div { dt { "Queue (shards waiting)" } dd #queue { (o.queue) } }
                div { dt { "Records/s now" } dd #rps { (format!("{:.1}", o.records_per_second)) } }
                @match o.spent {
                    Some((hour, day)) => {
                        div { dt { "Credits spent, last hour" } dd #spent-hour { (format_credits(hour)) } }
                        div { dt { "Credits spent, last day" } dd #spent-day { (format_credits(day)) } }
                    }
                    None => { div { dt { "Credits spent" } dd { "hidden: no namespace of yours" } } }
                }
            }
        }
        section aria-labelledby="h-phases" {
            h2 #h-phases { "Workloads" }
            dl.tiles {
                @for (phase, n) in &o.phases {
                    div { dt { (phase) } dd { a href={"/workloads?phase=" (phase)} { (n) } } }
                }
            }
        }
    }
}

/// An agent's phase and why, as `kubectl get agents` says it.
pub fn agent_phase(a: &AgentSummary) -> (&'static str, &'static str) {
    if !a.connected {
        ("NotReady", "its stream is down")
    } else if a.unschedulable {
        ("Draining", "drained: takes no new shards")
    } else {
        ("Ready", "attached and taking shards")
    }
}

/// The agents' region. `can_drain`: whether the person may patch agents.
pub fn agents(list: &[AgentSummary], can_drain: bool, csrf: &str) -> Markup {
    html! {
        div.table-wrap {
            table {
                caption { (list.len()) " agents" }
                thead { tr {
                    th scope="col" { "Agent" } th scope="col" { "Node" } th scope="col" { "Device" }
                    th scope="col" { "GPU" } th scope="col" { "Slots busy / free" }
                    th scope="col" { "Models loaded / cached" } th scope="col" { "Heartbeat" }
                    th scope="col" { "Shards done" } th scope="col" { "Credits earned" }
                    th scope="col" { "Phase" }
                    @if can_drain { th scope="col" { "Action" } }
                } }
                tbody {
                    @for a in list {
                        @let (phase, why) = agent_phase(a);
                        tr data-agent=(a.id) {
                            th scope="row" { (a.id) }
                            td { (a.node) }
                            td { (a.providers.first().map_or("CPU", String::as_str)) }
                            td {
                                @if a.gpus == 0 { "none" } @else {
                                    (a.gpus) "× " (a.gpu_product) " (" (gib(a.gpu_memory)) ")"
                                }
                            }
                            td { (a.running) " / " (a.slots.saturating_sub(a.running)) }
                            td title=(models_title(a)) { (a.models_loaded.len()) " / " (a.models_cached.len()) }
                            td { (format_duration(a.since_heartbeat)) " ago" }
                            td { (a.completed) }
                            td { (format_credits(a.credits)) }
                            td { span class={"phase phase-" (phase)} { (phase) } br; small { (why) } }
                            @if can_drain {
                                td { (action_form(
                                    &format!("/agents/{}/{}", enc(&a.id), if a.unschedulable { "undrain" } else { "drain" }),
                                    if a.unschedulable { "Undrain" } else { "Drain" },
                                    csrf,
                                    false,
                                )) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn models_title(a: &AgentSummary) -> String {
    let short = |v: &[String]| {
        v.iter()
            .map(|h| h.chars().take(12).collect::<String>())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "loaded: {}; cached: {}",
        short(&a.models_loaded),
        short(&a.models_cached)
    )
}

fn gib(bytes: u64) -> String {
    format!("{:.0} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// A POST button with the session's CSRF token. `danger` asks the browser to confirm first
/// (a `data-confirm` the console's script honours).
pub fn action_form(action: &str, label: &str, csrf: &str, danger: bool) -> Markup {
    html! {
        form.action method="post" action=(action) {
            input type="hidden" name="csrf" value=(csrf);
            button type="submit" .danger[danger] data-confirm=[danger.then(|| format!("{label}?"))] { (label) }
        }
    }
}

/// Percent-encodes a path segment.
pub fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The URL of a workload's page.
pub fn workload_url(w: &WorkloadSummary) -> String {
    format!(
        "/workloads/{}/{}/{}",
        enc(&w.namespace),
        enc(&w.name),
        enc(&w.uid)
    )
}

fn progress_bar(w: &WorkloadSummary) -> Markup {
    let pct = (w.fraction() * 100.0).floor();
    html! {
        progress value=(format!("{pct:.0}")) max="100" aria-label={"Progress of " (w.name)} { (w.progress()) }
        " " span.pct { (w.progress()) }
    }
}

fn phase_badge(w: &WorkloadSummary) -> Markup {
    let phase = format!("{:?}", w.phase);
    html! {
        span class={"phase phase-" (phase)} { (phase) }
        @if w.suspended && !w.phase.is_terminal() { " " span.phase.phase-Suspended { "Suspended" } }
    }
}

fn eta(w: &WorkloadSummary) -> String {
    w.eta().map_or_else(|| "—".into(), format_duration)
}

/// The workloads' region.
pub fn workloads(list: &[WorkloadSummary], hidden_namespaces: usize) -> Markup {
    html! {
        @if hidden_namespaces > 0 {
            p.note { (hidden_namespaces) " namespace(s) hidden: you may not list their workloads." }
        }
        div.table-wrap {
            table {
                caption { (list.len()) " workloads" }
                thead { tr {
                    th scope="col" { "Namespace" } th scope="col" { "Name" } th scope="col" { "Phase" }
                    th scope="col" { "Progress" } th scope="col" { "Records/s" } th scope="col" { "ETA" }
                    th scope="col" { "Shards done / total" } th scope="col" { "Failed" }
                    th scope="col" { "Retries" } th scope="col" { "Credits" }
                } }
                tbody {
                    @for w in list {
                        tr data-workload=(w.uid) {
                            td { (w.namespace) }
                            th scope="row" { a href=(workload_url(w)) { (w.name) } }
                            td { (phase_badge(w)) }
                            td { (progress_bar(w)) }
                            td { (format!("{:.1}", w.throughput())) }
                            td { (eta(w)) }
                            td { (w.shards_succeeded) " / " (w.shards_total) }
                            td { (w.shards_failed) }
                            td { (w.attempts_retried) }
                            td { (format_credits(w.credits)) }
                        }
                    }
                }
            }
        }
    }
}

/// One cell of the shard grid: one shard, or a range of them on a large workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GridCell {
    /// The state shown (the most telling of the range: failed, running, pending, succeeded).
    pub state: &'static str,
    /// What hovering (or focusing) it says.
    pub label: String,
}

/// The grid of a live workload from the core's shards; `when` gives a shard's last event
/// (time and error) where the log has one.
pub fn grid_from_cells(
    cells: &[ShardCell],
    when: &impl Fn(u32) -> Option<(String, String)>,
) -> Vec<GridCell> {
    let per = cells.len().div_ceil(GRID_CELLS).max(1);
    cells
        .chunks(per)
        .map(|chunk| {
            if let [c] = chunk {
                let mut label = format!("shard {} · {}", c.index, c.state);
                if let Some(agent) = &c.agent {
                    label.push_str(&format!(" · agent {agent}"));
                }
                if c.attempt > 0 {
                    label.push_str(&format!(" · attempt {}", c.attempt));
                }
                if let Some((at, error)) = when(c.index) {
                    label.push_str(&format!(" · {at}"));
                    if !error.is_empty() {
                        label.push_str(&format!(" · {error}"));
                    }
                }
                GridCell {
                    state: c.state,
                    label,
                }
            } else {
                let count = |s: &str| chunk.iter().filter(|c| c.state == s).count();
                let state = ["failed", "running", "committing", "pending", "elsewhere"]
                    .into_iter()
                    .find(|s| count(s) > 0)
                    .unwrap_or("succeeded");
                let first = chunk.first().map_or(0, |c| c.index);
                let last = chunk.last().map_or(0, |c| c.index);
                let mut label = format!("shards {first}–{last}:");
                for s in [
                    "succeeded",
                    "running",
                    "committing",
                    "pending",
                    "elsewhere",
                    "failed",
                ] {
                    let n = count(s);
                    if n > 0 {
                        label.push_str(&format!(" {n} {s}"));
                    }
                }
                GridCell { state, label }
            }
        })
        .collect()
}

/// The grid of a workload the core no longer runs, from its events: the last
/// `shard.completed` or `shard.failed` of each shard; a shard with neither never finished.
pub fn grid_from_events(total: u32, events: &[EventRow]) -> Vec<GridCell> {
    let mut last: Vec<Option<&EventRow>> = vec![None; total as usize];
    for e in events {
        if let Some(i) = e.shard.and_then(|s| usize::try_from(s).ok())
            && i < last.len()
            && matches!(e.kind.as_str(), "shard.completed" | "shard.failed")
        {
            last[i] = Some(e);
        }
    }
    let cells: Vec<ShardCell> = last
        .iter()
        .enumerate()
        .map(|(i, e)| ShardCell {
            index: i as u32,
            state: match e.map(|e| e.kind.as_str()) {
                Some("shard.completed") => "succeeded",
                Some(_) => "failed",
                None => "pending",
            },
            agent: e.and_then(|e| e.agent.clone()),
            attempt: e
                .and_then(|e| e.attempt)
                .and_then(|a| u32::try_from(a).ok())
                .unwrap_or(0),
        })
        .collect();
    grid_from_cells(&cells, &|i| {
        last.get(i as usize).copied().flatten().map(|e| {
            let error = if e.kind == "shard.failed" {
                e.message.clone()
            } else {
                String::new()
            };
            (e.at.clone(), error)
        })
    })
}

/// What a person may do to a workload.
#[derive(Clone, Copy, Debug, Default)]
pub struct WorkloadActions {
    /// Suspend, resume, retry (patch).
    pub patch: bool,
    /// Cancel (delete).
    pub delete: bool,
}

/// The workload page's region.
pub fn workload(
    w: &WorkloadSummary,
    grid: &[GridCell],
    failures: &[EventRow],
    timeline: &[EventRow],
    can: WorkloadActions,
    csrf: &str,
) -> Markup {
    let base = workload_url(w);
    html! {
        div.actions role="group" aria-label="Actions" {
            @if can.patch && !w.phase.is_terminal() {
                @if w.suspended {
                    (action_form(&format!("{base}/resume"), "Resume", csrf, false))
                } @else {
                    (action_form(&format!("{base}/suspend"), "Suspend", csrf, false))
                }
            }
            @if can.patch && w.phase == infermesh_crds::WorkloadPhase::Failed {
                (action_form(&format!("{base}/retry"), "Retry failed shards", csrf, false))
            }
            @if can.delete && !w.phase.is_terminal() {
                (action_form(&format!("{base}/cancel"), "Cancel", csrf, true))
            }
        }
        dl.tiles {
            div { dt { "Phase" } dd #phase { (phase_badge(w)) } }
            div { dt { "Progress" } dd #progress { (progress_bar(w)) } }
            div { dt { "Records" } dd #records { (w.records) } }
            div { dt { "Records/s" } dd { (format!("{:.1}", w.throughput())) } }
            div { dt { "ETA" } dd { (eta(w)) } }
            div { dt { "Shards" } dd #shards {
                (w.shards_succeeded) " done, " (w.shards_running) " running, "
                (w.shards_pending) " waiting, " (w.shards_failed) " failed of " (w.shards_total)
            } }
            div { dt { "Retries" } dd { (w.attempts_retried) } }
            div { dt { "Credits" } dd #credits { (format_credits(w.credits)) } }
            div { dt { "Mesh" } dd { (w.mesh) } }
            div { dt { "Elapsed" } dd { (format_duration(w.elapsed)) } }
        }
        @if !w.reason.is_empty() || !w.message.is_empty() {
            section aria-labelledby="h-cond" {
                h2 #h-cond { "Condition" }
                p { strong { (w.reason) } @if !w.message.is_empty() { ": " (w.message) } }
            }
        }
        @if let Some(wait) = &w.waiting {
            p role="status" { strong { "WaitingForSlots" } ": " (wait.message) }
        }
        @for warning in &w.warnings { p.warning role="note" { (warning) } }
        section aria-labelledby="h-grid" {
            h2 #h-grid { "Shards" }
            ol.grid #grid aria-label={ "Shards by state: " (grid.len()) " cells" } {
                @for c in grid {
                    li class={"cell s-" (c.state)} aria-label=(c.label) tabindex="0" {}
                }
            }
            p.legend {
                @for s in ["succeeded", "running", "committing", "pending", "failed"] {
                    span class={"cell s-" (s)} {} " " (s) " "
                }
            }
        }
        section aria-labelledby="h-fail" {
            h2 #h-fail { "Failures" }
            @if failures.is_empty() { p { "None." } } @else {
                div.table-wrap { table {
                    thead { tr { th scope="col" { "When" } th scope="col" { "Shard" } th scope="col" { "Attempt" }
                                 th scope="col" { "Agent" } th scope="col" { "Error" } } }
                    tbody { @for e in failures { tr.failure {
                        td { (e.at) } td { (opt(e.shard)) } td { (opt(e.attempt)) }
                        td { (e.agent.as_deref().unwrap_or("—")) } td.error { (e.message) }
                    } } }
                } }
            }
        }
        section aria-labelledby="h-timeline" {
            h2 #h-timeline { "Events" }
            ol.timeline {
                @for e in timeline.iter().rev() {
                    li { time datetime=(e.at) { (e.at) } " " code { (e.kind) }
                         @if let Some(s) = e.shard { " shard " (s) } " " (e.message) }
                }
            }
        }
    }
}

fn opt(v: Option<i64>) -> String {
    v.map_or_else(|| "—".into(), |v| v.to_string())
}

/// The throughput chart's place (outside the live region, so a refresh does not redraw it).
pub fn chart(series_url: &str) -> Markup {
    html! {
        section aria-labelledby="h-chart" {
            h2 #h-chart { "Throughput (records/s)" }
            div #chart data-series=(series_url) role="img" aria-label="Records per second over time" {}
        }
    }
}

/// One row of the event log (the events page, and the stream's rows).
pub fn event_row(e: &EventRow) -> Markup {
    html! {
        tr data-seq=(e.seq) data-kind=(e.kind) {
            td { time datetime=(e.at) { (e.at) } }
            td { code { (e.kind) } }
            td { (e.workload_uid.as_deref().unwrap_or("—")) }
            td { (opt(e.shard)) }
            td { (opt(e.attempt)) }
            td { (e.agent.as_deref().unwrap_or("—")) }
            td { (e.message) }
        }
    }
}

/// The events page's filters.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct EventQuery {
    /// Workload uid.
    #[serde(default)]
    pub workload: Option<String>,
    /// Agent id.
    #[serde(default)]
    pub agent: Option<String>,
    /// Kind.
    #[serde(default)]
    pub kind: Option<String>,
}

impl EventQuery {
    /// Whether `e` passes.
    pub fn matches(&self, e: &EventRow) -> bool {
        let want = |f: &Option<String>, v: Option<&str>| {
            f.as_deref()
                .filter(|f| !f.is_empty())
                .is_none_or(|f| v == Some(f))
        };
        want(&self.workload, e.workload_uid.as_deref())
            && want(&self.agent, e.agent.as_deref())
            && want(&self.kind, Some(&e.kind))
    }

    /// As a query string (for the stream).
    pub fn query(&self) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("workload", &self.workload),
            ("agent", &self.agent),
            ("kind", &self.kind),
        ] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                q.append_pair(k, v);
            }
        }
        q.finish()
    }
}

/// The events page (its table is fed by the stream, not refreshed).
pub fn events(rows: &[&str], q: &EventQuery) -> Markup {
    html! {
        form.filters method="get" action="/events" role="search" {
            label { "Workload uid " input name="workload" value=[q.workload.as_deref()]; }
            label { "Agent " input name="agent" value=[q.agent.as_deref()]; }
            label { "Kind " input name="kind" list="kinds" value=[q.kind.as_deref()]; }
            datalist #kinds {
                @for k in ["shard.assigned", "shard.completed", "shard.failed", "shard.requeued",
                           "shard.report_refused", "workload.admitted", "workload.held",
                           "workload.succeeded", "workload.failed", "workload.retried",
                           "agent.joined", "agent.left", "agent.lost"] {
                    option value=(k) {}
                }
            }
            button type="submit" { "Filter" }
        }
        div.table-wrap {
            table #events {
                caption { "Newest first; new events appear as they are logged." }
                thead { tr {
                    th scope="col" { "When" } th scope="col" { "Kind" } th scope="col" { "Workload" }
                    th scope="col" { "Shard" } th scope="col" { "Attempt" } th scope="col" { "Agent" }
                    th scope="col" { "Message" }
                } }
                tbody #event-rows {
                    @for r in rows.iter().rev() { (PreEscaped(*r)) }
                }
            }
        }
    }
}

/// What the ledger page shows.
#[derive(Clone, Debug, Default)]
pub struct LedgerView {
    /// (account, micro-credits) the person may see.
    pub balances: Vec<(String, i64)>,
    /// Accounts hidden from them.
    pub hidden: usize,
    /// The account whose statement is shown, and its lines.
    pub statement: Option<(String, Vec<StatementLine>)>,
    /// The result of verify, when the person may see the whole ledger.
    pub verify: Option<VerifyReport>,
}

/// The ledger's region.
pub fn ledger(v: &LedgerView) -> Markup {
    let group = |prefix: &str| -> Vec<&(String, i64)> {
        v.balances
            .iter()
            .filter(|(a, _)| a.starts_with(prefix))
            .collect()
    };
    html! {
        @if let Some(r) = &v.verify {
            section aria-labelledby="h-verify" {
                h2 #h-verify { "Verify" }
                @if r.ok() {
                    p.ok #verify { "The ledger verifies: " (r.transactions) " transactions over " (r.accounts)
                        " accounts balance, and every succeeded shard is charged exactly once." }
                } @else {
                    p.bad #verify { "The ledger does not verify: "
                        (r.unbalanced_transactions.len()) " unbalanced transactions, "
                        (r.account_mismatches.len()) " account mismatches, "
                        (r.shards_not_charged_once.len()) " shards not charged exactly once, "
                        (r.charges_without_success.len()) " charges without a success." }
                }
            }
        }
        @if v.hidden > 0 { p.note { (v.hidden) " account(s) hidden: they are not yours to read." } }
        @for (title, prefix) in [("Namespaces", "namespace/"), ("Agents", "agent/"), ("Meshes", "mesh/")] {
            @let rows = group(prefix);
            @if !rows.is_empty() {
                section {
                    h2 { (title) }
                    div.table-wrap { table {
                        thead { tr { th scope="col" { "Account" } th scope="col" { "Balance (credits)" } } }
                        tbody { @for (a, b) in rows {
                            tr { th scope="row" { a href={"/ledger?account=" (enc(a))} { (a) } } td.num { (format_credits(*b)) } }
                        } }
                    } }
                }
            }
        }
        @if let Some((account, lines)) = &v.statement {
            section aria-labelledby="h-statement" {
                h2 #h-statement { "Statement of " (account) }
                div.table-wrap { table {
                    thead { tr { th scope="col" { "When" } th scope="col" { "Kind" } th scope="col" { "Amount" }
                                 th scope="col" { "Workload" } th scope="col" { "Shard" } th scope="col" { "Memo" } } }
                    tbody { @for l in lines { tr {
                        td { (l.at) } td { (l.kind) } td.num { (format_credits(l.amount)) }
                        td { (l.workload_uid.as_deref().unwrap_or("—")) } td { (opt(l.shard)) } td { (l.memo) }
                    } } }
                } }
            }
        }
    }
}

/// The sign-in page of a cluster's console: a form for the person's token.
pub fn login(error: Option<&str>) -> Markup {
    bare(
        "Sign in",
        html! {
            h1 { "Sign in to infermesh" }
            @if let Some(e) = error { p.bad role="alert" { (e) } }
            p { "Paste the bearer token your kubeconfig uses (for example the output of "
                code { "kubectl create token NAME" } "). The console checks it with the API server and shows you what " code { "kubectl" } " would." }
            form method="post" action="/login" {
                label for="token" { "Token" }
                input #token type="password" name="token" autocomplete="off" required;
                button type="submit" { "Sign in" }
            }
        },
    )
}

/// A refusal or an error, as a page.
pub fn problem(title: &str, detail: &str) -> Markup {
    bare(
        title,
        html! { h1 { (title) } p role="alert" { (detail) } p { a href="/" { "Back to the overview" } } },
    )
}

/// A page without the console's navigation or scripts (sign-in, refusals).
fn bare(title: &str, main: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · infermesh" }
                link rel="stylesheet" href="/assets/console.css";
            }
            body { main #main { (main) } }
        }
    }
}

/// `12s ago` style age.
pub fn age(d: Duration) -> String {
    format!("{} ago", format_duration(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(index: u32, state: &'static str) -> ShardCell {
        ShardCell {
            index,
            state,
            agent: (state == "running").then(|| "a1".to_string()),
            attempt: u32::from(state != "pending"),
        }
    }

    #[test]
    fn a_large_grid_shows_ranges_in_their_most_telling_state() {
        let mut cells: Vec<ShardCell> = (0..4828).map(|i| cell(i, "succeeded")).collect();
        cells[4].state = "failed";
        cells[5] = cell(5, "running");
        cells[3000].state = "pending";
        let grid = grid_from_cells(&cells, &|_| None);
        // 3 shards a cell: at most GRID_CELLS cells.
        assert_eq!(grid.len(), 4828usize.div_ceil(3));
        assert!(grid.len() <= GRID_CELLS);
        assert_eq!(
            grid[1].state, "failed",
            "failed wins over running: {:?}",
            grid[1]
        );
        assert_eq!(grid[1].label, "shards 3–5: 1 succeeded 1 running 1 failed");
        assert_eq!(grid[1000].state, "pending");
        assert_eq!(grid[0].state, "succeeded");
        // A small grid is a cell a shard, with its agent, attempt and error.
        let small = grid_from_cells(&cells[..6], &|i| {
            (i == 4).then(|| ("10:00".to_string(), "line 3: bad".to_string()))
        });
        assert_eq!(small.len(), 6);
        assert_eq!(
            small[4].label,
            "shard 4 · failed · attempt 1 · 10:00 · line 3: bad"
        );
        assert_eq!(small[5].label, "shard 5 · running · agent a1 · attempt 1");
    }

    fn row(seq: i64, kind: &str, shard: i64) -> EventRow {
        EventRow {
            seq,
            at: format!("t{seq}"),
            kind: kind.into(),
            workload_uid: Some("u".into()),
            shard: Some(shard),
            attempt: Some(seq),
            agent: Some("a".into()),
            message: format!("m{seq}"),
        }
    }

    #[test]
    fn a_finished_workloads_grid_comes_from_each_shards_last_event() {
        let events = vec![
            row(1, "shard.failed", 0),
            row(2, "shard.completed", 0),
            row(3, "shard.failed", 1),
            row(4, "shard.assigned", 2),
            // Out of range (a hostile or stale row): ignored.
            row(5, "shard.completed", 99),
            row(6, "shard.completed", -1),
        ];
        let grid = grid_from_events(3, &events);
        let states: Vec<&str> = grid.iter().map(|c| c.state).collect();
        assert_eq!(states, ["succeeded", "failed", "pending"]);
        assert!(grid[1].label.ends_with("t3 · m3"), "{}", grid[1].label);
        assert_eq!(
            grid[0].label,
            "shard 0 · succeeded · agent a · attempt 2 · t2"
        );
    }

    #[test]
    fn event_filters_match_and_travel_as_a_query() {
        let q = EventQuery {
            workload: Some("u".into()),
            agent: Some(String::new()),
            kind: Some("shard.failed".into()),
        };
        assert!(q.matches(&row(1, "shard.failed", 0)));
        assert!(!q.matches(&row(1, "shard.completed", 0)));
        assert_eq!(q.query(), "workload=u&kind=shard.failed");
        let odd = EventQuery {
            agent: Some("a&b=c d".into()),
            ..Default::default()
        };
        assert_eq!(odd.query(), "agent=a%26b%3Dc+d");
        assert!(EventQuery::default().matches(&row(1, "x", 0)));
    }
}
