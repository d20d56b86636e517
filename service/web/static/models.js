// The model catalog and its register form.
"use strict";

(() => {
  const { api, postJson, el, table, fmt, clearProblems, showProblem } = HubTune;
  const form = document.getElementById("model-form");

  async function catalog() {
    const page = await api("/v1/models?limit=500");
    document.getElementById("models").replaceChildren(page.items.length ? table([
      { label: "Name", value: (m) => m.name },
      { label: "Modality", value: (m) => m.modality },
      { label: "Architecture", value: (m) => m.architecture || m.model_type || "–" },
      { label: "Width", value: (m) => fmt(m.hidden_size), numeric: true },
      { label: "Source head", value: (m) => (m.has_source_head ? "yes" : "no") },
      { label: "Source", value: (m) => (m.source === "hf" ? `${m.repo_id}@${m.revision}` : m.path) },
      { label: "Id", value: (m) => el("code", {}, m.id) },
    ], page.items, `${page.total} model${page.total === 1 ? "" : "s"}`) : el("p", {}, "No models registered yet."));
  }

  function source() { return form.querySelector('input[name="source"]:checked').value; }

  function toggle() {
    form.querySelectorAll("[data-source]").forEach((node) => { node.hidden = node.dataset.source !== source(); });
  }

  async function onSubmit(event) {
    event.preventDefault();
    clearProblems(form);
    const body = { source: source() };
    const fields = source() === "hf" ? ["repo_id", "revision", "name"] : ["path", "name"];
    for (const name of fields) {
      const value = document.getElementById(name).value.trim();
      if (value) body[name] = value;
    }
    const status = document.getElementById("model-status");
    status.textContent = "Registering…";
    try {
      const model = await postJson("/v1/models", body);
      status.textContent = `Registered ${model.name} (${model.modality}, ${model.architecture || "unknown architecture"}).`;
      await catalog();
    } catch (error) {
      status.textContent = "";
      showProblem(form, error);
    }
  }

  form.addEventListener("change", toggle);
  form.addEventListener("submit", onSubmit);
  catalog().catch((error) => showProblem(form, error));
})();
