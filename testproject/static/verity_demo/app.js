// The verity_django demo page: a todo app whose every window stays live, and an
// inspector that shows each directive as it arrives. Plain DOM, no framework:
// the data layer is verity-client.js, and render() reads only from its cache.

import { createVerityClient, DEFAULT_LEVEL } from "./verity-client.js";

const clientId = newClientId();
const INSPECTOR_MAX = 300;

// ------------------------------------------------------------------ HTTP

function getCookie(name) {
  for (const part of document.cookie ? document.cookie.split(";") : []) {
    const [key, ...rest] = part.trim().split("=");
    if (key === name) return decodeURIComponent(rest.join("="));
  }
  return null;
}

const SAFE_METHODS = new Set(["GET", "HEAD", "OPTIONS", "TRACE"]);

async function fetchJson(url, init = {}) {
  const method = (init.method ?? "GET").toUpperCase();
  const headers = { Accept: "application/json", ...(init.headers ?? {}) };
  // Read the cookie on every request: Django rotates the token at login.
  if (!SAFE_METHODS.has(method)) headers["X-CSRFToken"] = getCookie("csrftoken") ?? "";
  const response = await fetch(url, { ...init, method, headers, credentials: "same-origin" });
  const text = await response.text();
  let body = null;
  if (text) {
    try {
      body = JSON.parse(text);
    } catch {
      body = text;
    }
  }
  if (!response.ok) {
    const detail = body && typeof body === "object" ? body.detail ?? firstFieldError(body) : null;
    const error = new Error(detail ?? `${response.status} ${response.statusText}`);
    error.status = response.status;
    error.body = body;
    throw error;
  }
  return body;
}

function firstFieldError(body) {
  for (const [field, value] of Object.entries(body)) {
    const message = Array.isArray(value) ? value[0] : value;
    if (typeof message === "string") return field === "non_field_errors" ? message : `${field}: ${message}`;
  }
  return null;
}

