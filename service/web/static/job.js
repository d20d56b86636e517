// One job: live status by polling GET /v1/jobs/{id}; once ranked the ranking chart per estimator (score with its
// 95% interval, the labels-only LogME as a line, P(better than next)), the verdict, a table of every number and the
// feature maps; once tuned the curves, diagnostics and checkpoint downloads (each file's sha256 checked here).
"use strict";

(() => {
  const { api, request, postJson, el, table, fmt, when, bytes } = HubTune;
  const jobId = document.getElementById("job-id").dataset.jobId;
  const base = `/v1/jobs/${encodeURIComponent(jobId)}`;
  const TERMINAL = ["succeeded", "failed", "cancelled"];
  const SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x", "cross", "star", "triangle-down", "pentagon", "hexagon"];
  const COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]; // Okabe–Ito
  const CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"] };
  const drawn = { ranking: false, tuning: false, map: false };
  let names = {};

  function plot(node, data, layout, label) {
    node.setAttribute("role", "img");
    node.setAttribute("aria-label", label);
    if (!window.Plotly) { node.replaceChildren(el("p", { class: "notice" }, "Chart library missing; see the table.")); return; }
    window.Plotly.newPlot(node, data, { margin: { t: 40, r: 20, b: 50, l: 60 }, font: { size: 13 },
      paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "#fafafa", ...layout }, CONFIG);
  }

  // ---- status ------------------------------------------------------------------------------------------------

  function candidateStates(job) {
    const ranked = Object.fromEntries(job.ranking.map((r) => [r.model_id, r]));
    const current = /features (\d+)\/(\d+)/.exec(job.stage || "");
    return job.candidates.map((id, i) => {
      const entry = ranked[id];
      let state = "waiting";
      if (entry) state = entry.error ? `failed: ${entry.error}` : entry.eliminated
        ? `eliminated in round ${entry.eliminated_round + 1} on ${entry.eliminated_at_rows} rows` : `ranked #${entry.rank}`;
      else if (TERMINAL.includes(job.status)) state = job.status;
      else if (current) state = i < Number(current[1]) - 1 ? "features done" : i === Number(current[1]) - 1 ? "extracting features" : "waiting";
      else if (job.status === "running") state = "in progress";
      return { id, name: names[id] || id, state };
    });
  }

  function showStatus(job) {
    const status = document.getElementById("job-status");
    status.textContent = job.status;
    status.className = `badge status-${job.status}`;
    document.getElementById("job-stage").textContent = `${job.stage} · ${Math.round(job.progress * 100)}%`;
    const bar = document.getElementById("job-progress");
    bar.value = job.progress;
    bar.setAttribute("aria-valuetext", `${Math.round(job.progress * 100)}% · ${job.stage}`);
    document.getElementById("job-error").textContent = job.error || "";
    document.getElementById("cancel-job").hidden = TERMINAL.includes(job.status);
    const facts = [["Dataset", job.dataset_id], ["Estimators", job.metrics.join(", ")],
      ["Kind", job.tune ? `rank, then ${job.tune.strategy}` : "rank"], ["Created", when(job.created_at)],
      ["Finished", when(job.finished_at)], ["Attempts", job.attempts]];
    document.getElementById("job-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
    document.getElementById("candidates").replaceChildren(table([
      { label: "Candidate", value: (c) => c.name }, { label: "State", value: (c) => c.state }],
      candidateStates(job), "Candidates"));
  }

  // ---- ranking -----------------------------------------------------------------------------------------------

  function rankingChart(job, metric) {
    const rows = job.ranking.filter((r) => r.scores[metric] !== null && r.scores[metric] !== undefined).slice().reverse();
    const node = el("div", { class: "chart ranking-chart", id: `chart-${metric}`, "data-metric": metric });
    const score = rows.map((r) => r.scores[metric]);
    const interval = rows.map((r) => (r.intervals && r.intervals[metric]) || null);
    const p = rows.map((r) => (r.p_better_than_next || {})[metric]);
    const text = p.map((v) => (v === null || v === undefined ? "" : `P(better than next) ${v.toFixed(2)}`));
    const data = [{
      type: "scatter", mode: "markers", name: metric, x: score, text,
      y: rows.map((r, i) => `#${r.rank} ${r.model}${p[i] === null || p[i] === undefined ? "" : ` · P>next ${p[i].toFixed(2)}`}`),
      marker: { size: 11, color: COLOURS[0], symbol: "diamond" },
      error_x: { type: "data", symmetric: false, array: score.map((s, i) => (interval[i] ? interval[i][1] - s : 0)),
        arrayminus: score.map((s, i) => (interval[i] ? s - interval[i][0] : 0)), thickness: 2, width: 6 },
      hovertemplate: "%{y}<br>score %{x:.4f}<br>%{text}<extra></extra>",
    }];
    const shapes = [];
    const annotations = [];
    const prior = job.ranking.find((r) => r.logme_prior_only !== undefined);
    if (metric === "logme" && prior) {
      shapes.push({ type: "line", x0: prior.logme_prior_only, x1: prior.logme_prior_only, yref: "paper", y0: 0, y1: 1,
        line: { dash: "dash", color: "#555", width: 2 } });
      annotations.push({ x: prior.logme_prior_only, yref: "paper", y: 1.02, text: "labels only", showarrow: false,
        font: { size: 12, color: "#555" } });
    }
    const height = Math.max(220, 70 + 48 * rows.length);
    setTimeout(() => plot(node, data, { title: { text: `${metric}: score and 95% interval` }, height, shapes, annotations,
      xaxis: { title: { text: metric }, zeroline: false }, yaxis: { automargin: true }, showlegend: false },
    `${metric} per model: ${rows.slice().reverse().map((r) => `${r.model} ${fmt(r.scores[metric])}`).join(", ")}`));
    return node;
  }

  function rankingTable(job) {
    const columns = [{ label: "Rank", value: (r) => r.rank, numeric: true }, { label: "Model", value: (r) => r.model }];
    for (const metric of job.metrics) {
      columns.push({ label: metric, value: (r) => fmt(r.scores[metric], 4), numeric: true });
      columns.push({ label: `${metric} 95% interval`, value: (r) => {
        const i = (r.intervals || {})[metric];
        return i ? `${fmt(i[0], 4)} … ${fmt(i[1], 4)}` : "–";
      }, numeric: true });
      columns.push({ label: `P(better than next) by ${metric}`, value: (r) => fmt((r.p_better_than_next || {})[metric], 3), numeric: true });
    }
    columns.push({ label: "Labels-only LogME", value: (r) => fmt(r.logme_prior_only, 4), numeric: true });
    columns.push({ label: "Beats labels only", value: (r) => (r.beats_prior === undefined ? "–" : r.beats_prior ? "yes" : "no") });
    columns.push({ label: "Rows", value: (r) => fmt(r.rows), numeric: true });
    columns.push({ label: "Feature dim", value: (r) => fmt(r.feature_dim), numeric: true });
    columns.push({ label: "Parameters", value: (r) => fmt(r.parameters), numeric: true });
    columns.push({ label: "Feature seconds", value: (r) => fmt(r.feature_seconds, 2), numeric: true });
    columns.push({ label: "Cached", value: (r) => (r.features_cached ? "yes" : "no") });
    columns.push({ label: "Note", value: (r) => r.error || Object.values(r.notes || {}).join("; ") || "" });
    return table(columns, job.ranking, "Every number of the ranking");
  }

  function verdict(job) {
    const v = job.verdict;
    const node = document.getElementById("verdict");
    if (!v) { node.textContent = ""; return; }
    const top = names[v.top] || v.top;
    node.replaceChildren(el("strong", {}, v.confident ? "Confident: " : "Not conclusive: "), v.summary || "",
      top ? el("span", { class: "muted" }, ` (top: ${top}${job.ranked_by ? `, ranked by ${job.ranked_by.estimator}` : ""})`) : "");
  }

  function halving(job) {
    const summary = job.ranking_summary || {};
    const holder = document.getElementById("halving");
    if (summary.mode !== "successive_halving") { holder.replaceChildren(); return; }
    holder.replaceChildren(el("h3", {}, "Successive halving"), table([
      { label: "Round", value: (r) => r.index + 1, numeric: true },
      { label: "Rows", value: (r) => r.rows, numeric: true },
      { label: "Scored", value: (r) => r.survivors.map((m) => names[m] || m).join(", ") },
      { label: "Dropped after it", value: (r) => r.eliminated.map((m) => names[m] || m).join(", ") || "–" },
      { label: "Leader", value: (r) => names[r.leader] || r.leader || "–" },
      { label: "Seconds", value: (r) => fmt(r.seconds, 1), numeric: true },
    ], summary.rounds, "Rounds: which models were dropped when, on how many rows"));
  }

  function showRanking(job) {
    document.getElementById("ranking-section").hidden = false;
    verdict(job);
    document.getElementById("ranking-charts").replaceChildren(...job.metrics.map((m) => rankingChart(job, m)));
    document.getElementById("ranking-table").replaceChildren(rankingTable(job));
    halving(job);
  }

  // ---- feature map -------------------------------------------------------------------------------------------

  async function showFeatureMap() {
    let map;
    try { map = await api(`${base}/feature-map`); } catch (error) {
      if (error.status === 404 || error.status === 409) return;
      throw error;
    }
    document.getElementById("map-section").hidden = false;
    document.getElementById("map-note").textContent = `PCA of each model's features on ${map.rows} of the ${map.of_rows} ranked rows, `
      + (map.task === "regression" ? "shaded by the target." : "one colour and marker per label.");
    const classes = map.task === "regression" ? null : [...new Set(map.labels)];
    document.getElementById("feature-maps").replaceChildren(...map.models.map((m, k) => {
      const node = el("div", { class: "chart feature-map", id: `map-${k}`, "data-model": m.model });
      const xs = m.points.map((p) => p[0]);
      const ys = m.points.map((p) => p[1]);
      const data = classes ? classes.map((c, i) => {
        const keep = map.labels.map((l, j) => (l === c ? j : -1)).filter((j) => j >= 0);
        return { type: "scatter", mode: "markers", name: String(c), x: keep.map((j) => xs[j]), y: keep.map((j) => ys[j]),
          marker: { size: 7, opacity: 0.8, color: COLOURS[i % COLOURS.length], symbol: SYMBOLS[i % SYMBOLS.length] } };
      }) : [{ type: "scatter", mode: "markers", name: "target", x: xs, y: ys, text: map.labels,
        marker: { size: 7, color: map.labels, colorscale: "Viridis", showscale: true, colorbar: { title: { text: "target" } } } }];
      const [a, b] = m.explained_variance;
      setTimeout(() => plot(node, data, { title: { text: m.model }, height: 340, legend: { orientation: "h" },
        xaxis: { title: { text: `PC1 (${(100 * a).toFixed(0)}%)` }, zeroline: false },
        yaxis: { title: { text: `PC2 (${(100 * b).toFixed(0)}%)` }, zeroline: false } },
      `Feature map of ${m.model}: ${map.rows} points, PC1 explains ${(100 * a).toFixed(0)}% of the variance`));
      return node;
    }));
  }

  // ---- tuning ------------------------------------------------------------------------------------------------

  function curves(tuned, k) {
    const node = el("div", { class: "chart curve-chart", id: `curve-${k}` });
    const steps = tuned.curve.map((p) => p.step);
    const metricKey = Object.keys(tuned.curve[0] || {}).find((key) => key.startsWith("val_") && key !== "val_loss");
    const data = [
      { type: "scatter", mode: "lines+markers", name: "train loss", x: steps, y: tuned.curve.map((p) => p.train_loss),
        line: { color: COLOURS[0] }, marker: { symbol: "circle" } },
      { type: "scatter", mode: "lines+markers", name: "validation loss", x: steps, y: tuned.curve.map((p) => p.val_loss),
        line: { color: COLOURS[1], dash: "dash" }, marker: { symbol: "square" } },
    ];
    if (metricKey) data.push({ type: "scatter", mode: "lines+markers", name: metricKey.replace("_", " "), x: steps,
      y: tuned.curve.map((p) => p[metricKey]), yaxis: "y2", line: { color: COLOURS[2], dash: "dot" }, marker: { symbol: "diamond" } });
    setTimeout(() => plot(node, data, { title: { text: `${tuned.model}: loss and ${metricKey || "metric"} per step` }, height: 340,
      margin: { t: 40, r: 70, b: 90, l: 60 }, xaxis: { title: { text: "step" } }, yaxis: { title: { text: "loss" } },
      legend: { orientation: "h", y: -0.35 },
      yaxis2: { title: { text: metricKey || "" }, overlaying: "y", side: "right" } },
    `Training curves of ${tuned.model}: ${tuned.curve.length} points`));
    return node;
  }

  function diagnostics(tuned, k, labelNames) {
    const d = (tuned.details || {}).diagnostics;
    const out = [];
    if (!d) return out;
    if (d.confusion_matrix) {
      const node = el("div", { class: "chart confusion", id: `confusion-${k}` });
      const classes = labelNames || d.confusion_matrix.map((_, i) => String(i));
      setTimeout(() => plot(node, [{ type: "heatmap", z: d.confusion_matrix, x: classes, y: classes, colorscale: "Blues", reversescale: true,
        texttemplate: "%{z}", hovertemplate: "true %{y}, predicted %{x}: %{z}<extra></extra>" }],
      { title: { text: "Confusion matrix (validation)" }, height: 340, xaxis: { title: { text: "predicted" } },
        yaxis: { title: { text: "true" }, autorange: "reversed", automargin: true } }, "Confusion matrix"));
      out.push(node);
    }
    if (d.reliability) {
      const node = el("div", { class: "chart reliability", id: `reliability-${k}` });
      const bins = d.reliability;
      setTimeout(() => plot(node, [
        { type: "bar", name: "accuracy", x: bins.map((b) => (b.lo + b.hi) / 2), y: bins.map((b) => b.accuracy),
          width: bins.map((b) => b.hi - b.lo), text: bins.map((b) => `n=${b.count}`), marker: { color: COLOURS[4] } },
        { type: "scatter", mode: "lines", name: "perfect calibration", x: [0, 1], y: [0, 1], line: { dash: "dash", color: "#555" } }],
      { title: { text: "Reliability (validation)" }, height: 340, xaxis: { title: { text: "confidence" }, range: [0, 1] },
        yaxis: { title: { text: "accuracy" }, range: [0, 1] }, legend: { orientation: "h", y: -0.35 },
        margin: { t: 40, r: 20, b: 90, l: 60 } }, "Reliability diagram"));
      out.push(node);
    }
    if (d.predicted_vs_true) {
      const node = el("div", { class: "chart predicted", id: `predicted-${k}` });
      const pairs = d.predicted_vs_true;
      const lo = Math.min(...pairs.flat()), hi = Math.max(...pairs.flat());
      setTimeout(() => plot(node, [
        { type: "scatter", mode: "markers", name: "rows", x: pairs.map((p) => p[0]), y: pairs.map((p) => p[1]), marker: { color: COLOURS[0] } },
        { type: "scatter", mode: "lines", name: "predicted = true", x: [lo, hi], y: [lo, hi], line: { dash: "dash", color: "#555" } }],
      { title: { text: "Predicted vs true (validation)" }, height: 340, xaxis: { title: { text: "true" } },
        yaxis: { title: { text: "predicted" } } }, "Predicted against true values"));
      out.push(node);
    }
    return out;
  }

  function tradeoffs(tuned, k) {
    const selection = (tuned.details || {}).tradeoff_selection;
    if (!selection || !selection.trials || !selection.trials.length) return [];
    const node = el("div", { class: "chart tradeoff", id: `tradeoff-${k}` });
    const trials = selection.trials.slice().sort((a, b) => a.tradeoff - b.tradeoff);
    setTimeout(() => plot(node, [{ type: "scatter", mode: "lines+markers", name: "held-out loss", x: trials.map((t) => t.tradeoff),
      y: trials.map((t) => t.val_loss), marker: { symbol: trials.map((t) => (t.tradeoff === selection.chosen ? "star" : "circle")), size: 11 } }],
    { title: { text: `B-Tuning tradeoff trials (chosen ${selection.chosen})` }, height: 300,
      xaxis: { title: { text: "tradeoff" }, type: "log" }, yaxis: { title: { text: "held-out loss" } } }, "B-Tuning tradeoff trials"));
    return [node, table([{ label: "Tradeoff", value: (t) => t.tradeoff, numeric: true },
      { label: "Held-out loss", value: (t) => fmt(t.val_loss, 4), numeric: true },
      { label: "Chosen", value: (t) => (t.tradeoff === selection.chosen ? "yes" : "") }], trials, "Trials")];
  }

  async function showTuning(job) {
    const models = (job.tuning || {}).models || [];
    if (!models.length) return;
    let labelNames = null;
    try { labelNames = (await api(`/v1/datasets/${encodeURIComponent(job.dataset_id)}`)).label_names; } catch { /* shown by index */ }
    document.getElementById("tuning-section").hidden = false;
    document.getElementById("tuned-models").replaceChildren(...models.map((tuned, k) => el("article", { class: "tuned" },
      el("h3", {}, `${tuned.model} (${job.tuning.strategy})`),
      table([{ label: "Metric", value: (row) => row[0] }, { label: "Value", value: (row) => fmt(row[1], 4), numeric: true }],
        [...Object.entries(tuned.metrics), ["steps", tuned.steps], ["seconds", tuned.wall_seconds]], "Held-out metrics"),
      el("div", { class: "small-multiples" }, curves(tuned, k), ...diagnostics(tuned, k, labelNames)),
      ...tradeoffs(tuned, k))));
  }

  async function sha256(blob) {
    const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
    return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
  }

  // A download through fetch, so the key travels as a header; the bytes are checked against the listed sha256.
  async function download(url, file, status) {
    status.textContent = "downloading…";
    const blob = await (await request(url)).blob();
    const digest = await sha256(blob);
    status.textContent = digest === file.sha256 ? "sha256 verified" : `sha256 MISMATCH: got ${digest}`;
    const link = el("a", { href: URL.createObjectURL(blob), download: file.path.split("/").pop() });
    document.body.append(link);
    link.click();
    link.remove();
  }

  async function showCheckpoints() {
    const checkpoints = await api(`${base}/checkpoints`);
    if (!checkpoints.length) return;
    document.getElementById("downloads-section").hidden = false;
    document.getElementById("downloads").replaceChildren(...checkpoints.map((c) => el("article", {},
      el("h3", {}, `${c.name} (from ${c.model})`),
      table([
        { label: "File", value: (f) => f.path },
        { label: "Size", value: (f) => bytes(f.size), numeric: true },
        { label: "sha256", value: (f) => el("code", { class: "hash" }, f.sha256) },
        { label: "Download", value: (f) => {
          const status = el("span", { class: "muted", role: "status" });
          const url = `${base}/checkpoints/${encodeURIComponent(c.name)}/files/${f.path.split("/").map(encodeURIComponent).join("/")}`;
          return el("span", {}, el("button", { type: "button", class: "download", "data-path": f.path,
            onclick: () => download(url, f, status).catch((e) => { status.textContent = e.message; }) }, `Download ${f.path}`), " ", status);
        } },
      ], c.files, `${c.files.length} files`))));
  }

  // ---- polling -----------------------------------------------------------------------------------------------

  async function tick() {
    let job;
    try { job = await api(base); } catch (error) {
      document.getElementById("job-status").textContent = error.status === 404 ? "not found" : "error";
      document.getElementById("job-error").textContent = error.message;
      return;
    }
    showStatus(job);
    if (job.ranking.length && !drawn.ranking) {
      drawn.ranking = true;
      showRanking(job);
      showFeatureMap().catch((e) => { document.getElementById("map-note").textContent = e.message; });
    }
    if (job.status === "succeeded" && job.tuning && !drawn.tuning) {
      drawn.tuning = true;
      await showTuning(job);
      await showCheckpoints();
    }
    if (TERMINAL.includes(job.status)) {
      document.body.dataset.jobDone = job.status; // for scripts that wait on the page (tests, screenshots)
      return;
    }
    setTimeout(tick, 1000);
  }

  document.getElementById("cancel-job").addEventListener("click", async () => {
    try { showStatus(await postJson(`${base}/cancel`, {})); } catch (error) {
      document.getElementById("job-error").textContent = error.message;
    }
  });

  api("/v1/models?limit=500").then((page) => { names = Object.fromEntries(page.items.map((m) => [m.id, m.name])); })
    .catch(() => {}).finally(tick);
})();
