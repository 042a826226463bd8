// A small, dependency-free client for the verity_django wire protocol.
//
// It implements the client half of PROTOCOL.md: a cache of collections and
// leveled items, directive application (pull and push), idempotency, and one
// SSE connection that carries several audiences with per-audience seq
// tracking. It mirrors the behaviour of the public Verity client (`verity-dl`)
// where PROTOCOL.md marks it as "client behaviour", so the demo shows exactly
// what a real Verity user would see.

export const DEFAULT_LEVEL = "default";

const IDEMPOTENCY_TTL_MS = 5 * 60 * 1000;
const IDEMPOTENCY_MAX_KEYS = 2048;

/** JSON with object keys sorted at every depth: the identity of a params object. */
export function stableStringify(value) {
  if (value === undefined) return "null";
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) return "[" + value.map(stableStringify).join(",") + "]";
  const keys = Object.keys(value).filter((k) => value[k] !== undefined).sort();
  return "{" + keys.map((k) => JSON.stringify(k) + ":" + stableStringify(value[k])).join(",") + "}";
}

/** `null`, a missing value and `{}` are all the default params. */
export function paramsKey(params) {
  return isDefaultParams(params) ? "{}" : stableStringify(params);
}

function isDefaultParams(params) {
  return params == null || typeof params !== "object" || Object.keys(params).length === 0;
}

/**
 * `42` and `"42"` are different keys, as in the Verity client. JSON.stringify
 * keeps the distinction visible (`todo:42` vs `todo:"42"`), so a server that
 * sends ids of the wrong JSON type fails here the same way it fails for users.
 */
export function itemKey(name, id) {
  return `${name}:${JSON.stringify(id)}`;
}

function normalizeLevel(level) {
  return level == null || level === "" || level === "null" || level === DEFAULT_LEVEL ? DEFAULT_LEVEL : String(level);
}

function isCollectionData(value) {
  return value != null && typeof value === "object" && Array.isArray(value.ids);
}

function jitter([min, max]) {
  return min + Math.random() * (max - min);
}

/**
 * @param {object} options
 * @param {(url: string, init?: RequestInit) => Promise<any>} options.fetchJson
 *   Resolves to the parsed JSON body (or null for an empty body) and rejects
 *   with an Error carrying `.status` on HTTP errors. Cookies/CSRF are its job.
 * @param {Record<string, string | ((params: object) => string)>} options.collections
 *   Collection name to base URL; params become the query string.
 * @param {Record<string, {url: string | ((id: any, level: string) => string), levels?: string[]}>} options.types
 *   Item type name to base URL and its levels ordered narrow to wide; each
 *   level satisfies every narrower one (e.g. expanded ⊃ simplified ⊃ default).
 */
