//! The web console in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver`, installed by `scripts/setup.sh`) driven over WebDriver (fantoccini)
//! against `infermesh local --ui` running the generated tensor model with two agent
//! processes.
//!
//! The workload starts suspended. The test resumes it from its page, suspends it again and
//! checks that no shard is dispatched while it is, resumes it, and watches the page reach
//! 100 % without a reload (a mark set in the page survives); on the events page a live row
//! appears; the shard grid ends with every shard succeeded; the ledger page says the ledger
//! verifies. Screenshots go to `target/console-screenshots/`; with
//! `INFERMESH_UPDATE_SCREENSHOTS=1` the overview, workload and ledger ones are written to
//! `docs/` as well (the README shows them).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use infermesh_operator::store::{self, EventFilter, Store};
use infermesh_tests::cluster::free_port;
use infermesh_tests::*;

/// Kills the child when the test ends, passed or not.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!("{name} is not on PATH: scripts/setup.sh installs chromium and chromium-driver")
        })
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn text(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn count(c: &Client, css: &str) -> usize {
    c.find_all(Locator::Css(css))
        .await
        .map(|v| v.len())
        .unwrap_or(0)
}

async fn screenshot(c: &Client, dir: &Path, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(format!("{name}.png")), &png).expect("write screenshot");
    if std::env::var_os("INFERMESH_UPDATE_SCREENSHOTS").is_some() {
        std::fs::write(workspace().join(format!("docs/console-{name}.png")), &png)
            .expect("write docs screenshot");
    }
}

