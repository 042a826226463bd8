// Drives the demo's verity-client.js headless, for tests/protocol.
//
// Reads one JSON request per line on stdin: {"world": {...}, "vector": {...}},
// and answers one JSON line per request: {"observations": [...], "stream_url": ...}
// with one observation per step and the URL the client opened its stream at,
// or {"error": "..."}. The client module is used as the
// page uses it; only its surroundings are fake: EventSource (messages are
// handed to onmessage as text), fetchJson (answers at once and records what
// was asked), setTimeout and Date.now (a clock that jumps to the next timer,
// so a resync's jitter passes without waiting), and the page reload.
//
// Usage: node run_vectors.mjs /path/to/verity-client.js

import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";

const clientModule = await import(pathToFileURL(process.argv[2]).href);
const { createVerityClient, stableStringify } = clientModule;

// ------------------------------------------------------------------ fakes
const START = 1_700_000_000_000;
let now = START;
let timers = [];
let nextTimer = 1;

Date.now = () => now;
// Resync jitter and client ids are random in a page; a fixed value keeps runs repeatable.
Math.random = () => 0.5;
globalThis.setTimeout = (fn, ms = 0, ...args) => {
  const id = nextTimer++;
  timers.push({ id, at: now + Math.max(0, Number(ms) || 0), fn: () => fn(...args) });
  return id;
};
globalThis.clearTimeout = (id) => {
  timers = timers.filter((t) => t.id !== id);
};

class FakeEventSource {
  static instances = [];
  constructor(url, init) {
    this.url = url;
    this.init = init;
    this.closed = false;
    this.onopen = null;
    this.onmessage = null;
    this.onerror = null;
    this.named = new Map();
    FakeEventSource.instances.push(this);
  }
  addEventListener(type, fn) {
    this.named.set(type, fn);
  }
  close() {
    this.closed = true;
  }
}
globalThis.EventSource = FakeEventSource;

const turn = () => new Promise((resolve) => setImmediate(resolve));

/** Lets every fetch finish and every timer fire, advancing the clock to each. */
async function quiesce(client) {
  for (let round = 0; round < 1000; round++) {
    await client.settled();
    await turn();
    if (!timers.length) {
      await client.settled();
      return;
    }
    timers.sort((a, b) => a.at - b.at || a.id - b.id);
    const timer = timers.shift();
    now = Math.max(now, timer.at);
    timer.fn();
  }
  throw new Error("timers keep firing: more than 1000 rounds");
}

// ------------------------------------------------------------- one vector
const RESULT_NAMES = { applied: "applied", echo: "echo", "idempotent-skip": "skip", invalid: "invalid" };

async function runVector(world, vector) {
  now = START;
  timers = [];
  FakeEventSource.instances = [];
  const fetches = [];
  const reloads = [];
  const logs = [];
  let resyncs = 0;

  const collections = {};
  for (const name of world.collections) {
    collections[name] = (params) => `collection ${name} ${stableStringify(params)}`;
  }
  const types = {};
  for (const [name, levels] of Object.entries(world.types)) {
    types[name] = { url: (id, level) => `item ${name}:${JSON.stringify(id)} ${level}`, levels };
  }
  const client = createVerityClient({
    clientId: world.client_id,
    fetchJson: async (url) => {
      fetches.push(url);
      return url.startsWith("collection ") ? { ids: [], count: 0 } : { title: url };
    },
    collections,
    types,
    reload: (hard) => reloads.push(hard ? "hard" : "soft"),
  });
  client.on("log", (entry) => logs.push(entry));
  client.on("resync", (event) => {
    if (event.phase === "done") resyncs += 1;
  });

  const given = vector.given ?? {};
  for (const c of given.collections ?? []) client.collection(c.name, c.params);
  for (const i of given.items ?? []) {
    for (const level of i.levels ?? ["default"]) {
      // A recently used item is one the page read; the others were only fetched.
      if (i.recent === false) client.fetchItem(i.name, i.id, level);
      else client.item(i.name, i.id, level);
    }
  }
  await quiesce(client);
  client.connect(world.audiences);
  const stream = FakeEventSource.instances.at(-1);
  stream.onopen?.();

  const observations = [];
  for (const step of vector.steps) {
    fetches.length = 0;
    reloads.length = 0;
    logs.length = 0;
    resyncs = 0;
    const before = client.seqs;
    if ("push" in step) {
      stream.onmessage({ data: JSON.stringify(step.push) });
    } else if ("pull" in step) {
      client.applyDirectives(step.pull, { via: "pull" });
    } else if ("wait_ms" in step) {
      now += step.wait_ms;
    } else {
      throw new Error(`unknown step ${JSON.stringify(step)}`);
    }
    await quiesce(client);
    observations.push({
      outcome: outcomeOf(step, logs, before, client.clientId),
      seqs: client.seqs,
      resync: resyncs > 0,
      directives: directivesOf(logs),
      fetches: [...fetches].sort(),
      reloads: [...reloads],
    });
  }
  client.disconnect();
  return { observations, stream_url: stream.url };
}

function outcomeOf(step, logs, before, clientId) {
  if ("wait_ms" in step) return "waited";
  const entry = logs.find((e) => e.type === "hello" || e.type === "directives");
  if (!entry) return logs.length ? `error: ${logs[0].detail}` : "nothing";
  if (entry.type === "hello") {
    const prev = before[entry.audience];
    if (entry.outcome === "gap") return "gap";
    if (prev === undefined) return "start";
    return entry.seq < prev ? "reset" : "current";
  }
  if (entry.outcome === "gap") return "gap";
  if (!entry.results) return entry.source === clientId ? "echo" : "seq-only";
  if (!entry.results.length) return step.pull ? "applied" : "seq-only";
  return entry.outcome === "applied" ? "applied" : "skipped";
}

function directivesOf(logs) {
  const entry = logs.find((e) => e.type === "directives");
  return (entry?.results ?? []).map((r) => RESULT_NAMES[r.outcome] ?? r.outcome);
}

// ------------------------------------------------------------------ main
const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (!line.trim()) continue;
  let answer;
  try {
    const { world, vector } = JSON.parse(line);
    answer = await runVector(world, vector);
  } catch (err) {
    answer = { error: String(err?.stack ?? err) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
