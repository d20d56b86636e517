// Upload with a column picker: the chosen file's first rows are read here (CSV, TSV, JSON lines) so the user picks
// columns from the file's own header; the server still reads the whole file and answers with problem+json.
"use strict";

(() => {
  const { api, el, clearProblems, showProblem } = HubTune;
  const PREVIEW_BYTES = 256 * 1024;
  const PREVIEW_ROWS = 5;
  const form = document.getElementById("upload-form");
  const fileInput = document.getElementById("file");
  const selects = ["text_column", "text_pair_column", "label_column", "image_column"]
    .map((id) => document.getElementById(id));
  const textSelects = selects.filter((select) => select.id !== "label_column");  // not sent for a table
  const features = document.getElementById("feature_columns");
  const featuresTyped = document.getElementById("feature_columns-typed");
  let fileColumns = [];

  // RFC 4180 rows of `text` (quoted fields, doubled quotes, newlines inside quotes); the last row may be cut off.
  function parseDelimited(text, delimiter) {
    const rows = [];
    let row = [], field = "", quoted = false;
    for (let i = 0; i < text.length; i += 1) {
      const c = text[i];
      if (quoted) {
        if (c === '"' && text[i + 1] === '"') { field += '"'; i += 1; }
        else if (c === '"') quoted = false;
        else field += c;
      } else if (c === '"' && field === "") quoted = true;
      else if (c === delimiter) { row.push(field); field = ""; }
      else if (c === "\n" || c === "\r") {
        if (c === "\r" && text[i + 1] === "\n") i += 1;
        row.push(field); rows.push(row); row = []; field = "";
        if (rows.length > PREVIEW_ROWS + 1) break;
      } else field += c;
    }
    if (field !== "" || row.length) { row.push(field); rows.push(row); }
    const [header = [], ...body] = rows;
    return { columns: header, rows: body.slice(0, PREVIEW_ROWS) };
  }

  function parseJsonLines(text) {
    const rows = [];
    const columns = [];
    for (const line of text.split(/\r?\n/)) {
      if (!line.trim()) continue;
      let record;
      try { record = JSON.parse(line); } catch { break; } // a line cut off by the preview's byte limit
      if (record === null || typeof record !== "object" || Array.isArray(record)) break;
      for (const name of Object.keys(record)) if (!columns.includes(name)) columns.push(name);
      rows.push(record);
      if (rows.length >= PREVIEW_ROWS) break;
    }
    return { columns, rows: rows.map((r) => columns.map((c) => (typeof r[c] === "string" ? r[c] : JSON.stringify(r[c])))) };
  }

  function guess(columns, rows, names) {
    const lower = columns.map((c) => c.toLowerCase());
    for (const name of names) {
      const i = lower.indexOf(name);
      if (i >= 0) return columns[i];
    }
    return null;
  }

  // the column with the longest values: most likely the text
  function longest(columns, rows, except) {
    let best = null, bestLength = -1;
    columns.forEach((column, i) => {
      if (column === except) return;
      const length = rows.reduce((sum, row) => sum + String(row[i] ?? "").length, 0);
      if (length > bestLength) { best = column; bestLength = length; }
    });
    return best;
  }

  function fill(select, columns, chosen, optional) {
    select.replaceChildren(...(optional ? [el("option", { value: "" }, "(none)")] : []),
      ...columns.map((c) => el("option", { value: c, selected: c === chosen }, c)));
    if (!chosen && optional) select.value = "";
  }

  function guessTask(columns, rows, label) {
    const i = columns.indexOf(label);
    if (i < 0) return null;
    const values = rows.map((r) => String(r[i] ?? "").trim()).filter(Boolean);
    if (values.some((v) => v.startsWith("[") || /[,;|]/.test(v) && !/\s/.test(v))) return "multilabel";
    const numbers = values.filter((v) => v !== "" && !Number.isNaN(Number(v)));
    if (numbers.length === values.length && numbers.some((v) => !Number.isInteger(Number(v)))) return "regression";
    return "classification";
  }

  function showPreview(preview, note) {
    const { columns, rows } = preview;
    const label = guess(columns, rows, ["label", "labels", "target", "category", "class", "y"]) || columns[columns.length - 1];
    const text = guess(columns, rows, ["text", "sentence", "sentence1", "review", "content", "question"])
      || longest(columns, rows, label);
    const pair = guess(columns, rows, ["text_pair", "sentence2", "hypothesis", "text2"]);
    const image = guess(columns, rows, ["image", "image_path", "file_name", "path"]);
    fill(selects[0], columns, text, false);
    fill(selects[1], columns, pair, true);
    fill(selects[2], columns, label, false);
    fill(selects[3], columns, image, true);
    fileColumns = columns;
    fillFeatures();
    const task = guessTask(columns, rows, label);
    if (task) document.getElementById("task").value = task;
    document.getElementById("columns-note").textContent = note;
    document.getElementById("preview").replaceChildren(el("table", {},
      el("caption", {}, `First ${rows.length} rows`),
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "row"), columns.map((c) => el("th", { scope: "col" }, c)))),
      el("tbody", {}, rows.map((row, i) => el("tr", { "data-row": i + 1 }, el("th", { scope: "row" }, i + 1),
        columns.map((_, j) => el("td", {}, String(row[j] ?? "").slice(0, 200))))))));
    document.getElementById("columns").hidden = false;
  }

  // A table's feature columns: every column of the file but the label, checked, in the file's order.
  function fillFeatures() {
    const label = selects[2].value;
    features.replaceChildren(...fileColumns.filter((c) => c !== label).map((c) =>
      el("label", {}, el("input", { type: "checkbox", value: c, checked: true }), ` ${c}`)));
  }

  function tableRows() {
    return form.elements.rows_as.value === "table";
  }

  function showRowsAs() {
    const table = tableRows();
    document.getElementById("features-field").hidden = !table;
    for (const select of textSelects) select.closest(".field").hidden = table;
  }

  function featureField() {
    if (!featuresTyped.disabled) return featuresTyped.value.trim();
    const chosen = [...features.querySelectorAll("input:checked")].map((box) => box.value);
    return chosen.length ? JSON.stringify(chosen) : "";  // a JSON array: names may hold commas
  }

  // Parquet and zip files are not read here: their columns are typed (or, for class folders, not needed).
  function typedColumns(typed) {
    for (const select of selects) {
      const input = document.getElementById(`${select.id}-typed`);
      select.hidden = select.disabled = typed;
      input.hidden = input.disabled = !typed;
      input.setAttribute("aria-label", select.labels[0].textContent);
    }
    features.hidden = typed;
    featuresTyped.hidden = featuresTyped.disabled = !typed;
  }

  function freeColumns(name) {
    typedColumns(true);
    document.getElementById("columns-note").textContent = /\.zip$/i.test(name)
      ? "A zip of class folders needs no columns; a zip with metadata.csv names its image and label columns."
      : "Type the column names (this page previews CSV and JSON lines only).";
    document.getElementById("preview").replaceChildren();
    document.getElementById("columns").hidden = false;
  }

  async function onFile() {
    clearProblems(form);
    const file = fileInput.files[0];
    if (!file) return;
    if (/\.(parquet|zip)$/i.test(file.name)) { freeColumns(file.name); return; }
    const head = await file.slice(0, PREVIEW_BYTES).text();
    const jsonLines = /\.(jsonl|ndjson|json)$/i.test(file.name) || head.trimStart().startsWith("{");
    const preview = jsonLines ? parseJsonLines(head)
      : parseDelimited(head, /\.tsv$/i.test(file.name) ? "\t" : ",");
    if (!preview.columns.length) {
      showProblem(form, { problem: { title: "no columns found", detail: "the file's first line names no columns",
        field: "file" } });
      return;
    }
    typedColumns(false);
    showPreview(preview, `${preview.columns.length} columns. Pick what each one is:`);
  }

  async function onSubmit(event) {
    event.preventDefault();
    clearProblems(form);
    const file = fileInput.files[0];
    if (!file) { showProblem(form, { problem: { title: "choose a file", detail: "", field: "file" } }); return; }
    const table = tableRows();
    if (table && !featureField()) {  // an empty form field reads as absent: the server would look for texts
      showProblem(form, { problem: { title: "no feature columns", detail: "check the columns each row's sentence is "
        + "written from", field: "feature_columns" } });
      return;
    }
    const body = new FormData();
    body.append("file", file);
    body.append("task", document.getElementById("task").value);
    for (const select of selects) {
      if (table && textSelects.includes(select)) continue;
      const input = select.disabled ? document.getElementById(`${select.id}-typed`) : select;
      if (input.value.trim()) body.append(select.name, input.value.trim());
    }
    if (table) body.append("feature_columns", featureField());
    const status = document.getElementById("upload-status");
    const button = document.getElementById("upload-button");
    status.textContent = `Uploading ${file.name}…`;
    button.disabled = true;
    try {
      const dataset = await api("/v1/datasets", { method: "POST", body });
      const sentence = dataset.serialization ? ` First row as models read it: “${dataset.serialization.examples[0]}”.` : "";
      status.replaceChildren(`Uploaded ${dataset.filename}: ${dataset.rows} rows, ${dataset.task}.${sentence} `,
        el("a", { href: `/jobs/new?dataset=${encodeURIComponent(dataset.id)}`, id: "rank-new-dataset" },
          "Rank models for it"));
      Lists.refresh();
    } catch (error) {
      status.textContent = "";
      showProblem(form, error);
    } finally {
      button.disabled = false;
    }
  }

  async function tasks() {
    // the tasks a dataset can have, from the API's own schema
    const schema = await (await fetch("/openapi.json")).json();
    const names = schema.components.schemas.DatasetOut.properties.task.enum;
    document.getElementById("task").replaceChildren(...names.map((t) => el("option", { value: t }, t)));
  }

  fileInput.addEventListener("change", onFile);
  selects[2].addEventListener("change", fillFeatures);
  for (const radio of form.elements.rows_as) radio.addEventListener("change", showRowsAs);
  form.addEventListener("submit", onSubmit);
  tasks();
})();