/** crypto.randomUUID needs a secure context; a LAN address is not one. */
function newClientId() {
  if (globalThis.crypto?.randomUUID) {
    try {
      return crypto.randomUUID();
    } catch {
      /* fall through */
    }
  }
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

// --------------------------------------------------------------- client

const client = createVerityClient({
  clientId,
  fetchJson,
  collections: { todos: "/api/todos/", projects: "/api/projects/" },
  types: {
    todo: { url: "/api/todos/", levels: [DEFAULT_LEVEL, "simplified", "expanded"] },
    project: { url: "/api/projects/" },
  },
  sse: { url: "/api/events" },
});
window.__verity = { client, clientId };

// ------------------------------------------------------------------ DOM

const $ = (selector, root = document) => root.querySelector(selector);
const byTestId = (id, root = document) => root.querySelector(`[data-testid="${id}"]`);

/** Tiny element builder; text is always set as text, never as HTML. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

const els = {
  boot: $("#boot"),
  login: $("#login"),
  loginForm: byTestId("login-form"),
  loginError: $("#login-error"),
  app: $("#app"),
  session: $("#session"),
  sessionUser: $("#session-user"),
  logout: byTestId("logout"),
  openWindow: $("#open-window"),
  connection: byTestId("connection"),
  projectList: $("#project-list"),
  projectCount: $("#project-count"),
  newProject: byTestId("new-project"),
  todoList: byTestId("todo-list"),
  todoEmpty: $("#todo-empty"),
  todoCount: $("#todo-count"),
  collectionMeta: $("#collection-meta"),
  newTodo: byTestId("new-todo"),
  projectFilter: byTestId("project-filter"),
  statusButtons: [...document.querySelectorAll(".segmented [data-status]")],
  detailEmpty: $("#detail-empty"),
  detailBody: $("#detail-body"),
  inspectorList: $("#inspector-list"),
  inspectorEmpty: $("#inspector-empty"),
  inspectorClear: $("#inspector-clear"),
  clientIdEl: $("#client-id"),
  audiences: $("#audiences"),
  clientStats: $("#client-stats"),
  resyncStatus: $("#resync-status"),
  toasts: $("#toasts"),
};

// ---------------------------------------------------------------- state

const state = {
  user: null,
  status: "all", // "all" | "active" | "done"
  project: null, // project id or null for all projects
  selectedId: null,
  editing: null, // {kind: "todo"|"project", id}
  pending: new Set(), // todo ids with a mutation in flight
  listKey: null,
  listIds: [],
  deletedNotice: null,
  live: false, // set once the stream is open, so no fetch precedes it
  readyPending: false,
};

function todoParams() {
  const params = {};
  if (state.status !== "all") params.status = state.status;
  if (state.project != null) params.project = state.project;
  return params;
}

const idKey = (id) => JSON.stringify(id);

// Option values carry ids as JSON so that numbers stay numbers: `{"project": 3}`
// and `{"project": "3"}` are different collections to the cache.
function parseIdValue(value) {
  if (value === "" || value == null) return null;
  try {
    return JSON.parse(value);
  } catch {
    return value;
  }
}

// --------------------------------------------------------------- render

let renderQueued = false;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  // A microtask, not requestAnimationFrame: a background window must keep
  // rendering, since the other window is the one in front.
  queueMicrotask(() => {
    renderQueued = false;
    render();
  });
}

function render() {
  if (!state.user || !state.live) return;
  const projects = renderProjects();
  renderProjectSelects(projects);
  renderFilters();
  const listComplete = renderTodoList();
  renderDetail(projects);
  renderStats();
  if (state.readyPending && listComplete) {
    state.readyPending = false;
    document.body.dataset.ready = "1";
  }
}

/** @returns {Map<string, {id: any, name: string|null}>} projects keyed by JSON id, in collection order */
function renderProjects() {
  const coll = client.collection("projects");
  const projects = new Map();
  for (const id of coll.data?.ids ?? []) {
    const rec = client.item("project", id);
    if (rec.missing) continue;
    projects.set(idKey(id), { id, name: rec.data?.name ?? null });
  }

  els.projectCount.textContent = coll.data ? `${coll.data.count}` : "";
  const list = els.projectList;
  const editing = state.editing?.kind === "project" ? idKey(state.editing.id) : null;
  if (editing && list.querySelector(`[data-project-id='${CSS.escape(editing)}'] input`)) {
    return projects; // keep the rename input alive while typing
  }
  const signature = JSON.stringify([coll.error?.message, idKey(state.project), [...projects.values()].map((p) => [p.id, p.name])]);
  if (list.dataset.signature === signature) return projects;
  list.dataset.signature = signature;
  list.replaceChildren(
    ...(coll.error ? [h("li", { class: "muted small" }, `Could not load projects: ${coll.error.message}`)] : []),
    ...[...projects.values()].map((p) =>
      h(
        "li",
        {
          class: `project-item${idKey(state.project) === idKey(p.id) ? " is-active" : ""}`,
          dataset: { projectId: idKey(p.id), testid: "project-row" },
          title: "Click to filter by this project",
        },
        h("span", { class: "project-name", dataset: { testid: "project-name" } }, p.name ?? "…"),
        h("button", { type: "button", class: "chip-btn", dataset: { testid: "project-rename" }, "aria-label": "Rename project", title: "Rename" }, "✎"),
      ),
    ),
  );
  return projects;
}

function syncOptions(select, projects, emptyLabel) {
  const signature = emptyLabel + "|" + [...projects.values()].map((p) => `${idKey(p.id)}=${p.name}`).join("|");
  if (select.dataset.signature === signature) return;
  const value = select.value;
  select.replaceChildren(
    h("option", { value: "" }, emptyLabel),
    ...[...projects.values()].map((p) => h("option", { value: idKey(p.id) }, p.name ?? `#${p.id}`)),
  );
  select.dataset.signature = signature;
  if ([...select.options].some((o) => o.value === value)) select.value = value;
}

function renderProjectSelects(projects) {
  syncOptions(els.projectFilter, projects, "All projects");
  els.projectFilter.value = state.project == null ? "" : idKey(state.project);
  if (state.project != null && els.projectFilter.value !== idKey(state.project)) {
    // Keep a filter on a project that is still loading selectable.
    els.projectFilter.append(h("option", { value: idKey(state.project) }, `#${state.project}`));
    els.projectFilter.value = idKey(state.project);
    delete els.projectFilter.dataset.signature;
  }
  syncOptions(els.newTodo.elements.project, projects, "No project");
  const detailProject = els.detailBody.querySelector("select[name='project']");
  if (detailProject) syncOptions(detailProject, projects, "No project");
}

function renderFilters() {
  for (const button of els.statusButtons) {
    button.setAttribute("aria-pressed", String(button.dataset.status === state.status));
  }
}

const rowEls = new Map(); // JSON id -> <li>
const rowIds = new WeakMap(); // <li> -> id as the server sent it

/** @returns {boolean} whether the list shows a loaded collection and every row's item */
function renderTodoList() {
  const params = todoParams();
  const coll = client.collection("todos", params);
  const key = JSON.stringify(params);
  const ids = coll.data?.ids ?? [];

  // A selected todo that vanished from an unchanged list may have been deleted
  // elsewhere; refetch it once so the detail panel can say so.
  if (key === state.listKey && state.selectedId != null) {
    const sel = idKey(state.selectedId);
    const was = state.listIds.some((id) => idKey(id) === sel);
    const is = ids.some((id) => idKey(id) === sel);
    if (was && !is) client.fetchItem("todo", state.selectedId, "expanded", { force: true });
  }
  if (coll.data) {
    state.listKey = key;
    state.listIds = ids;
  }

  let complete = Boolean(coll.data);
  const rows = [];
  for (const id of ids) {
    const rec = client.item("todo", id);
    if (rec.missing) continue;
    if (!rec.data) complete = complete && Boolean(rec.error);
    const k = idKey(id);
    let row = rowEls.get(k);
    if (!row) {
      row = createRow(id);
      rowEls.set(k, row);
    }
    updateRow(row, id, rec);
    rows.push(row);
  }
  const keep = new Set(rows);
  for (const [k, row] of rowEls) {
    if (!keep.has(row)) {
      row.remove();
      rowEls.delete(k);
    }
  }
  const list = els.todoList;
  rows.forEach((row, i) => {
    if (list.children[i] !== row) list.insertBefore(row, list.children[i] ?? null);
  });

  if (coll.error) {
    els.todoEmpty.hidden = false;
    els.todoEmpty.textContent = `Could not load todos: ${coll.error.message}`;
  } else if (coll.data && !rows.length) {
    els.todoEmpty.hidden = false;
    els.todoEmpty.textContent = state.status === "all" && state.project == null ? "No todos yet. Add one above." : "No todos match this filter.";
  } else if (!coll.data) {
    els.todoEmpty.hidden = false;
    els.todoEmpty.textContent = "Loading…";
  } else {
    els.todoEmpty.hidden = true;
  }
  els.todoCount.textContent = coll.data ? `${coll.data.count}` : "";
  els.collectionMeta.textContent = coll.data
    ? `collection todos ${describeParams(coll.params)} · ${coll.data.count} ids · fetched ${formatTime(coll.ts)}`
    : "";
  return complete;
}

function createRow(id) {
  const row = h(
    "li",
    { class: "todo-row", dataset: { testid: "todo-row", todoId: String(id) } },
    h("input", { type: "checkbox", class: "todo-toggle", dataset: { testid: "todo-toggle" }, "aria-label": "Done" }),
    h("span", { class: "todo-title", dataset: { testid: "todo-title" }, title: "Double-click to edit" }),
    h("button", { type: "button", class: "icon-btn todo-delete", dataset: { testid: "todo-delete" }, "aria-label": "Delete todo", title: "Delete" }, "×"),
  );
  rowIds.set(row, id);
  return row;
}

function updateRow(row, id, rec) {
  const data = rec.data;
  const pending = state.pending.has(idKey(id));
  const editing = state.editing?.kind === "todo" && idKey(state.editing.id) === idKey(id);
  row.classList.toggle("is-selected", idKey(state.selectedId) === idKey(id));
  row.classList.toggle("is-pending", pending);
  row.classList.toggle("is-loading", !data);
  row.dataset.status = data?.status ?? "";
  if (data) delete row.dataset.loading;
  else row.dataset.loading = "1";

  const toggle = row.querySelector(".todo-toggle");
  if (!pending) toggle.checked = data?.status === "done";
  toggle.disabled = !data;

  const title = row.querySelector(".todo-title");
  if (!editing) {
    const text = data ? data.title : rec.error ? `unavailable (${rec.error.message})` : "…";
    if (title.textContent !== text) title.textContent = text;
  }

  // Highlight a row whose data changed after it was first shown.
  if (data) {
    const signature = JSON.stringify([data.title, data.status]);
    if (row.dataset.sig && row.dataset.sig !== signature && row.isConnected) flash(row);
    row.dataset.sig = signature;
  }
}

function flash(el) {
  el.classList.remove("flash");
  void el.offsetWidth; // restart the animation
  el.classList.add("flash");
}

// ---------------------------------------------------------------- detail

function renderDetail(projects) {
  const id = state.selectedId;
  if (id == null) {
    els.detailBody.hidden = true;
    els.detailBody.replaceChildren();
    delete els.detailBody.dataset.todoId;
    els.detailEmpty.hidden = false;
    els.detailEmpty.textContent = state.deletedNotice ?? "";
    if (!state.deletedNotice) {
      els.detailEmpty.append("Select a todo to see it at the ", h("code", {}, "expanded"), " level. Its description and timestamps are only fetched here.");
    }
    return;
  }
  els.detailEmpty.hidden = true;
  els.detailBody.hidden = false;
  const rec = client.item("todo", id, "expanded");

  if (rec.missing) {
    state.selectedId = null;
    state.deletedNotice = `Todo #${id} was deleted.`;
    renderDetail(projects);
    return;
  }

  let form = els.detailBody.querySelector("form");
  if (els.detailBody.dataset.todoId !== idKey(id) || !form) {
    form = buildDetailForm(id);
    els.detailBody.replaceChildren(form);
    els.detailBody.dataset.todoId = idKey(id);
    syncOptions(form.elements.project, projects, "No project");
  }
  const data = rec.data;
  form.classList.toggle("is-loading", !data);
  // Nothing typed before the item loads could be told apart from the server's value.
  for (const el of form.elements) el.disabled = !data;
  $(".detail-status", form).textContent = data ? "" : rec.error ? `Could not load: ${rec.error.message}` : "Loading…";
  if (!data) return;

  const conflicts = [];
  if (syncField(form.elements.title, data.title ?? "")) conflicts.push("title");
  if (syncField(form.elements.description, data.description ?? "")) conflicts.push("description");
  syncField(form.elements.project, data.project == null ? "" : idKey(data.project), true);
  if (form.elements.title.dataset.submitted === data.title) delete form.elements.title.dataset.submitted;
  if (!state.pending.has(idKey(id))) form.elements.done.checked = data.status === "done";
  $(".detail-id", form).textContent = `#${data.id ?? id}`;
  $(".detail-status-pill", form).textContent = data.status ?? "";
  $(".detail-status-pill", form).dataset.status = data.status ?? "";
  $(".detail-created", form).textContent = formatDateTime(data.created_at);
  $(".detail-updated", form).textContent = formatDateTime(data.updated_at);
  $(".detail-project-name", form).textContent =
    data.project == null ? "none" : projects.get(idKey(data.project))?.name ?? `#${data.project}`;
  $(".detail-fetched", form).textContent = `fetched ${formatTime(rec.ts)}`;
  const conflict = $(".detail-conflict", form);
  conflict.hidden = !conflicts.length;
  conflict.textContent = conflicts.length ? `Changed in another window while you were editing: ${conflicts.join(", ")}. Saving overwrites it.` : "";
  form.elements.save.disabled = form.elements.description.value === (data.description ?? "");
}

/**
 * Updates a field from the server unless the user has unsaved edits in it.
 * @returns {boolean} true when the server value changed under unsaved edits
 */
function syncField(el, value, always = false) {
  const previous = el.dataset.server;
  const dirty = !always && previous !== undefined && el.value !== previous;
  el.dataset.server = value;
  if (!dirty || el.value === value) {
    if (el.value !== value) el.value = value;
    delete el.dataset.conflict;
    return false;
  }
  if (previous !== value) el.dataset.conflict = "1";
  return el.dataset.conflict === "1";
}

function buildDetailForm(id) {
  const form = h(
    "form",
    { class: "detail-form", autocomplete: "off", dataset: { testid: "detail-form" } },
    h(
      "div",
      { class: "detail-head" },
      h("span", { class: "detail-id" }, `#${id}`),
      h("span", { class: "status-pill detail-status-pill" }),
      h("span", { class: "muted small detail-fetched" }),
      h("button", { type: "button", class: "icon-btn detail-close", "aria-label": "Close detail", title: "Close", name: "close" }, "×"),
    ),
    h("p", { class: "muted small detail-status" }),
    h("p", { class: "detail-conflict", hidden: true }),
    h("label", { class: "field" }, h("span", {}, "Title"), h("input", { name: "title", maxlength: "200", dataset: { testid: "detail-title" } })),
    h(
      "div",
      { class: "field-row" },
      h("label", { class: "check" }, h("input", { type: "checkbox", name: "done", dataset: { testid: "detail-toggle" } }), h("span", {}, "Done")),
      h(
        "label",
        { class: "field field-inline" },
        h("span", {}, "Project"),
        h("select", { name: "project", dataset: { testid: "detail-project" } }, h("option", { value: "" }, "No project")),
      ),
    ),
    h(
      "label",
      { class: "field" },
      h("span", {}, "Description"),
      h("textarea", { name: "description", rows: "6", placeholder: "Add details…", dataset: { testid: "detail-description" } }),
    ),
    h(
      "div",
      { class: "detail-actions" },
      h("button", { type: "submit", class: "btn btn-primary", name: "save", dataset: { testid: "detail-save" } }, "Save description"),
      h("button", { type: "button", class: "btn btn-danger", name: "delete", dataset: { testid: "detail-delete" } }, "Delete"),
    ),
    h(
      "dl",
      { class: "detail-meta small" },
      h("dt", {}, "Project"),
      h("dd", { class: "detail-project-name" }),
      h("dt", {}, "Created"),
      h("dd", { class: "detail-created" }),
      h("dt", {}, "Updated"),
      h("dd", { class: "detail-updated" }),
    ),
  );

  const patch = (body) => runTodoMutation(id, () => client.mutate("PATCH", todoUrl(id), body));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const description = form.elements.description.value;
    patch({ description });
  });
  form.elements.description.addEventListener("input", () => {
    form.elements.save.disabled = form.elements.description.value === (form.elements.description.dataset.server ?? "");
  });
  form.elements.description.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.metaKey || event.ctrlKey)) form.requestSubmit();
  });
  const saveTitle = () => {
    const input = form.elements.title;
    const title = input.value.trim();
    // Enter saves and the blur that may follow must not send it twice.
    if (!title || title === input.dataset.server || title === input.dataset.submitted) return;
    input.dataset.submitted = title;
    patch({ title });
  };
  form.elements.title.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      saveTitle();
    } else if (event.key === "Escape") {
      form.elements.title.value = form.elements.title.dataset.server ?? "";
    }
  });
  form.elements.title.addEventListener("blur", saveTitle);
  form.elements.done.addEventListener("change", () => patch({ status: form.elements.done.checked ? "done" : "active" }));
  form.elements.project.addEventListener("change", () => patch({ project: parseIdValue(form.elements.project.value) }));
  form.elements.delete.addEventListener("click", () => deleteTodo(id));
  form.elements.close.addEventListener("click", () => selectTodo(null));
  return form;
}

