// The infermesh console's own script (no build step): it follows the page's live event
// stream (Server-Sent Events), asks htmx to refresh the page's live region when the log
// moves, keeps the events table growing, draws the throughput chart with uPlot, and asks
// before a destructive action. The pages work without it, only not live.
(function () {
  "use strict";
  var body = document.body;
  var status = document.getElementById("live-status");
  var MAX_ROWS = 300;

  function setStatus(s) {
    if (status && status.textContent !== s) status.textContent = s;
  }

  document.addEventListener("submit", function (e) {
    var b = e.submitter;
    if (b && b.dataset && b.dataset.confirm && !window.confirm(b.dataset.confirm)) {
      e.preventDefault();
    }
  });

  var chart = null;
  function drawChart() {
    var el = document.getElementById("chart");
    if (!el || !window.uPlot || !el.dataset.series) return;
    fetch(el.dataset.series, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (d) {
        if (!d) return;
        var data = [d.t, d.rps];
        var width = function () { return Math.max(280, el.clientWidth || 600); };
        if (!chart) {
          chart = new window.uPlot({
            width: width(),
            height: 220,
            scales: { x: { time: true } },
            series: [{}, { label: "records/s", stroke: "#1d4ed8", width: 2, fill: "rgba(29,78,216,0.08)" }],
          }, data, el);
          window.addEventListener("resize", function () { chart.setSize({ width: width(), height: 220 }); });
        } else {
          chart.setData(data);
        }
      })
      .catch(function () {});
  }

  // Refreshes at most once a second however fast the log moves.
  var lastRefresh = 0;
  var timer = null;
  function refresh() {
    var wait = 1000 - (Date.now() - lastRefresh);
    if (wait > 0) {
      if (!timer) timer = setTimeout(function () { timer = null; refresh(); }, wait);
      return;
    }
    lastRefresh = Date.now();
    if (window.htmx && document.getElementById("region")) window.htmx.trigger(body, "im:refresh");
    drawChart();
  }

  function addRows(html) {
    var table = document.getElementById("event-rows");
    if (!table) return;
    var holder = document.createElement("tbody");
    holder.innerHTML = html;
    // The message is oldest first; the table newest first.
    while (holder.firstElementChild) {
      var row = holder.firstElementChild;
      table.insertBefore(row, table.firstElementChild);
      row.classList.add("new");
    }
    while (table.children.length > MAX_ROWS) table.removeChild(table.lastElementChild);
  }

  if (window.EventSource) {
    var url = "/events/stream" + (body.dataset.stream ? "?" + body.dataset.stream : "");
    var source = new EventSource(url, { withCredentials: true });
    source.addEventListener("open", function () { setStatus("live"); });
    source.addEventListener("error", function () { setStatus("reconnecting"); });
    source.addEventListener("rows", function (e) {
      setStatus("live");
      addRows(e.data);
      refresh();
    });
    source.addEventListener("tick", function () {
      setStatus("live");
      refresh();
    });
    window.addEventListener("pagehide", function () { source.close(); });
  } else {
    setStatus("not live: this browser has no EventSource");
  }
  // Ages and rates move without events too.
  setInterval(refresh, 10000);
  drawChart();
})();
