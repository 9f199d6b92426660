// The sandstream console: a page the API serves at /console that uses the API
// like any client. No framework and no build step: the DOM, fetch and SVG.
//
// A session's events are read with fetch rather than EventSource: fetch reads
// every event name (so event types added later show up, as generic blocks),
// sends the credential in a header (no token in a URL), and lets the console
// resume by itself with ?after=<last seq> after any drop, whatever the status.
// Finished turns are drawn from the session's stored history, the running turn
// from its events as they come; each event's seq is checked, so the transcript
// has no gap and no repeat.
"use strict";

const API = "/api/v1";
const KEY = "sandstream.credential";
const $ = (id) => document.getElementById(id);
const app = { key: sessionStorage.getItem(KEY) || "", me: null, view: null, poll: null };
window.sandstreamConsole = app;

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "className") node.className = value;
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function showError(problem) {
  const box = $("error");
  if (!problem) {
    box.hidden = true;
    return;
  }
  box.textContent = problem.code ? `${problem.code}: ${problem.detail}` : String(problem.detail || problem);
  box.hidden = false;
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${app.key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(API + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    parsed = { detail: text };
  }
  if (!response.ok) showError(parsed || { detail: response.statusText });
  if (response.status === 401) signOut();
  return { ok: response.ok, status: response.status, body: parsed, headers: response.headers };
}

function show(section) {
  for (const id of ["signin", "lists", "session", "ops"]) $(id).hidden = id !== section;
}

function signOut() {
  sessionStorage.removeItem(KEY);
  app.key = "";
  app.me = null;
  stopView();
  $("who").textContent = "";
  $("signout").hidden = true;
  $("nav-ops").hidden = true;
  show("signin");
}

function stopView() {
  if (app.view) app.view.stop();
  app.view = null;
  if (app.poll) clearInterval(app.poll);
  app.poll = null;
}

async function route() {
  stopView();
  if (!app.key) return show("signin");
  if (!app.me) {
    const me = await api("GET", "/whoami");
    if (!me.ok) return signOut();
    app.me = me.body;
    $("who").textContent =
      app.me.kind === "browser"
        ? `browser credential for one session (${app.me.scopes.join(", ")})`
        : `${app.me.tenant}${app.me.admin ? " (admin)" : ""}`;
    $("signout").hidden = false;
    $("nav-ops").hidden = !app.me.admin;
    $("nav-sandboxes").hidden = app.me.kind === "browser";
  }
  const hash = location.hash;
  let match = hash.match(/^#\/sessions\/([\w-]+)$/);
  if (app.me.kind === "browser" && (!match || match[1] !== app.me.session_id)) {
    location.hash = `#/sessions/${app.me.session_id}`;
    return;
  }
  if (match) {
    app.view = new SessionView(match[1]);
    return app.view.start();
  }
  if (hash === "#/ops" && app.me.admin) return openOps();
  match = hash.match(/^#\/sandboxes\/([\w-]+)$/);
  return openLists(match ? match[1] : null);
}

// ---- sandboxes and sessions ------------------------------------------------

async function fillList(list, more, path, item, cursor) {
  const query = cursor ? `&cursor=${encodeURIComponent(cursor)}` : "";
  const page = await api("GET", `${path}?limit=50${query}`);
  if (!page.ok) return;
  if (!cursor) list.replaceChildren();
  for (const entry of page.body) list.append(item(entry));
  const next = page.headers.get("x-next-cursor");
  more.hidden = !next;
  more.onclick = () => fillList(list, more, path, item, next);
}

async function openLists(sandboxId) {
  show("lists");
  $("sandbox-id").textContent = sandboxId || "";
  $("new-session").hidden = !sandboxId;
  await fillList($("sandboxes"), $("more-sandboxes"), "/sandboxes", (sandbox) =>
    el(
      "li",
      { className: sandbox.id === sandboxId ? "selected" : "", dataset: { id: sandbox.id } },
      el("a", { href: `#/sandboxes/${sandbox.id}`, className: "mono" }, sandbox.id),
      el("span", {}, sandbox.created_at),
    ),
  );
  if (!sandboxId) {
    $("sessions").replaceChildren(el("li", {}, "choose a sandbox"));
    $("more-sessions").hidden = true;
    return;
  }
  await fillList($("sessions"), $("more-sessions"), `/sandboxes/${sandboxId}/sessions`, (session) =>
    el(
      "li",
      { dataset: { id: session.id } },
      el("a", { href: `#/sessions/${session.id}`, className: "mono" }, session.id),
      el("span", { className: `badge ${session.state}` }, session.state),
      el("span", {}, session.updated_at),
    ),
  );
}

// ---- one session, live -------------------------------------------------------

function pre(text) {
  return el("pre", {}, text);
}

function toolUseBlock(name, id, input, open) {
  return el(
    "details",
    { className: "block tool_use", open, dataset: { type: "tool_use", id, name } },
    el("summary", {}, `tool call: ${name}`),
    pre(input === undefined ? "" : JSON.stringify(input, null, 2)),
  );
}

function toolResultBlock(toolUseId, content, isError, open) {
  const text = typeof content === "string" ? content : JSON.stringify(content, null, 2);
  return el(
    "details",
    {
      className: `block tool_result${isError ? " error" : ""}`,
      open,
      dataset: { type: "tool_result", toolUseId, isError: String(Boolean(isError)) },
    },
    el("summary", {}, isError ? "result (error)" : "result"),
    pre(text),
  );
}

function genericBlock(type, payload) {
  return el(
    "details",
    { className: "block event", dataset: { type } },
    el("summary", {}, type),
    pre(JSON.stringify(payload, null, 2)),
  );
}

// A tool call that awaits approval, with the buttons that decide it.
async function approvalDecision(view, event, decision) {
  const path = `/sessions/${view.sid}/approvals/${encodeURIComponent(event.tool_use_id)}`;
  const response = await api("POST", path, { decision });
  if (response.ok) showError(null);
}

function approvalBlock(event) {
  return el(
    "div",
    { className: "block approval", dataset: { type: "approval", toolUseId: event.tool_use_id } },
    el("div", {}, `${event.name} awaits approval (until ${event.expires_at})`),
    pre(JSON.stringify(event.input, null, 2)),
    el("button", { type: "button", dataset: { decision: "allow" } }, "Allow"),
    el("button", { type: "button", dataset: { decision: "deny" } }, "Deny"),
  );
}

function resolvedBlock(event) {
  const why = event.reason ? `: ${event.reason}` : "";
  return el(
    "div",
    { className: `block approval ${event.decision}`, dataset: { type: "approval", toolUseId: event.tool_use_id } },
    `${event.decision === "allow" ? "allowed" : "denied"} by ${event.decided_by}${why}`,
  );
}

function renderBlock(block) {
  switch (block.type) {
    case "text":
      return el("div", { className: "block text", dataset: { type: "text" } }, block.text);
    case "tool_use":
      return toolUseBlock(block.name, block.id, block.input, true);
    case "tool_result":
      return toolResultBlock(block.tool_use_id, block.content, block.is_error, block.content.length < 400);
    case "image":
      return el("img", {
        className: "block image",
        dataset: { type: "image" },
        src: `data:${block.media_type};base64,${block.data}`,
        alt: "image",
      });
    default:
      return genericBlock(block.type, block);
  }
}

function renderMessage(message) {
  return el(
    "div",
    { className: `msg ${message.role}`, dataset: { role: message.role, id: message.id } },
    el("div", { className: "role" }, message.role),
    ...message.content.map(renderBlock),
    message.stop_reason ? el("div", { className: "status" }, `turn ended: ${message.stop_reason}`) : null,
  );
}

class SessionView {
  constructor(sid) {
    this.sid = sid;
    this.lastSeq = 0;
    this.seqs = []; // every seq received, in order: the tests check it has no gap
    this.retryMs = 1000;
    this.done = new Set(); // turns whose assistant message is in the history
    this.live = null; // the running turn: { turnId, node, blocks: Map(index -> node) }
    this.chain = Promise.resolve();
    this.abort = new AbortController();
    this.closed = false;
  }

  async start() {
    show("session");
    $("session-id").textContent = this.sid;
    $("composer").onsubmit = (event) => {
      event.preventDefault();
      this.send();
    };
    $("interrupt").onclick = () => this.interrupt();
    await this.refresh();
    this.follow();
  }

  stop() {
    this.closed = true;
    this.abort.abort();
  }

  setState(state) {
    $("state").textContent = state;
    $("state").className = `badge ${state}`;
    $("send").disabled = state === "running" || state === "awaiting_approval";
  }

  setConnection(state) {
    $("conn").textContent = state;
    $("conn").className = `badge ${state}`;
    document.body.dataset.connection = state;
  }

  // The stored history, redrawn; the live turn's node stays after it.
  async refresh() {
    const response = await api("GET", `/sessions/${this.sid}`);
    if (!response.ok || this.closed) return;
    this.setState(response.body.state);
    const transcript = $("transcript");
    transcript.replaceChildren();
    for (const message of response.body.messages) {
      transcript.append(renderMessage(message));
      if (message.role === "assistant" && message.turn_id) this.done.add(message.turn_id);
    }
    if (this.live && !this.done.has(this.live.turnId)) transcript.append(this.live.node);
    else this.live = null;
    document.body.dataset.messages = String(response.body.messages.length);
  }

  async follow() {
    let backoff = 1000;
    while (!this.closed) {
      this.setConnection(this.seqs.length ? "reconnecting" : "connecting");
      try {
        const response = await fetch(`${API}/sessions/${this.sid}/stream?after=${this.lastSeq}`, {
          headers: { Authorization: `Bearer ${app.key}`, Accept: "text/event-stream" },
          signal: this.abort.signal,
          cache: "no-store",
        });
        if ([401, 403, 404].includes(response.status)) {
          // Nothing a retry would change: the credential or the session is gone.
          this.setConnection("closed");
          showError(await response.json().catch(() => ({ detail: response.statusText })));
          return;
        }
        if (response.ok) {
          this.setConnection("live");
          backoff = 1000;
          await this.read(response.body);
        }
      } catch (error) {
        if (this.closed) return;
      }
      if (this.closed) return;
      this.setConnection("reconnecting");
      await sleep(Math.max(this.retryMs, backoff) + Math.random() * 300);
      backoff = Math.min(backoff * 2, 15000);
    }
  }

  async read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        this.frame(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
      }
    }
  }

  frame(text) {
    let type = "message";
    const data = [];
    for (const line of text.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
      else if (field === "retry" && /^\d+$/.test(value)) this.retryMs = Number(value);
    }
    if (!data.length) return;
    let payload;
    try {
      payload = JSON.parse(data.join("\n"));
    } catch {
      payload = { raw: data.join("\n") };
    }
    if (typeof payload.seq === "number") {
      if (payload.seq <= this.lastSeq) return; // seen already
      this.lastSeq = payload.seq;
      this.seqs.push(payload.seq);
      $("seq").textContent = `seq ${payload.seq}`;
      document.body.dataset.lastSeq = String(payload.seq);
    }
    this.chain = this.chain.then(() => this.handle(type, payload)).catch((e) => console.error(e));
  }

  async handle(type, event) {
    if (type === "keepalive") {
      // The stream says where the session is: a turn shown as going on with no
      // live part, or events this page has not seen, mean the shown state may
      // be stale (a refresh that failed, a message lost): read it again.
      const shown = $("state").textContent;
      const stale = !this.live && shown === "running";
      if (stale || event.latest_seq > this.lastSeq) await this.refresh();
      return;
    }
    if (type === "reconnect" || type === "grant_expired") return;
    if (type === "log_truncated") return this.refresh();
    if (!event.turn_id || this.done.has(event.turn_id)) {
      if (!event.turn_id && typeof event.seq === "number") {
        $("transcript").append(genericBlock(type, event));
      }
      return;
    }
    if (!this.live || this.live.turnId !== event.turn_id) {
      await this.beginTurn(event.turn_id);
      if (!this.live) return; // it ended meanwhile: the history has it whole
    }
    const live = this.live;
    switch (type) {
      case "text_delta":
        this.textBlock(event.index).textContent += event.text;
        break;
      case "text_complete":
        this.textBlock(event.index).textContent = event.text;
        break;
      case "tool_use_start":
        this.place(event.index, toolUseBlock(event.name, event.id, undefined, true));
        break;
      case "tool_use_complete":
        this.place(event.index, toolUseBlock(event.name, event.id, event.input, true));
        break;
      case "tool_result":
        this.place(event.index, toolResultBlock(event.tool_use_id, event.content, event.is_error, true));
        break;
      case "tool_approval_requested": {
        const block = approvalBlock(event);
        for (const button of block.querySelectorAll("button")) {
          button.onclick = () => approvalDecision(this, event, button.dataset.decision);
        }
        live.node.append(block);
        this.setState("awaiting_approval");
        break;
      }
      case "tool_approval_resolved": {
        const waiting = [...live.node.querySelectorAll(".block.approval")].find(
          (node) => node.dataset.toolUseId === event.tool_use_id,
        );
        if (waiting) waiting.replaceWith(resolvedBlock(event));
        else live.node.append(resolvedBlock(event));
        if (!live.node.querySelector(".block.approval button")) this.setState("running");
        break;
      }
      case "session_completed":
      case "session_failed":
        this.done.add(event.turn_id);
        this.live = null;
        await this.refresh();
        if (type === "session_failed") showError(event.error);
        break;
      default:
        live.node.append(genericBlock(type, event));
    }
  }

  async beginTurn(turnId) {
    this.live = null;
    await this.refresh(); // brings in the user message that started the turn
    if (this.done.has(turnId)) return;
    const node = el(
      "div",
      { className: "msg assistant live", dataset: { role: "assistant", turnId } },
      el("div", { className: "role" }, "assistant (live)"),
    );
    this.live = { turnId, node, blocks: new Map() };
    this.setState("running");
    $("transcript").append(node);
  }

  place(index, node) {
    const blocks = this.live.blocks;
    const old = blocks.get(index);
    if (old) old.replaceWith(node);
    else this.live.node.append(node);
    blocks.set(index, node);
    return node;
  }

  textBlock(index) {
    const found = this.live.blocks.get(index);
    if (found) return found;
    return this.place(index, el("div", { className: "block text", dataset: { type: "text" } }));
  }

  async send() {
    const text = $("message").value.trim();
    if (!text) return;
    const response = await api("POST", `/sessions/${this.sid}/messages?wait=0`, {
      role: "user",
      content: [{ type: "text", text }],
    });
    if (response.ok) {
      $("message").value = "";
      showError(null);
      this.chain = this.chain.then(() => this.refresh());
    }
  }

  async interrupt() {
    const response = await api("POST", `/sessions/${this.sid}/interrupt`);
    if (response.ok) showError(null);
  }
}

// ---- queues and workers (admin keys) ----------------------------------------

const WINDOW_MS = 5 * 60 * 1000;

function drawChart(samples) {
  const svg = $("chart");
  const ns = "http://www.w3.org/2000/svg";
  const newest = samples[samples.length - 1].at;
  // The x axis grows with the samples, from one minute up to the whole window.
  const span = Math.min(WINDOW_MS, Math.max(60000, newest - samples[0].at));
  const top = Math.max(1, ...samples.flatMap((s) => [s.queued, s.running, s.rate]));
  const line = (name) => {
    const points = samples
      .map((s) => {
        const x = 600 - ((newest - s.at) / span) * 600;
        const y = 170 - (s[name] / top) * 160;
        return `${x.toFixed(1)},${y.toFixed(1)}`;
      })
      .join(" ");
    const polyline = document.createElementNS(ns, "polyline");
    polyline.setAttribute("points", points);
    polyline.setAttribute("class", name);
    return polyline;
  };
  $("chart-top").textContent = `top of the chart: ${top.toFixed(top < 10 ? 1 : 0)}`;
  svg.replaceChildren(line("queued"), line("running"), line("rate"));
  svg.dataset.samples = String(samples.length);
}

function row(...cells) {
  return el("tr", {}, ...cells.map((cell) => el("td", {}, String(cell))));
}

async function openOps() {
  show("ops");
  const samples = [];
  let previous = null;
  const tick = async () => {
    const [queues, workers] = await Promise.all([api("GET", "/ops/queues"), api("GET", "/ops/workers")]);
    if (!queues.ok || !workers.ok) return;
    const at = Date.now();
    const queue = queues.body[0];
    const turns = Object.values(queue.turns_last_hour).reduce((a, b) => a + b, 0);
    // Turns ended since the last sample, per minute (the hour's count can drop
    // when an old bucket leaves the window: never below zero).
    const rate = previous ? (Math.max(0, turns - previous.turns) * 60000) / (at - previous.at) : 0;
    previous = { turns, at };
    samples.push({ at, queued: queue.queued, running: queue.running_turns, rate });
    while (samples.length && at - samples[0].at > WINDOW_MS) samples.shift();
    $("queues").tBodies[0].replaceChildren(
      ...queues.body.map((q) =>
        row(q.name, q.queued, q.deferred, q.in_progress, q.oldest_queued_seconds.toFixed(1), q.running_turns, rate.toFixed(1)),
      ),
    );
    $("workers").tBodies[0].replaceChildren(
      ...workers.body.map((w) =>
        row(w.worker_id, w.host, w.pid, w.running_turns, w.seconds_since_heartbeat.toFixed(1)),
      ),
    );
    drawChart(samples);
  };
  await tick();
  app.poll = setInterval(tick, 2000);
}

// ---- start ------------------------------------------------------------------

$("signin").onsubmit = (event) => {
  event.preventDefault();
  app.key = $("key").value.trim();
  $("key").value = "";
  sessionStorage.setItem(KEY, app.key);
  showError(null);
  route();
};
$("signout").onclick = () => {
  signOut();
  location.hash = "#/";
};
$("new-sandbox").onclick = async () => {
  const created = await api("POST", "/sandboxes", {});
  if (created.ok) location.hash = `#/sandboxes/${created.body.id}`;
};
$("new-session").onclick = async () => {
  const sandboxId = $("sandbox-id").textContent;
  const created = await api("POST", `/sandboxes/${sandboxId}/sessions`, { metadata: {} });
  if (created.ok) location.hash = `#/sessions/${created.body.id}`;
};
window.addEventListener("hashchange", route);

// A tenant's backend can open the console for one session with a browser
// credential in the fragment (never sent to a server): /console/#credential=ssb_…
const handed = location.hash.match(/^#credential=([\w.~-]+)$/);
if (handed) {
  app.key = handed[1];
  sessionStorage.setItem(KEY, app.key);
  history.replaceState(null, "", location.pathname);
}
route();