// ------------------------------------------------------------- mutations

const todoUrl = (id) => `/api/todos/${encodeURIComponent(String(id))}/`;
const projectUrl = (id) => `/api/projects/${encodeURIComponent(String(id))}/`;

/**
 * Marks a row pending until the mutation's directives have been applied and
 * the refetches they started have landed, so the row never flickers back to
 * its old state in between.
 */
async function runTodoMutation(id, action) {
  const key = idKey(id);
  state.pending.add(key);
  scheduleRender();
  try {
    await action();
    await client.settled();
  } catch (error) {
    toast(error.message || "Request failed");
  } finally {
    state.pending.delete(key);
    scheduleRender();
  }
}

async function deleteTodo(id) {
  if (idKey(state.selectedId) === idKey(id)) selectTodo(null);
  await runTodoMutation(id, () => client.mutate("DELETE", todoUrl(id)));
}

function selectTodo(id) {
  state.selectedId = id;
  state.deletedNotice = null;
  scheduleRender();
}

function startInlineEdit(kind, id, container, current, save) {
  state.editing = { kind, id };
  const input = h("input", { class: "inline-edit", name: kind === "todo" ? "edit-title" : "edit-name", value: current, maxlength: "200" });
  let done = false;
  const finish = (commit) => {
    if (done) return;
    done = true;
    const value = input.value.trim();
    input.remove();
    container.hidden = false;
    state.editing = null;
    if (commit && value && value !== current) save(value);
    scheduleRender();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      finish(true);
    } else if (event.key === "Escape") {
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
  input.addEventListener("click", (event) => event.stopPropagation());
  container.hidden = true;
  container.after(input);
  input.focus();
  input.select();
}

// --------------------------------------------------------------- inspector

let lastGapEntry = null;

function shortId(id) {
  if (!id) return "";
  return id === clientId ? "this window" : String(id).slice(0, 8);
}

function describeParams(params) {
  if (!params || !Object.keys(params).length) return "(all)";
  return Object.entries(params)
    .map(([k, v]) => `${k}=${JSON.stringify(v)}`)
    .join(" ");
}

function describeDirective(d) {
  if (!d || typeof d !== "object") return [h("code", { class: "op" }, "?"), String(d)];
  const parts = [h("code", { class: "op" }, d.op ?? "?")];
  switch (d.op) {
    case "refresh_item":
      parts.push(h("span", { class: "dir-target" }, `${d.name} ${JSON.stringify(d.id)}`));
      if (d.level) parts.push(h("span", { class: "dir-meta" }, `level=${d.level}`));
      break;
    case "refresh_collection":
      parts.push(h("span", { class: "dir-target" }, `${d.name} ${d.params ? describeParams(d.params) : "(every cached params)"}`));
      if (d.params && d.params_mode) parts.push(h("span", { class: "dir-meta" }, d.params_mode));
      break;
    case "invalidate":
      parts.push(h("span", { class: "dir-target" }, `${(d.targets ?? []).length} targets`));
      break;
    case "force_reload_page":
      parts.push(h("span", { class: "dir-target" }, d.hard ? "hard" : "soft"));
      break;
    default:
      break;
  }
  if (d.result != null) parts.push(h("span", { class: "dir-meta dir-result" }, "+result"));
  return parts;
}

function directiveItems(directives, results = []) {
  return directives.map((d, i) => {
    const r = results[i];
    const nested = d?.op === "invalidate" && Array.isArray(d.targets) ? h("ul", { class: "dir-list nested" }, directiveItems(d.targets, r?.targets ?? [])) : null;
    return h(
      "li",
      { class: `dir${r ? ` dir-${r.outcome}` : ""}` },
      ...describeDirective(d),
      r && r.outcome !== "applied" ? h("span", { class: `dir-outcome` }, r.outcome) : null,
      r?.detail && r.outcome === "applied" ? h("span", { class: "dir-detail" }, `→ ${r.detail}`) : null,
      nested,
    );
  });
}

const OUTCOME_LABELS = { gap: "gap → resync", "idempotent-skip": "idempotent-skip" };

function addInspectorEntry(entry) {
  const directives = Array.isArray(entry.directives) ? entry.directives : [];
  const item = h(
    "li",
    {
      class: `entry entry-${entry.outcome} entry-${entry.via}`,
      dataset: {
        testid: "inspector-entry",
        outcome: entry.outcome,
        via: entry.via,
        type: entry.type,
        ...(entry.seq != null && !Number.isNaN(entry.seq) ? { seq: String(entry.seq) } : {}),
        ...(entry.audience ? { audience: entry.audience } : {}),
        ...(entry.replayed ? { replayed: "true" } : {}),
      },
    },
    h(
      "div",
      { class: "entry-head" },
      h("span", { class: `badge badge-${entry.outcome}` }, OUTCOME_LABELS[entry.outcome] ?? entry.outcome),
      h("span", { class: `via via-${entry.via}` }, entry.via),
      entry.type === "hello" && entry.outcome !== "hello" ? h("span", { class: "entry-type" }, "hello") : null,
      entry.seq != null ? h("span", { class: "entry-seq", title: entry.type === "hello" ? "last_seq" : "seq" }, `seq ${entry.seq}`) : null,
      entry.replayed ? h("span", { class: "entry-type", title: "sent again after a reconnect" }, "replayed") : null,
      entry.audience ? h("span", { class: "entry-audience" }, entry.audience) : null,
      entry.source ? h("span", { class: "entry-source", title: entry.source }, `from ${shortId(entry.source)}`) : null,
      h("time", { class: "entry-time", datetime: new Date(entry.time).toISOString() }, formatTime(entry.time)),
    ),
    entry.request ? h("div", { class: "entry-request" }, entry.request) : null,
    directives.length ? h("ul", { class: "dir-list" }, directiveItems(directives, entry.results)) : null,
    entry.detail ? h("div", { class: "entry-detail" }, entry.detail) : null,
    entry.raw !== undefined || directives.length
      ? h("details", { class: "entry-raw" }, h("summary", {}, "JSON"), h("pre", {}, JSON.stringify(entry.raw ?? directives, null, 2)))
      : null,
  );
  if (entry.outcome === "gap") lastGapEntry = item;
  els.inspectorList.prepend(item);
  while (els.inspectorList.children.length > INSPECTOR_MAX) els.inspectorList.lastElementChild.remove();
  els.inspectorEmpty.hidden = true;
  renderStats();
}

function onResync(event) {
  const status = els.resyncStatus;
  status.hidden = false;
  if (event.phase === "scheduled") {
    status.dataset.phase = "scheduled";
    status.textContent = `Gap detected (${event.reason}). Resync in ${(event.delay / 1000).toFixed(1)} s…`;
  } else {
    status.dataset.phase = "done";
    status.textContent = `Resynced at ${formatTime(Date.now())}: ${event.fetches} refetches.`;
    if (lastGapEntry) {
      lastGapEntry.append(h("div", { class: "entry-detail" }, `resync done (${event.fetches} refetches)`));
      lastGapEntry = null;
    }
  }
  scheduleRender();
}

function renderConnection({ state: connState, attempt }) {
  const el = els.connection;
  el.dataset.state = connState;
  let label = "offline";
  if (connState === "open") label = "live";
  else if (connState === "connecting") label = attempt > 1 ? `reconnecting (try ${attempt})` : "connecting";
  $(".connection-label", el).textContent = label;
  el.title = `SSE ${connState}${client.audiences.length ? ` · audiences ${client.audiences.join(", ")}` : ""}`;
}

function renderStats() {
  const s = client.stats;
  const seqs = client.seqs;
  els.audiences.replaceChildren(
    ...client.audiences.map((a) => h("span", { class: "chip", title: "last seq seen" }, `${a} `, h("b", {}, seqs[a] ?? "–"))),
  );
  els.clientStats.textContent = `${s.fetches} GETs · ${s.coalesced} coalesced · ${s.applied} applied · ${s.skipped} skipped · ${s.resyncs} resyncs · ${s.replayed} replayed`;
}

// ------------------------------------------------------------ formatting

function pad(n, width = 2) {
  return String(n).padStart(width, "0");
}

function formatTime(ms) {
  if (!ms) return "–";
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function formatDateTime(value) {
  if (!value) return "–";
  const d = new Date(value);
  return Number.isNaN(d.getTime()) ? String(value) : d.toLocaleString();
}

function toast(message, kind = "error") {
  const el = h("div", { class: `toast toast-${kind}`, role: "status" }, message);
  els.toasts.append(el);
  setTimeout(() => el.remove(), 5000);
}

// --------------------------------------------------------------- session

function waitForHellos(audiences, timeoutMs) {
  return new Promise((resolve) => {
    const missing = new Set(audiences);
    let off = () => {};
    const timer = setTimeout(() => {
      off();
      resolve(false);
    }, timeoutMs);
    off = client.on("log", (entry) => {
      if (entry.type === "hello") missing.delete(entry.audience);
      if (entry.type === "stream-error" || !missing.size) {
        clearTimeout(timer);
        off();
        resolve(!missing.size);
      }
    });
  });
}

async function startSession(me) {
  state.user = me;
  els.boot.hidden = true;
  els.login.hidden = true;
  els.app.hidden = false;
  els.session.hidden = false;
  els.sessionUser.textContent = me.username;
  els.sessionUser.title = `user id ${me.id}`;
  const audiences = Array.isArray(me.audiences) && me.audiences.length ? me.audiences : ["global"];
  client.reset();
  // Open the stream before the first fetch, so that no change can fall
  // between the data we read and the point the stream starts from.
  const hellos = waitForHellos(audiences, 2000);
  client.connect(audiences);
  await hellos;
  if (state.user !== me) return;
  state.live = true;
  state.readyPending = true;
  render();
}

function clearInspector() {
  els.inspectorList.replaceChildren();
  els.inspectorEmpty.hidden = false;
  lastGapEntry = null;
}

function endSession() {
  client.disconnect();
  client.reset();
  // The next user of this window must not see the previous user's envelopes.
  clearInspector();
  els.resyncStatus.hidden = true;
  state.status = "all";
  state.project = null;
  state.user = null;
  state.live = false;
  state.selectedId = null;
  state.editing = null;
  state.listKey = null;
  state.listIds = [];
  state.readyPending = false;
  delete document.body.dataset.ready;
  for (const row of rowEls.values()) row.remove();
  rowEls.clear();
  els.detailBody.replaceChildren();
  delete els.detailBody.dataset.todoId;
  showLogin();
}

function showLogin(message) {
  els.boot.hidden = true;
  els.app.hidden = true;
  els.session.hidden = true;
  els.login.hidden = false;
  els.loginError.hidden = !message;
  els.loginError.textContent = message ?? "";
  els.loginForm.elements.password.value = "";
  (els.loginForm.elements.username.value ? els.loginForm.elements.password : els.loginForm.elements.username).focus();
}

// ----------------------------------------------------------------- events

function bindEvents() {
  els.loginForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = els.loginForm;
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    els.loginError.hidden = true;
    try {
      const me = await fetchJson("/api/auth/login/", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ username: form.elements.username.value.trim(), password: form.elements.password.value }),
      });
      await startSession(me);
    } catch (error) {
      els.loginError.hidden = false;
      els.loginError.textContent = error.message || "Sign-in failed";
    } finally {
      button.disabled = false;
    }
  });

  els.logout.addEventListener("click", async () => {
    try {
      await fetchJson("/api/auth/logout/", { method: "POST" });
    } catch (error) {
      toast(`Logout: ${error.message}`);
    }
    endSession();
  });

  els.openWindow.addEventListener("click", () => {
    const width = Math.max(900, Math.round(window.outerWidth / 2));
    window.open(location.href, "_blank", `popup,width=${width},height=${window.outerHeight}`);
  });

  for (const button of els.statusButtons) {
    button.addEventListener("click", () => {
      state.status = button.dataset.status;
      scheduleRender();
    });
  }

  els.projectFilter.addEventListener("change", () => {
    state.project = parseIdValue(els.projectFilter.value);
    els.newTodo.elements.project.value = els.projectFilter.value;
    scheduleRender();
  });

  els.newTodo.addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = els.newTodo;
    const title = form.elements.title.value.trim();
    if (!title) return;
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      await client.mutate("POST", "/api/todos/", {
        title,
        status: "active",
        description: "",
        project: parseIdValue(form.elements.project.value),
      });
      form.elements.title.value = "";
    } catch (error) {
      toast(error.message || "Could not create the todo");
    } finally {
      button.disabled = false;
      form.elements.title.focus();
    }
  });

  els.newProject.addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = els.newProject.elements.name;
    const name = input.value.trim();
    if (!name) return;
    try {
      await client.mutate("POST", "/api/projects/", { name });
      input.value = "";
    } catch (error) {
      toast(error.message || "Could not create the project");
    }
  });

  els.projectList.addEventListener("click", (event) => {
    const li = event.target.closest("[data-project-id]");
    if (!li || state.editing) return;
    const id = parseIdValue(li.dataset.projectId);
    if (event.target.closest("[data-testid='project-rename']")) {
      const nameEl = li.querySelector(".project-name");
      startInlineEdit("project", id, nameEl, nameEl.textContent, (name) =>
        client.mutate("PATCH", projectUrl(id), { name }).catch((error) => toast(error.message)),
      );
      return;
    }
    state.project = idKey(state.project) === idKey(id) ? null : id;
    els.newTodo.elements.project.value = state.project == null ? "" : idKey(state.project);
    scheduleRender();
  });

  els.todoList.addEventListener("change", (event) => {
    if (!event.target.matches("[data-testid='todo-toggle']")) return;
    const row = event.target.closest("[data-testid='todo-row']");
    const id = rowIds.get(row);
    const status = event.target.checked ? "done" : "active";
    runTodoMutation(id, () => client.mutate("PATCH", todoUrl(id), { status }));
  });

  els.todoList.addEventListener("click", (event) => {
    const row = event.target.closest("[data-testid='todo-row']");
    if (!row) return;
    const id = rowIds.get(row);
    if (event.target.closest("[data-testid='todo-delete']")) {
      deleteTodo(id);
      return;
    }
    if (event.target.closest("[data-testid='todo-toggle'], .inline-edit")) return;
    if (idKey(state.selectedId) !== idKey(id)) selectTodo(id);
  });

  els.todoList.addEventListener("dblclick", (event) => {
    const title = event.target.closest("[data-testid='todo-title']");
    const row = title?.closest("[data-testid='todo-row']");
    if (!row || row.dataset.loading) return;
    const id = rowIds.get(row);
    startInlineEdit("todo", id, title, title.textContent, (value) =>
      runTodoMutation(id, () => client.mutate("PATCH", todoUrl(id), { title: value })),
    );
  });

  els.inspectorClear.addEventListener("click", clearInspector);

  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !state.editing && state.selectedId != null && !event.target.closest?.("input, textarea, select")) {
      selectTodo(null);
    }
  });
}

// ------------------------------------------------------------------- boot

client.on("change", scheduleRender);
client.on("log", addInspectorEntry);
client.on("state", renderConnection);
client.on("resync", onResync);
els.clientIdEl.textContent = clientId;
els.clientIdEl.title = "This window's client id: the source of the directives it causes";
bindEvents();

async function boot() {
  if (document.body.dataset.authenticated !== "1") {
    showLogin();
    return;
  }
  try {
    await startSession(await fetchJson("/api/auth/me/"));
  } catch (error) {
    showLogin(error.status === 403 || error.status === 401 ? undefined : `Could not reach the server: ${error.message}`);
  }
}

boot();