export function createVerityClient({
  clientId = globalThis.crypto?.randomUUID?.() ?? `c-${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`,
  fetchJson,
  collections: collectionConfig = {},
  types: typeConfig = {},
  sse = {},
  reload = defaultReload,
  onChange,
  log,
  recentItemMs = 5 * 60 * 1000,
  resyncJitterMs = [1500, 3500],
} = {}) {
  if (typeof fetchJson !== "function") throw new TypeError("createVerityClient needs a fetchJson(url, init) function");

  const sseOptions = {
    url: "/api/events",
    clientIdParam: "client_id",
    audienceParam: "audience",
    withCredentials: true,
    initialRetryMs: 1000,
    maxRetryMs: 30000,
    ...sse,
  };

  // ---------------------------------------------------------------- events
  const listeners = new Map();
  function on(event, fn) {
    if (!listeners.has(event)) listeners.set(event, new Set());
    listeners.get(event).add(fn);
    return () => listeners.get(event)?.delete(fn);
  }
  function emit(event, payload) {
    for (const fn of listeners.get(event) ?? []) {
      try {
        fn(payload);
      } catch (err) {
        console.error(`verity: ${event} listener failed`, err);
      }
    }
  }
  if (onChange) on("change", onChange);
  if (log) on("log", log);

  let logSeq = 0;
  function logEntry(entry) {
    const full = { id: ++logSeq, time: Date.now(), ...entry };
    emit("log", full);
    return full;
  }

  // ----------------------------------------------------------------- cache
  /** name -> Map(paramsKey -> {name, params, key, data, ts, error, usedAt, directAt}) */
  const collections = new Map();
  /** itemKey -> {name, id, levels: Map(level -> {data, ts, error}), missing, usedAt, directAt} */
  const items = new Map();
  const stats = { fetches: 0, coalesced: 0, applied: 0, skipped: 0, resyncs: 0, replayed: 0 };

  // A counter bumped whenever a `result` is written straight into the cache.
  // A fetch that started before such a write must not overwrite it.
  let directWrites = 0;
  // Bumped by every directive batch and resync: an in-flight fetch that began
  // in an earlier epoch may predate the change, so it is fetched once more.
  let epoch = 0;
  // Bumped by reset(): completions of fetches from a previous session are dropped.
  let generation = 0;

  function collectionUrl(name, params) {
    const base = collectionConfig[name];
    if (typeof base === "function") return base(params ?? {});
    if (typeof base !== "string") throw new Error(`verity: unknown collection "${name}"`);
    const query = new URLSearchParams();
    for (const key of Object.keys(params ?? {}).sort()) {
      const value = params[key];
      if (value === undefined || value === null) continue;
      query.append(key, typeof value === "object" ? JSON.stringify(value) : String(value));
    }
    const qs = query.toString();
    return qs ? `${base}${base.includes("?") ? "&" : "?"}${qs}` : base;
  }

  function levelsOf(name) {
    const levels = typeConfig[name]?.levels ?? [DEFAULT_LEVEL];
    return levels.map(normalizeLevel);
  }
  function rank(name, level) {
    return levelsOf(name).indexOf(level);
  }
  /** Levels a level satisfies: itself and, if it is on the chain, every narrower one. */
  function coveredBy(name, level) {
    const r = rank(name, level);
    return r < 0 ? [level] : levelsOf(name).slice(0, r + 1);
  }

  function itemUrl(name, id, level) {
    const base = typeConfig[name]?.url;
    if (typeof base === "function") return base(id, level);
    if (typeof base !== "string") throw new Error(`verity: unknown item type "${name}"`);
    const url = `${base}${encodeURIComponent(String(id))}/`;
    return level === DEFAULT_LEVEL ? url : `${url}?level=${encodeURIComponent(level)}`;
  }

  function collectionEntry(name, params) {
    if (!collections.has(name)) collections.set(name, new Map());
    const byKey = collections.get(name);
    const key = paramsKey(params);
    let entry = byKey.get(key);
    if (!entry) {
      entry = { name, params: isDefaultParams(params) ? {} : { ...params }, key, data: null, ts: 0, error: null, usedAt: 0, directAt: 0 };
      byKey.set(key, entry);
    }
    return entry;
  }

  function itemEntry(name, id) {
    const key = itemKey(name, id);
    let entry = items.get(key);
    if (!entry) {
      entry = { name, id, key, levels: new Map(), missing: false, usedAt: 0, directAt: 0 };
      items.set(key, entry);
    }
    return entry;
  }

  function writeItemLevel(entry, level, data, ts) {
    for (const covered of coveredBy(entry.name, level)) {
      entry.levels.set(covered, { data, ts, error: null });
    }
    entry.missing = false;
  }

  // ------------------------------------------------------- coalesced fetch
  const inflight = new Map();

  function runFetch(fetchKey, doFetch, { force = false } = {}) {
    const current = inflight.get(fetchKey);
    if (current) {
      stats.coalesced += 1;
      if (force && current.epoch < epoch) current.again = true;
      return current.promise;
    }
    const state = { epoch, again: false, promise: null };
    const gen = generation;
    state.promise = (async () => {
      try {
        do {
          state.again = false;
          state.epoch = epoch;
          stats.fetches += 1;
          await doFetch(gen);
        } while (state.again && gen === generation);
      } finally {
        if (inflight.get(fetchKey) === state) inflight.delete(fetchKey);
      }
    })();
    inflight.set(fetchKey, state);
    return state.promise;
  }

  function fetchCollection(name, params, { force = false } = {}) {
    const entry = collectionEntry(name, params);
    return runFetch(
      `c|${name}|${entry.key}`,
      async (gen) => {
        const startedAt = directWrites;
        let data = null;
        let error = null;
        try {
          data = await fetchJson(collectionUrl(name, entry.params));
        } catch (err) {
          error = err;
        }
        if (gen !== generation || entry.directAt > startedAt) return;
        if (error) {
          entry.error = error;
        } else {
          entry.data = { ids: data?.ids ?? [], count: data?.count ?? (data?.ids ?? []).length };
          entry.ts = Date.now();
          entry.error = null;
        }
        emit("change", { kind: "collection", name, params: entry.params, key: entry.key });
      },
      { force },
    ).then(() => entry);
  }

  function fetchItem(name, id, level, { force = false } = {}) {
    level = normalizeLevel(level);
    const entry = itemEntry(name, id);
    return runFetch(
      `i|${entry.key}|${level}`,
      async (gen) => {
        const startedAt = directWrites;
        let data = null;
        let error = null;
        try {
          data = await fetchJson(itemUrl(name, id, level));
        } catch (err) {
          error = err;
        }
        if (gen !== generation || entry.directAt > startedAt) return;
        if (error) {
          const previous = entry.levels.get(level);
          entry.levels.set(level, { data: previous?.data ?? null, ts: previous?.ts ?? 0, error });
          if (error.status === 404 || error.status === 410) entry.missing = true;
        } else {
          writeItemLevel(entry, level, data, Date.now());
        }
        emit("change", { kind: "item", name, id, level, key: entry.key });
      },
      { force },
    ).then(() => entry);
  }

  /** Refetch the levels held for an item, fetching only the widest of each covered chain. */
  function refetchHeldLevels(entry, satisfied = new Set()) {
    const pending = [...entry.levels.keys()].filter((l) => !satisfied.has(l));
    const fetches = [];
    while (pending.length) {
      pending.sort((a, b) => rank(entry.name, b) - rank(entry.name, a));
      const widest = pending[0];
      fetches.push(fetchItem(entry.name, entry.id, widest, { force: true }));
      const covered = new Set(coveredBy(entry.name, widest));
      for (let i = pending.length - 1; i >= 0; i--) if (covered.has(pending[i])) pending.splice(i, 1);
    }
    return fetches;
  }

  // ------------------------------------------------------------- read API
  /** The cached collection entry; starts a fetch when nothing is cached yet. */
  function collection(name, params) {
    const entry = collectionEntry(name, params);
    entry.usedAt = Date.now();
    if (!entry.data && !entry.error) fetchCollection(name, params);
    return entry;
  }

  /** The cached record for one level of an item (wider levels satisfy it); starts a fetch when missing. */
  function item(name, id, level) {
    level = normalizeLevel(level);
    const entry = itemEntry(name, id);
    entry.usedAt = Date.now();
    const record = entry.levels.get(level);
    if (!record) {
      fetchItem(name, id, level);
      return { data: null, ts: 0, error: null, loading: true, missing: false };
    }
    return { ...record, loading: inflight.has(`i|${entry.key}|${level}`), missing: entry.missing };
  }

  function peekItem(name, id, level) {
    const entry = items.get(itemKey(name, id));
    const record = entry?.levels.get(normalizeLevel(level));
    return record ? { ...record, missing: entry.missing } : null;
  }

  // ----------------------------------------------------------- directives
  const seenKeys = new Map(); // idempotency_key -> first seen (ms); Map keeps insertion order

  function seenBefore(key) {
    const now = Date.now();
    for (const [k, t] of seenKeys) {
      if (now - t <= IDEMPOTENCY_TTL_MS) break;
      seenKeys.delete(k);
    }
    if (seenKeys.has(key)) return true;
    seenKeys.set(key, now);
    while (seenKeys.size > IDEMPOTENCY_MAX_KEYS) seenKeys.delete(seenKeys.keys().next().value);
    return false;
  }

  function applyCollectionResult(d) {
    const raw = isCollectionData(d.result) ? d.result : isCollectionData(d.result?.data) ? d.result.data : null;
    if (!raw) return false;
    const entry = collectionEntry(d.name, d.params);
    directWrites += 1;
    entry.directAt = directWrites;
    entry.data = { ids: raw.ids, count: raw.count ?? raw.ids.length };
    entry.ts = d.result.ts ?? Date.now();
    entry.error = null;
    emit("change", { kind: "collection", name: d.name, params: entry.params, key: entry.key });
    return true;
  }

  function refreshCollection(d) {
    if (!(d.name in collectionConfig)) return "collection not used here";
    if (d.result != null && applyCollectionResult(d)) return "result";
    const byKey = collections.get(d.name) ?? new Map();
    if (isDefaultParams(d.params)) {
      for (const entry of byKey.values()) fetchCollection(d.name, entry.params, { force: true });
      return byKey.size ? `refetch ${byKey.size}` : "nothing cached";
    }
    if ((d.params_mode ?? "exact") === "contains") {
      const wanted = Object.entries(d.params);
      const matches = [...byKey.values()].filter((entry) =>
        wanted.every(([k, v]) => Object.hasOwn(entry.params, k) && stableStringify(entry.params[k]) === stableStringify(v)),
      );
      if (!matches.length) {
        fetchCollection(d.name, d.params, { force: true });
        return "fetch given params";
      }
      for (const entry of matches) fetchCollection(d.name, entry.params, { force: true });
      return `refetch ${matches.length}`;
    }
    fetchCollection(d.name, d.params, { force: true });
    return "refetch exact";
  }

  /** Writes a `result` in one of the PROTOCOL.md §1 shapes; returns the levels it satisfied. */
  function applyItemResult(d) {
    const r = d.result;
    if (r == null || typeof r !== "object") return [];
    let given = [];
    if (r.levels && typeof r.levels === "object") {
      given = Object.entries(r.levels)
        .filter(([, v]) => v && typeof v === "object" && "data" in v)
        .map(([level, v]) => [normalizeLevel(level), v.data, v.ts]);
    } else if ("data" in r) {
      given = [[normalizeLevel(r.level), r.data, r.ts]];
    }
    // A level the type does not declare is not the client's to keep.
    given = given.filter(([level]) => rank(d.name, level) >= 0);
    if (!given.length) return [];
    const entry = itemEntry(d.name, d.id);
    directWrites += 1;
    entry.directAt = directWrites;
    // Widest first, so a narrower level that was given explicitly keeps its own data.
    given.sort((a, b) => rank(d.name, b[0]) - rank(d.name, a[0]));
    const satisfied = new Set();
    for (const [level, data, ts] of given) {
      writeItemLevel(entry, level, data, ts ?? Date.now());
      for (const l of coveredBy(d.name, level)) satisfied.add(l);
    }
    emit("change", { kind: "item", name: d.name, id: d.id, key: entry.key });
    return satisfied;
  }

  function refreshItem(d) {
    const entry = items.get(itemKey(d.name, d.id));
    const held = entry ? new Set(entry.levels.keys()) : new Set();
    const satisfied = new Set(applyItemResult(d));
    if (!held.size) return satisfied.size ? "result" : "not cached";
    const toFetch = [...held].filter((l) => !satisfied.has(l));
    if (!toFetch.length) return "result";
    const fetches = refetchHeldLevels(entry, satisfied);
    return `${satisfied.size ? "result + " : ""}refetch ${fetches.length}`;
  }

  /**
   * Applies a list of directives and returns one result per directive.
   * Source filtering applies only to pushed directives: a pulled directive
   * names this client as its source because this client caused it.
   */
  function applyList(list, via) {
    epoch += 1;
    const results = [];
    for (const d of Array.isArray(list) ? list : []) {
      results.push(applyOne(d, via));
    }
    return results;
  }

  function applyOne(d, via) {
    if (!d || typeof d !== "object" || typeof d.op !== "string") {
      return { directive: d, outcome: "invalid", detail: "not a directive" };
    }
    if (via === "push" && d.op !== "force_reload_page" && d.source && d.source === clientId) {
      stats.skipped += 1;
      return { directive: d, outcome: "echo", detail: "own source" };
    }
    if (d.idempotency_key != null && seenBefore(String(d.idempotency_key))) {
      stats.skipped += 1;
      return { directive: d, outcome: "idempotent-skip", detail: "key seen" };
    }
    let detail;
    switch (d.op) {
      case "refresh_collection":
        if (typeof d.name !== "string") return { directive: d, outcome: "invalid", detail: "missing name" };
        detail = refreshCollection(d);
        break;
      case "refresh_item":
        if (typeof d.name !== "string" || d.id == null) return { directive: d, outcome: "invalid", detail: "missing name/id" };
        detail = refreshItem(d);
        break;
      case "invalidate": {
        const inner = (Array.isArray(d.targets) ? d.targets : []).map((t) => applyOne(t, via));
        stats.applied += 1;
        return { directive: d, outcome: "applied", detail: `${inner.length} targets`, targets: inner };
      }
      case "force_reload_page":
        detail = d.hard ? "hard reload" : "reload";
        // Let listeners record the entry before the page goes away.
        setTimeout(() => reload(Boolean(d.hard), { eventsUrl: sseOptions.url }), 0);
        break;
      default:
        return { directive: d, outcome: "invalid", detail: `unknown op ${d.op}` };
    }
    stats.applied += 1;
    return { directive: d, outcome: "applied", detail };
  }

  function summarize(results) {
    const flat = results.flatMap((r) => (r.targets ? [r, ...r.targets] : [r]));
    if (!flat.length) return "applied";
    if (flat.some((r) => r.outcome === "applied")) return "applied";
    if (flat.every((r) => r.outcome === "echo")) return "echo";
    if (flat.some((r) => r.outcome === "idempotent-skip")) return "idempotent-skip";
    return "error";
  }

  /** Public entry point, e.g. for directives from a response the app fetched itself. */
  function applyDirectives(list, { via = "pull", request } = {}) {
    const results = applyList(list, via);
    const source = (Array.isArray(list) ? list : []).find((d) => d?.source)?.source ?? null;
    logEntry({ via, type: "directives", directives: list ?? [], source, results, outcome: summarize(results), request });
    return results;
  }

  // ------------------------------------------------------------- mutations
  function mutationHeaders() {
    return {
      "X-Verity-Directive-Request": "send me directives",
      "X-Client-ID": clientId,
      "X-Verity-Client-ID": clientId,
    };
  }

  /** Sends a mutation asking for directives and applies them at once (the pull path). */
  async function mutate(method, url, body) {
    const init = { method, headers: { ...mutationHeaders() } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetchJson(url, init);
    if (response && Array.isArray(response.directives)) {
      applyDirectives(response.directives, { via: "pull", request: `${method} ${url}` });
    }
    return response;
  }

  /** Resolves once no fetch is in flight, e.g. after a mutation's directives have been applied. */
  async function settled() {
    while (inflight.size) await Promise.allSettled([...inflight.values()].map((s) => s.promise));
  }

  // ---------------------------------------------------------------- resync
  let resyncTimer = null;

  function scheduleResync(reason) {
    if (resyncTimer) return;
    const delay = Math.round(jitter(resyncJitterMs));
    emit("resync", { phase: "scheduled", delay, reason });
    resyncTimer = setTimeout(() => {
      resyncTimer = null;
      resync(reason);
    }, delay);
  }

  /** Force-refetch every cached collection and recently used item; forget the rest. */
  function resync(reason = "manual") {
    epoch += 1;
    stats.resyncs += 1;
    const fetches = [];
    for (const byKey of collections.values()) {
      for (const entry of byKey.values()) fetches.push(fetchCollection(entry.name, entry.params, { force: true }));
    }
    const cutoff = Date.now() - recentItemMs;
    for (const [key, entry] of items) {
      // Items neither recently used nor still existing are dropped; a later read refetches them.
      if (entry.usedAt >= cutoff && !entry.missing) fetches.push(...refetchHeldLevels(entry));
      else items.delete(key);
    }
    return Promise.allSettled(fetches).then(() => emit("resync", { phase: "done", reason, fetches: fetches.length }));
  }

  // ------------------------------------------------------------------- SSE
  const seqs = new Map(); // audience -> last seq seen
  // audience -> the seq held before a hello moved the counter down: envelopes
  // up to it are a replay of what this client may already have applied.
  const replayUntil = new Map();
  let audiences = [];
  let source = null;
  let wantOpen = false;
  let retryMs = sseOptions.initialRetryMs;
  let reconnectTimer = null;
  let attempt = 0;
  let connState = "closed";

  function setState(state) {
    if (state === connState && state !== "connecting") return;
    connState = state;
    emit("state", { state, attempt, audiences: [...audiences] });
  }

  function eventsUrl() {
    const query = new URLSearchParams();
    query.append(sseOptions.clientIdParam, clientId);
    for (const a of audiences) query.append(sseOptions.audienceParam, a);
    return `${sseOptions.url}${sseOptions.url.includes("?") ? "&" : "?"}${query}`;
  }

  function connect(list) {
    if (list) audiences = [...list];
    wantOpen = true;
    retryMs = sseOptions.initialRetryMs;
    attempt = 0;
    open();
  }

  function open() {
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    if (source) source.close();
    if (typeof EventSource === "undefined") {
      setState("closed");
      return;
    }
    attempt += 1;
    setState("connecting");
    // A brand-new EventSource every time; no Last-Event-ID, as in the Verity client.
    const es = new EventSource(eventsUrl(), { withCredentials: sseOptions.withCredentials });
    source = es;
    let gotMessage = false;
    es.onopen = () => {
      if (source === es) setState("open");
    };
    es.onmessage = (event) => {
      if (source !== es) return;
      if (!gotMessage) {
        // Reset the backoff only once the server speaks; a stream that opens
        // and dies at once (e.g. a denied audience) keeps backing off.
        gotMessage = true;
        retryMs = sseOptions.initialRetryMs;
        attempt = 0;
      }
      handleMessage(event.data);
    };
    es.addEventListener("stream-error", (event) => {
      if (source !== es) return;
      let data = event.data;
      try {
        data = JSON.parse(event.data);
      } catch {
        /* keep the raw text */
      }
      logEntry({ via: "push", type: "stream-error", outcome: "error", detail: data?.text ?? data?.condition ?? String(data ?? ""), raw: data });
    });
    es.onerror = () => {
      if (source !== es) return;
      es.close();
      source = null;
      if (!wantOpen) {
        setState("closed");
        return;
      }
      const delay = Math.round(retryMs * (0.8 + Math.random() * 0.4));
      retryMs = Math.min(retryMs * 2, sseOptions.maxRetryMs);
      setState("connecting");
      emit("reconnect", { delay, attempt });
      reconnectTimer = setTimeout(open, delay);
    };
  }

  function disconnect() {
    wantOpen = false;
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    if (source) source.close();
    source = null;
    setState("closed");
  }

  function handleMessage(text) {
    let env;
    try {
      env = JSON.parse(text);
    } catch {
      logEntry({ via: "push", type: "parse-error", outcome: "error", detail: "message is not JSON", raw: text });
      return;
    }
    handleEnvelope(env);
  }

  /** Per PROTOCOL.md §3. Exposed so tests and tools can feed envelopes directly. */
  function handleEnvelope(env) {
    if (!env || typeof env !== "object") return;
    const audience = env.audience ?? "global";
    if (env.type === "hello") {
      const prev = seqs.get(audience);
      const last = Number(env.last_seq ?? 0);
      let outcome = "hello";
      let detail;
      if (prev === undefined) {
        detail = `start at seq ${last}`;
      } else if (last > prev) {
        outcome = "gap";
        detail = last === prev + 1 ? `missed seq ${last} while away` : `missed seq ${prev + 1}…${last} while away`;
        scheduleResync(`hello ${audience} ${prev}→${last}`);
      } else if (last < prev) {
        // A server that remembered this client's position replays from there
        // (or one restarted with memory-only counters).
        detail = `counter reset ${prev}→${last}; seq ${last + 1}…${prev} may come again`;
        replayUntil.set(audience, Math.max(prev, replayUntil.get(audience) ?? 0));
      } else {
        detail = "up to date";
      }
      seqs.set(audience, last);
      logEntry({ via: "push", type: "hello", audience, seq: last, outcome, detail, raw: env });
      return;
    }
    if (env.type !== "directives") {
      logEntry({ via: "push", type: String(env.type), audience, outcome: "error", detail: "unknown envelope type", raw: env });
      return;
    }
    const seq = Number(env.seq);
    const replayed = seq <= (replayUntil.get(audience) ?? 0);
    if (replayed) stats.replayed += 1;
    const base = { via: "push", type: "directives", audience, seq, replayed, source: env.source ?? null, directives: env.directives ?? [], raw: env };
    // Own envelope: dropped before seq bookkeeping, as the Verity client does.
    if (env.source && env.source === clientId) {
      // force_reload_page is never filtered by source, even inside an own envelope.
      const reloads = (Array.isArray(env.directives) ? env.directives : []).filter((d) => d?.op === "force_reload_page");
      if (reloads.length) applyList(reloads, "push");
      logEntry({ ...base, outcome: "echo", detail: "own source; dropped before seq tracking" + (reloads.length ? " (reload still applied)" : "") });
      return;
    }
    const prev = seqs.get(audience);
    const gap = prev !== undefined && seq > prev + 1;
    seqs.set(audience, prev === undefined ? seq : Math.max(prev, seq));
    if (gap) scheduleResync(`seq ${audience} ${prev}→${seq}`);
    const list = Array.isArray(env.directives) ? env.directives : [];
    if (!list.length && !env.source) {
      // The server's rewrite of this connection's own change: seq advances, nothing to do.
      logEntry({ ...base, outcome: gap ? "gap" : "echo", detail: gap ? `expected seq ${prev + 1}, got ${seq} (own change)` : "own change; server sent seq only" });
      return;
    }
    const results = applyList(list, "push");
    const outcome = gap ? "gap" : summarize(results);
    logEntry({ ...base, results, outcome, detail: gap ? `expected seq ${prev + 1}, got ${seq}` : undefined });
  }

  // ------------------------------------------------------------- lifecycle
  /** Forgets everything tied to a session (cache, seqs, in-flight fetches). */
  function reset() {
    generation += 1;
    clearTimeout(resyncTimer);
    resyncTimer = null;
    collections.clear();
    items.clear();
    inflight.clear();
    seqs.clear();
    replayUntil.clear();
    emit("change", { kind: "reset" });
  }

  return {
    clientId,
    stats,
    on,
    // reads
    collection,
    item,
    peekItem,
    fetchCollection,
    fetchItem,
    // directives
    applyDirectives,
    handleEnvelope,
    mutate,
    mutationHeaders,
    settled,
    resync,
    // SSE
    connect,
    disconnect,
    get state() {
      return connState;
    },
    get audiences() {
      return [...audiences];
    },
    get seqs() {
      return Object.fromEntries(seqs);
    },
    reset,
    // introspection for the inspector and tests
    debug: { collections, items, seenKeys, inflight },
  };
}

/**
 * `location.reload()` cannot bypass the cache in most browsers, so a hard
 * reload first refetches the document and its same-origin assets with
 * `cache: "reload"`, which replaces their HTTP-cache entries.
 */
async function defaultReload(hard, { eventsUrl = "/api/events" } = {}) {
  if (typeof location === "undefined") return;
  if (hard && typeof fetch === "function") {
    const eventsPath = new URL(eventsUrl, location.href).pathname;
    const urls = new Set([location.href]);
    for (const e of globalThis.performance?.getEntriesByType?.("resource") ?? []) {
      if (e.initiatorType === "fetch" || e.initiatorType === "xmlhttprequest") continue;
      const url = new URL(e.name, location.href);
      if (url.origin === location.origin && url.pathname !== eventsPath) urls.add(url.href);
    }
    const refetch = Promise.allSettled([...urls].map((u) => fetch(u, { cache: "reload", credentials: "same-origin" })));
    await Promise.race([refetch, new Promise((resolve) => setTimeout(resolve, 3000))]);
  }
  location.reload();
}
