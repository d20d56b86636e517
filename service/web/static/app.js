// Shared by every page: the /v1 client (the key from session storage, sent as a header, never in a URL), safe DOM
// building (text only: names and columns come from users), problem+json shown beside the field it names.
"use strict";

const HubTune = (() => {
  const KEY = "hubtune.apiKey";
  let asking = null; // one key prompt at a time, shared by concurrent requests

  class ApiError extends Error {
    constructor(status, problem) {
      super(problem.detail || problem.title || `HTTP ${status}`);
      this.status = status;
      this.problem = problem;
    }
  }

  function storedKey() { return sessionStorage.getItem(KEY); }

  function askKey(message) {
    if (asking) return asking;
    const dialog = document.getElementById("key-dialog");
    const input = document.getElementById("key-input");
    document.getElementById("key-error").textContent = message || "";
    asking = new Promise((resolve) => {
      const form = document.getElementById("key-form");
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        const value = input.value.trim();
        if (!value) return;
        sessionStorage.setItem(KEY, value);
        input.value = "";
        dialog.close();
        asking = null;
        showForget();
        resolve();
      }, { once: true });
      dialog.addEventListener("cancel", (event) => event.preventDefault()); // a key is needed to go on
      dialog.showModal();
      input.focus();
    });
    return asking;
  }

  function showForget() {
    const button = document.getElementById("forget-key");
    if (button) button.hidden = !storedKey();
  }

  async function request(path, options = {}) {
    for (;;) {
      const headers = new Headers(options.headers || {});
      const key = storedKey();
      if (key) headers.set("Authorization", `Bearer ${key}`);
      const response = await fetch(path, { ...options, headers });
      if (response.status === 401) {
        const problem = await response.json().catch(() => ({}));
        if (key) sessionStorage.removeItem(KEY);
        await askKey(key ? `${problem.title || "invalid API key"}: ${problem.detail || ""}` : "");
        continue;
      }
      if (!response.ok) {
        const problem = await response.json().catch(() => ({ title: response.statusText, detail: "" }));
        throw new ApiError(response.status, problem);
      }
      return response;
    }
  }

  async function api(path, options = {}) {
    const response = await request(path, options);
    return response.status === 204 ? null : response.json();
  }

  function postJson(path, body) {
    return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  }

  // el("a", {href: "/x", class: "c"}, "text", child): children are text or nodes, never HTML
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "dataset") Object.assign(node.dataset, value);
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // a table of rows; columns: [{label, value(row) -> text or node, numeric?}]
  function table(columns, rows, caption) {
    return el("table", {},
      caption ? el("caption", {}, caption) : null,
      el("thead", {}, el("tr", {}, columns.map((c) => el("th", { scope: "col", class: c.numeric ? "num" : null },
        c.label)))),
      el("tbody", {}, rows.map((row) => el("tr", {}, columns.map((c, i) => el(i === 0 ? "th" : "td",
        { scope: i === 0 ? "row" : null, class: c.numeric ? "num" : null }, c.value(row)))))));
  }

  function fmt(value, digits = 3) {
    if (value === null || value === undefined) return "–";
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value) && Math.abs(value) < 1e6) return String(value);
    return Math.abs(value) >= 1e4 || (value !== 0 && Math.abs(value) < 1e-3) ? value.toExponential(2)
      : value.toFixed(digits);
  }

  function when(iso) { return iso ? new Date(iso).toLocaleString() : "–"; }

  function bytes(n) {
    const units = ["B", "KB", "MB", "GB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${i ? n.toFixed(1) : n} ${units[i]}`;
  }

  // A problem+json beside the field it names ("tune.epochs", "metrics[1]" -> the metrics group); else on the form.
  function clearProblems(form) {
    form.querySelectorAll("[data-error-for]").forEach((node) => { node.textContent = ""; });
    form.querySelectorAll("[aria-invalid]").forEach((node) => node.removeAttribute("aria-invalid"));
  }

  function showProblem(form, error) {
    const problem = error.problem || { title: "error", detail: String(error.message || error) };
    const field = problem.field || "";
    const where = [];
    if (problem.row && !String(problem.detail || "").includes(`row ${problem.row}`)) where.push(`row ${problem.row}`);
    if (problem.path) where.push(problem.path);
    const text = `${problem.title}${problem.detail ? ": " + problem.detail : ""}${where.length ? ` (${where.join(", ")})` : ""}`;
    const candidates = [field, field.replace(/\[\d+\]/g, ""), field.split(".").slice(0, -1).join("."),
      field.split(/[.[]/)[0]];
    let slot = null;
    for (const name of candidates) {
      if (!name) continue;
      slot = form.querySelector(`[data-error-for="${CSS.escape(name)}"]`);
      if (slot) break;
    }
    if (!slot) slot = form.querySelector('[data-error-for=""]');
    slot.textContent = field && slot.dataset.errorFor !== field ? `${field}: ${text}` : text;
    const input = slot.id ? [...form.querySelectorAll(`[aria-describedby~="${CSS.escape(slot.id)}"]`)]
      .find((node) => !node.disabled) : null;
    if (input) { input.setAttribute("aria-invalid", "true"); input.focus(); }
    if (problem.row) {
      const row = form.querySelector(`[data-row="${problem.row}"]`);
      if (row) row.classList.add("bad-row");
    }
    return slot;
  }

  document.addEventListener("DOMContentLoaded", () => {
    showForget();
    const forget = document.getElementById("forget-key");
    if (forget) forget.addEventListener("click", () => { sessionStorage.removeItem(KEY); location.reload(); });
  });

  return { api, request, postJson, el, table, fmt, when, bytes, clearProblems, showProblem, ApiError };
})();
