// The new-job form, built from the API's own OpenAPI schema (JobCreate and the schemas it refers to) and from
// GET /v1/regularizers, so a field the API adds, renames or bounds shows up here without a change to this page.
"use strict";

(() => {
  const { api, postJson, el, clearProblems, showProblem } = HubTune;
  const form = document.getElementById("job-form");
  const holder = document.getElementById("job-fields");
  let schemas = {};
  let regularizers = {};
  let datasets = [];
  let models = [];
  const readers = []; // [path, () => value | undefined]: undefined leaves the member out

  function resolve(schema) {
    if (schema && schema.$ref) return schemas[schema.$ref.split("/").pop()];
    return schema;
  }

  // {schema, nullable}: anyOf [X, null] is an optional X
  function unwrap(schema) {
    if (schema.anyOf) {
      const real = schema.anyOf.filter((s) => s.type !== "null");
      const nullable = real.length < schema.anyOf.length;
      if (real.length === 1) return { schema: { ...schema, ...resolve(real[0]), anyOf: undefined }, nullable };
      return { schema, nullable };
    }
    return { schema: resolve(schema) || schema, nullable: false };
  }

  function title(name, schema) { return schema.title || name.replace(/_/g, " "); }

  function errorSlot(path) { return el("p", { class: "error", id: `${path}-error`, "data-error-for": path }); }

  function help(path, schema) {
    const bounds = [];
    if (schema.minimum !== undefined) bounds.push(`≥ ${schema.minimum}`);
    if (schema.exclusiveMinimum !== undefined) bounds.push(`> ${schema.exclusiveMinimum}`);
    if (schema.maximum !== undefined) bounds.push(`≤ ${schema.maximum}`);
    if (schema.exclusiveMaximum !== undefined) bounds.push(`< ${schema.exclusiveMaximum}`);
    if (schema.default !== undefined && schema.default !== null) bounds.push(`default ${JSON.stringify(schema.default)}`);
    const text = [schema.description, bounds.join(", ")].filter(Boolean).join(" · ");
    return text ? el("p", { class: "help", id: `${path}-help` }, text) : null;
  }

  function describedBy(path, schema) {
    return [`${path}-error`, schema.description || schema.default !== undefined ? `${path}-help` : null]
      .filter(Boolean).join(" ");
  }

  function parseLoose(text) {
    try { return JSON.parse(text); } catch { return text; }
  }

  // One input for a property of a schema; registers how to read its value.
  function field(path, name, raw, required) {
    const { schema, nullable } = unwrap(raw);
    const label = title(name, schema);
    const id = path;
    if (schema.type === "object" && schema.properties) return group(path, label, schema, nullable, raw);
    if (schema.enum && schema.type !== "array") {
      const select = el("select", { id, name: path, "aria-describedby": describedBy(path, schema) },
        nullable && !required ? el("option", { value: "" }, "(default)") : null,
        schema.enum.map((v) => el("option", { value: v, selected: v === schema.default }, v)));
      readers.push([path, () => (select.value === "" ? undefined : select.value)]);
      return wrap(path, label, select, schema);
    }
    if (schema.type === "boolean") {
      const box = el("input", { type: "checkbox", id, checked: schema.default === true,
        "aria-describedby": describedBy(path, schema) });
      readers.push([path, () => box.checked]);
      return wrap(path, label, box, schema);
    }
    if (schema.type === "integer" || schema.type === "number") {
      const input = el("input", { type: "number", id, name: path, step: schema.type === "integer" ? 1 : "any",
        min: schema.minimum, max: schema.maximum, placeholder: schema.default ?? "",
        "aria-describedby": describedBy(path, schema) });
      readers.push([path, () => (input.value === "" ? undefined : Number(input.value))]);
      return wrap(path, label, input, schema);
    }
    // strings, lists and unions (layers, tradeoff): typed as JSON or plain text, the server checks the form
    const input = el("input", { type: "text", id, name: path,
      placeholder: schema.default !== undefined ? JSON.stringify(schema.default) : "",
      "aria-describedby": describedBy(path, schema) });
    readers.push([path, () => (input.value.trim() === "" ? undefined
      : schema.type === "string" ? input.value.trim() : parseLoose(input.value.trim()))]);
    return wrap(path, label, input, schema);
  }

  function wrap(path, label, input, schema) {
    return el("div", { class: "field" }, el("label", { for: path }, label), input, help(path, schema),
      errorSlot(path));
  }

  // An object: its fields in a fieldset; an optional one (tune, successive_halving) behind a checkbox.
  function group(path, label, schema, nullable, raw) {
    const inner = el("div", { class: "grid" });
    const before = readers.length;
    for (const [name, prop] of Object.entries(schema.properties)) {
      inner.append(special(`${path}.${name}`, name, prop) || field(`${path}.${name}`, name, prop, false));
    }
    const mine = readers.splice(before);
    let enabled = () => true;
    const legend = el("legend", {}, label);
    const box = el("fieldset", { id: `${path}-group` }, legend, help(path, { description: raw.description || schema.description }),
      errorSlot(path), inner);
    if (nullable) {
      const toggle = el("input", { type: "checkbox", id: `${path}-enabled` });
      legend.replaceChildren(el("label", { for: `${path}-enabled` }, toggle, ` ${label}`));
      inner.hidden = true;
      toggle.addEventListener("change", () => { inner.hidden = !toggle.checked; });
      enabled = () => toggle.checked;
    }
    readers.push([path, () => {
      if (!enabled()) return undefined;
      const value = {};
      for (const [childPath, read] of mine) {
        const v = read();
        if (v !== undefined) setPath(value, childPath.slice(path.length + 1), v);
      }
      return value;
    }]);
    return box;
  }

  function setPath(target, dotted, value) {
    const parts = dotted.split(".");
    let node = target;
    for (const part of parts.slice(0, -1)) node = node[part] = node[part] || {};
    node[parts[parts.length - 1]] = value;
  }

  // Fields whose choices come from other endpoints: the user's datasets, the catalog, the regularizers.
  function special(path, name, raw) {
    if (path === "dataset_id") return datasetField(path);
    if (path === "candidates") return candidatesField(path, raw);
    if (path === "metrics") return metricsField(path, raw);
    if (path === "tune.regularizer") return regularizerField(path);
    if (path === "tune.target") return targetField(path, raw);
    if (path === "tune.ood_dataset_id") return oodDatasetField(path, raw);
    return null;
  }

  // tune.ood_dataset_id: another of the user's datasets, or none
  function oodDatasetField(path, raw) {
    const select = el("select", { id: path, name: path, "aria-describedby": `${path}-help ${path}-error` },
      el("option", { value: "" }, "(none)"),
      datasets.map((d) => el("option", { value: d.id }, `${d.filename} · ${d.modality} · ${d.rows} rows · ${d.id.slice(0, 8)}`)));
    readers.push([path, () => (select.value === "" ? undefined : select.value)]);
    return wrap(path, "out-of-distribution dataset", select, raw);
  }

  function datasetField(path) {
    const wanted = new URLSearchParams(location.search).get("dataset");
    const select = el("select", { id: path, name: path, required: true, "aria-describedby": `${path}-error` },
      datasets.map((d) => el("option", { value: d.id, selected: d.id === wanted },
        `${d.filename} · ${d.task} · ${d.rows} rows · ${d.id.slice(0, 8)}`)));
    select.addEventListener("change", () => renderCandidates());
    readers.push([path, () => select.value]);
    return el("div", { class: "field" }, el("label", { for: path }, "Dataset"), select, errorSlot(path),
      datasets.length ? null : el("p", {}, "No datasets: ", el("a", { href: "/datasets" }, "upload one"), " first."));
  }

  function selectedDataset() {
    const id = document.getElementById("dataset_id")?.value;
    return datasets.find((d) => d.id === id);
  }

  function candidatesField(path, raw) {
    const list = el("div", { id: "candidate-list", class: "checks" });
    readers.push([path, () => {
      const boxes = [...list.querySelectorAll("input")];
      const chosen = boxes.filter((b) => b.checked).map((b) => b.value);
      return chosen.length === boxes.length ? undefined : chosen; // all compatible: the API's default
    }]);
    return el("fieldset", { id: `${path}-group` }, el("legend", {}, "Candidate models"),
      help(path, unwrap(raw).schema), errorSlot(path), list);
  }

  function renderCandidates() {
    const list = document.getElementById("candidate-list");
    if (!list) return;
    const dataset = selectedDataset();
    const usable = models.filter((m) => !dataset || m.modality === dataset.modality);
    list.replaceChildren(...(usable.length ? usable.map((m) => el("label", {},
      el("input", { type: "checkbox", value: m.id, checked: true, name: "candidates" }),
      ` ${m.name} (${m.architecture || m.model_type || m.modality}${m.hidden_size ? `, width ${m.hidden_size}` : ""})`))
      : [el("p", {}, "No compatible model is registered: ", el("a", { href: "/models" }, "register one"), ".")]));
    const target = document.getElementById("tune.target");
    if (target) {
      const keep = target.value;
      target.replaceChildren(el("option", { value: "" }, "(the top-ranked)"),
        ...usable.map((m) => el("option", { value: m.id }, m.name)));
      target.value = keep;
    }
  }

  function metricsField(path, raw) {
    const items = unwrap(raw).schema.items || {};
    const names = items.enum || ["logme"];
    const defaults = raw.default || ["logme"];
    const boxes = names.map((n) => el("input", { type: "checkbox", value: n, checked: defaults.includes(n), name: "metrics" }));
    readers.push([path, () => boxes.filter((b) => b.checked).map((b) => b.value)]);
    return el("fieldset", { id: `${path}-group` }, el("legend", {}, "Estimators (the first checked ranks)"),
      help(path, { description: raw.description }), errorSlot(path),
      el("div", { class: "checks" }, boxes.map((b, i) => el("label", {}, b, ` ${names[i]}`))));
  }

  function targetField(path, raw) {
    const select = el("select", { id: path, name: path, "aria-describedby": `${path}-error ${path}-help` });
    readers.push([path, () => select.value || undefined]);
    return el("div", { class: "field" }, el("label", { for: path }, "Target model"), select,
      help(path, unwrap(raw).schema), errorSlot(path));
  }

  // The regularizer's name from the schema's enum, its parameters (defaults, meaning, choices) from /v1/regularizers.
  function regularizerField(path) {
    const spec = schemas.RegularizerSpec;
    const names = spec.properties.name.enum;
    const select = el("select", { id: `${path}.name`, name: `${path}.name`, "aria-describedby": `${path}.name-error` },
      names.map((n) => el("option", { value: n, selected: n === spec.properties.name.default }, n)));
    const params = el("div", { class: "grid", id: "regularizer-params" });
    let paramReaders = [];
    function renderParams() {
      paramReaders = [];
      const documented = regularizers[select.value] || {};
      params.replaceChildren(...Object.entries(documented).map(([name, info]) => {
        const p = `${path}.params.${name}`;
        const input = info.choices
          ? el("select", { id: p, "aria-describedby": `${p}-help ${p}-error` },
            info.choices.map((c) => el("option", { value: JSON.stringify(c), selected: c === info.default }, String(c))))
          : el("input", { type: "text", id: p, placeholder: JSON.stringify(info.default), "aria-describedby": `${p}-help ${p}-error` });
        paramReaders.push([name, () => (input.value === "" ? undefined : parseLoose(input.value))]);
        return el("div", { class: "field" }, el("label", { for: p }, name), input,
          el("p", { class: "help", id: `${p}-help` }, `${info.doc} · default ${JSON.stringify(info.default)}`), errorSlot(p));
      }));
    }
    select.addEventListener("change", renderParams);
    renderParams();
    readers.push([path, () => {
      const values = {};
      for (const [name, read] of paramReaders) {
        const v = read();
        if (v !== undefined) values[name] = v;
      }
      return { name: select.value, params: values };
    }]);
    return el("fieldset", { id: `${path}-group` }, el("legend", {}, "Regularizer"),
      el("div", { class: "field" }, el("label", { for: `${path}.name` }, "Name"), select, errorSlot(`${path}.name`)),
      errorSlot(path), errorSlot(`${path}.params`), params);
  }

  function build() {
    const job = schemas.JobCreate;
    holder.replaceChildren(...Object.entries(job.properties).map(([name, prop]) =>
      special(name, name, prop) || field(name, name, prop, (job.required || []).includes(name))));
    renderCandidates();
  }

  function collect() {
    const body = {};
    for (const [path, read] of readers) {
      if (path.includes(".")) continue; // read by its group
      const value = read();
      if (value !== undefined) body[path] = value;
    }
    return body;
  }

  async function onSubmit(event) {
    event.preventDefault();
    clearProblems(form);
    const status = document.getElementById("job-status");
    status.textContent = "Submitting…";
    try {
      const job = await postJson("/v1/jobs", collect());
      status.textContent = "Submitted.";
      location.assign(`/jobs/${encodeURIComponent(job.id)}`);
    } catch (error) {
      status.textContent = "";
      showProblem(form, error);
    }
  }

  async function start() {
    const [schema, regs, dataPage, modelPage] = await Promise.all([
      fetch("/openapi.json").then((r) => r.json()), api("/v1/regularizers"),
      api("/v1/datasets?limit=200"), api("/v1/models?limit=500")]);
    schemas = schema.components.schemas;
    regularizers = regs;
    datasets = dataPage.items;
    models = modelPage.items;
    build();
  }

  form.addEventListener("submit", onSubmit);
  start().catch((error) => showProblem(form, error));
})();
