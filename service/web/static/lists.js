// The job and dataset lists of the home, jobs and datasets pages.
"use strict";

const Lists = (() => {
  const { api, el, table, when, fmt } = HubTune;

  function statusBadge(status) { return el("span", { class: `badge status-${status}` }, status); }

  async function jobs(target) {
    const page = await api(`/v1/jobs?limit=${target.dataset.limit || 50}`);
    target.replaceChildren(page.items.length ? table([
      { label: "Job", value: (j) => el("a", { href: `/jobs/${encodeURIComponent(j.id)}` }, j.id.slice(0, 12)) },
      { label: "Status", value: (j) => statusBadge(j.status) },
      { label: "Stage", value: (j) => j.stage },
      { label: "Progress", value: (j) => `${Math.round(j.progress * 100)}%`, numeric: true },
      { label: "Kind", value: (j) => (j.tune ? "rank + tune" : "rank") },
      { label: "Top model", value: (j) => (j.ranking[0] ? j.ranking[0].model : "–") },
      { label: "Created", value: (j) => when(j.created_at) },
    ], page.items, `${page.total} job${page.total === 1 ? "" : "s"}`) : el("p", {}, "No jobs yet. ",
      el("a", { href: "/jobs/new" }, "Start one"), "."));
  }

  async function datasets(target) {
    const page = await api(`/v1/datasets?limit=${target.dataset.limit || 50}`);
    target.replaceChildren(page.items.length ? table([
      { label: "File", value: (d) => d.filename },
      { label: "Task", value: (d) => d.task },
      { label: "Modality", value: (d) => d.modality },
      { label: "Rows", value: (d) => fmt(d.rows), numeric: true },
      { label: "Columns", value: (d) => [d.text_column, d.text_pair_column, d.image_column,
        d.feature_columns && `${d.feature_columns.length} features (LIFT)`, d.label_column].filter(Boolean).join(", ") },
      { label: "Classes", value: (d) => (d.label_names ? d.label_names.length : "–"), numeric: true },
      { label: "Created", value: (d) => when(d.created_at) },
      { label: "", value: (d) => el("a", { href: `/jobs/new?dataset=${encodeURIComponent(d.id)}` }, "Rank…") },
    ], page.items, `${page.total} dataset${page.total === 1 ? "" : "s"}`) : el("p", {}, "No datasets yet. ",
      el("a", { href: "/datasets" }, "Upload one"), "."));
  }

  function refresh() {
    const pending = [];
    const jobList = document.getElementById("jobs");
    const datasetList = document.getElementById("datasets");
    if (jobList) pending.push(jobs(jobList));
    if (datasetList) pending.push(datasets(datasetList));
    return Promise.all(pending).catch((error) => {
      (jobList || datasetList).replaceChildren(el("p", { class: "error", role: "alert" }, String(error.message)));
    });
  }

  document.addEventListener("DOMContentLoaded", refresh);
  return { refresh, statusBadge };
})();