/// Clicks the submit button whose text is `label`. The live region is swapped in place as
/// the run moves, so a button found just before a swap is stale: it is found again.
async fn click(c: &Client, label: &str) {
    let xpath = format!("//button[normalize-space()='{label}']");
    let mut last = None;
    for _ in 0..20 {
        match c.find(Locator::XPath(&xpath)).await {
            Ok(button) => match button.click().await {
                Ok(()) => return,
                Err(e) => last = Some(e),
            },
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot click {label}: {last:?}");
}

/// Marks the page; the mark is gone if the page is ever reloaded.
async fn mark(c: &Client) {
    c.execute("window.__infermeshMark = 42; return true;", vec![])
        .await
        .expect("mark");
}

async fn marked(c: &Client) -> bool {
    c.execute("return window.__infermeshMark === 42;", vec![])
        .await
        .ok()
        .and_then(|v| v.as_bool())
        == Some(true)
}

async fn assigned(store: &store::AnyStore) -> usize {
    store
        .events(&EventFilter {
            kind: Some("shard.assigned".into()),
            ..Default::default()
        })
        .await
        .expect("events")
        .len()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_follows_a_run_live_and_steers_it() {
    let chromium = which("chromium");
    let chromedriver = which("chromedriver");
    let dir = tempfile::tempdir().expect("tmp");
    let shots = workspace().join("target/console-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    // About 4,000 shards of 1 KiB on two single-slot agents: long enough to steer.
    let (manifest, _input, _out) =
        tensor_job(dir.path(), 100_000, "  shardBytes: 1Ki\n  suspend: true\n");
    let db = format!("sqlite://{}", dir.path().join("state.db").display());
    let mut local = local_command(&manifest, 2, dir.path())
        .args(["--database-url", &db, "--ui", "--ui-keep"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("infermesh local");
    let stderr = local.stderr.take().expect("stderr");
    let _local = Guard(local);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.split("console at ").nth(1) {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("infermesh local printed the console's URL");
    assert!(
        url.starts_with("http://127.0.0.1:") && url.contains("/?token="),
        "{url}"
    );
    let origin = url.split("/?token=").next().expect("origin").to_string();

    let state = store::open(&db).await.expect("the run's store");
    let port = free_port();
    let driver = Command::new(&chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver");
    let _driver = Guard(driver);
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,800", "--no-first-run"],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let mut client = None;
    for _ in 0..50 {
        match ClientBuilder::new(connector.clone())
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let c = client.expect("a WebDriver session with chromium");

    // The overview, signed in by the URL's token.
    c.goto(&url).await.expect("open the console");
    assert_eq!(c.current_url().await.expect("url").path(), "/");
    assert!(
        !c.current_url()
            .await
            .expect("url")
            .as_str()
            .contains("token="),
        "the token leaves the address bar"
    );
    wait_until("both agents ready", Duration::from_secs(60), || async {
        text(&c, "#agents-ready").await == "2 / 2"
    })
    .await;

    // The workloads list links to the workload's page.
    c.goto(&format!("{origin}/workloads"))
        .await
        .expect("workloads");
    c.find(Locator::Css("tbody th a"))
        .await
        .expect("the workload's link")
        .click()
        .await
        .expect("click");
    let workload_url = c.current_url().await.expect("url").to_string();
    assert!(
        workload_url.contains("/workloads/team-a/job/"),
        "{workload_url}"
    );
    assert!(text(&c, "#phase").await.contains("Suspended"));
    let cells = count(&c, "#grid li").await;
    let total: usize = text(&c, "#shards")
        .await
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("the shard count");
    // Past 2,000 shards a cell stands for a range of them.
    assert!(total > 2_000, "{total} shards");
    assert_eq!(
        cells,
        total.div_ceil(total.div_ceil(2_000)),
        "{total} shards in {cells} cells"
    );
    assert_eq!(
        count(&c, "#grid li.s-pending").await,
        cells,
        "nothing ran while suspended"
    );
    assert_eq!(assigned(&state).await, 0);

    // Resume, then suspend: no new dispatch while suspended.
    click(&c, "Resume").await;
    wait_until("shards dispatched", Duration::from_secs(30), || async {
        assigned(&state).await > 0
    })
    .await;
    click(&c, "Suspend").await;
    // The click returns before the form's POST and its redirect are done.
    wait_until(
        "the page to say Suspended",
        Duration::from_secs(15),
        || async { text(&c, "#phase").await.contains("Suspended") },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let frozen = assigned(&state).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(assigned(&state).await, frozen, "a dispatch while suspended");
    assert!(
        frozen < total,
        "suspended before the end ({frozen} of {total})"
    );

    // The events page: a live row appears when the workload resumes (from a script in the
    // page, with the session's CSRF token, as htmx would send it).
    c.goto(&format!("{origin}/events")).await.expect("events");
    mark(&c).await;
    let rows_before = count(&c, "#event-rows tr").await;
    wait_until(
        "the event stream to connect",
        Duration::from_secs(10),
        || async { text(&c, "#live-status").await == "live" },
    )
    .await;
    let path = workload_url.trim_start_matches(&origin).to_string();
    let resumed = c
        .execute(
            "const csrf = JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token'];
             return fetch(arguments[0] + '/resume', {method: 'POST', headers: {'X-CSRF-Token': csrf,
               'Content-Type': 'application/x-www-form-urlencoded'}, body: '', redirect: 'manual'})
               .then(r => r.type === 'opaqueredirect' || r.ok);",
            vec![serde_json::json!(path)],
        )
        .await
        .expect("resume from the page");
    assert_eq!(resumed, serde_json::json!(true));
    wait_until("a live event row", Duration::from_secs(20), || async {
        count(&c, "#event-rows tr.new").await > 0
    })
    .await;
    assert!(count(&c, "#event-rows tr").await > rows_before.min(299));
    assert!(marked(&c).await, "the events page was reloaded");

    // The overview while it runs: both agents busy, records flowing, credits spent.
    c.goto(&format!("{origin}/")).await.expect("overview");
    wait_until(
        "the overview to show the run",
        Duration::from_secs(30),
        || async {
            text(&c, "#agents-ready").await == "2 / 2"
                && text(&c, "#spent-hour").await != "0.000000"
                && text(&c, "#rps").await != "0.0"
        },
    )
    .await;
    screenshot(&c, &shots, "overview").await;

    // The workload page reaches 100 % and Succeeded without a reload.
    c.goto(&workload_url).await.expect("workload page");
    mark(&c).await;
    wait_until("100 %", Duration::from_secs(240), || async {
        text(&c, "#progress .pct").await == "100%" && text(&c, "#phase").await == "Succeeded"
    })
    .await;
    assert!(marked(&c).await, "the workload page was reloaded");
    wait_until("every cell succeeded", Duration::from_secs(10), || async {
        count(&c, "#grid li.s-succeeded").await == cells
    })
    .await;
    assert_eq!(count(&c, "#grid li").await, cells);
    assert!(
        assigned(&state).await >= total,
        "every shard was dispatched"
    );
    // The chart drew (uPlot's canvas).
    wait_until("the throughput chart", Duration::from_secs(10), || async {
        count(&c, "#chart canvas").await > 0
    })
    .await;
    screenshot(&c, &shots, "workload").await;

    c.goto(&format!("{origin}/ledger")).await.expect("ledger");
    assert!(text(&c, "#verify").await.contains("The ledger verifies"));
    screenshot(&c, &shots, "ledger").await;
    c.goto(&format!("{origin}/agents")).await.expect("agents");
    assert_eq!(count(&c, "tbody tr").await, 2);
    screenshot(&c, &shots, "agents").await;
    // Phone width: the page still lays out (no horizontal scroll of the whole page).
    c.set_window_size(390, 844).await.expect("phone width");
    c.goto(&workload_url).await.expect("workload page");
    let overflow = c
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1;",
            vec![],
        )
        .await
        .expect("width");
    assert_eq!(
        overflow,
        serde_json::json!(true),
        "the page is wider than a phone"
    );
    screenshot(&c, &shots, "workload-phone").await;
    c.close().await.expect("close");
}
