// HaloD dashboard (docs/halod.md, "The dashboard"). Plain ES module, no dependencies.
// Every value from the server is inserted with textContent or setAttribute, never as HTML.

const SVG = "http://www.w3.org/2000/svg";
const KEY_STORE = "halodOperatorKey"; // sessionStorage only: never a URL or a cookie
const STALE_MS = 3000;
const TIMELINE_MAX = 200;

const state = {
  snapshot: null,
  palette: [],
  routes: 0,
  summary: {},
  table: { version: null, owners: [], in_flight: {} },
  nodes: { nodes: [], totals: {}, live: true },
  incidents: new Map(), // id → incident
  movedAt: new Map(), // route → {t, from}
  operatorRequired: false,
  leaders: new Set(), // status addresses of leaders seen
  lastMessage: 0,
  downSince: null,
  selected: null,
};

// For tests and the curious: what the page has applied, and when (Date.now()).
const hd = (window.haloDashboard = {
  appliedVersion: null,
  appliedAt: {},
  nodes: [],
  incidents: [],
  state,
});

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = String(v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

// -- formatting ---------------------------------------------------------------------------

const fmtInt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
function fmtRate(n) {
  if (n === null || n === undefined) return "–";
  return n >= 100 ? Math.round(n).toLocaleString("en-US") : n.toFixed(1);
}
const fmtMs = (n) => (n === null || n === undefined ? "–" : `${n >= 1000 ? (n / 1000).toFixed(1) + " s" : n + " ms"}`);
function fmtDur(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  return `${s.toFixed(s < 10 ? 2 : 1)} s`;
}
function fmtTime(t, ms) {
  if (t === null || t === undefined) return "–";
  const d = new Date(t * 1000);
  const s = d.toISOString().slice(11, ms ? 23 : 19);
  return s;
}
function fmtAgo(seconds) {
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}

// -- colours ------------------------------------------------------------------------------

function nodeIds() {
  const ids = new Map();
  for (const n of state.nodes.nodes) if (n.id !== null && n.id !== undefined) ids.set(n.name, n.id);
  return ids;
}
function colourOf(name, ids) {
  if (name === null || name === undefined) return null;
  const id = ids.get(name);
  if (id === undefined || !state.palette.length) return "#bbbbbb";
  return state.palette[(id - 1) % state.palette.length];
}

// -- the route map -------------------------------------------------------------------------

let cells = []; // index route - 1 → rect
let mapRoutes = 0;

function buildMap() {
  const n = state.routes;
  const box = $("map");
  box.textContent = "";
  cells = [];
  mapRoutes = n;
  if (!n) return;
  const width = 1000;
  let cols, size, labels;
  if (n <= 64) {
    cols = n;
    size = Math.min(44, Math.floor(width / n));
    labels = true;
  } else {
    cols = Math.ceil(Math.sqrt(4 * n)); // about 4:1, so the map stays a band on a laptop screen
    size = Math.max(4, Math.min(40, Math.floor(width / cols)));
    labels = false;
  }
  const rows = Math.ceil(n / cols);
  const pad = 2;
  const w = cols * size + pad * 2;
  const h = rows * size + pad * 2 + (labels ? 14 : 0);
  const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, role: "img", "aria-label": `${n} routes` });
  for (let r = 1; r <= n; r++) {
    const i = r - 1;
    const x = pad + (i % cols) * size;
    const y = pad + Math.floor(i / cols) * size;
    const rect = svg("rect", {
      class: "cell none", x: x + 1, y: y + 1, width: size - 2, height: size - 2, rx: 2,
      "data-route": r,
    });
    root.append(rect);
    cells.push(rect);
    if (labels && (n <= 32 || r % 2 === 1 || r === n)) {
      const t = svg("text", { x: x + size / 2, y: rows * size + pad + 11 });
      t.textContent = String(r);
      root.append(t);
    }
  }
  root.addEventListener("mousemove", onMapHover);
  root.addEventListener("mouseleave", () => ($("tip").hidden = true));
  box.append(root);
  $("map-note").textContent = `${n} routes · colour = owner`;
}

function paintMap(flash) {
  if (mapRoutes !== state.routes) buildMap();
  const ids = nodeIds();
  const owners = state.table.owners || [];
  const flying = state.table.in_flight || {};
  for (let i = 0; i < cells.length; i++) {
    const rect = cells[i];
    const owner = owners[i] ?? null;
    const before = rect.getAttribute("data-owner");
    const now = owner === null ? "" : owner;
    if (before !== null && before !== now && flash) {
      state.movedAt.set(i + 1, { t: Date.now(), from: before || null });
      rect.classList.remove("flash");
      void rect.getBoundingClientRect(); // restart the animation
      rect.classList.add("flash");
      setTimeout(() => rect.classList.remove("flash"), 950);
    }
    rect.setAttribute("data-owner", now);
    const colour = colourOf(owner, ids);
    if (colour) {
      rect.setAttribute("fill", colour);
      rect.classList.remove("none");
    } else {
      rect.removeAttribute("fill");
      rect.classList.add("none");
    }
    const inFlight = String(i + 1) in flying;
    rect.classList.toggle("flight", inFlight);
    if (inFlight) rect.setAttribute("data-in-flight", "1");
    else rect.removeAttribute("data-in-flight");
  }
  paintLegend(ids);
  highlight();
}

function paintLegend(ids) {
  const counts = new Map();
  let unowned = 0;
  for (const o of state.table.owners || []) {
    if (o === null) unowned++;
    else counts.set(o, (counts.get(o) || 0) + 1);
  }
  const legend = $("legend");
  legend.textContent = "";
  const names = [...counts.keys()].sort((a, b) => (ids.get(a) ?? 1e9) - (ids.get(b) ?? 1e9));
  for (const name of names) {
    const sw = el("span", { class: "swatch" });
    sw.style.background = colourOf(name, ids);
    legend.append(el("span", { "data-legend": name }, sw, `${name} · ${counts.get(name)}`));
  }
  if (unowned) legend.append(el("span", {}, el("span", { class: "swatch" }), `no owner · ${unowned}`));
  const moving = (state.summary.moving || []).length;
  if (moving) legend.append(el("span", { class: "note", text: `${moving} route${moving > 1 ? "s" : ""} waiting to move (paced)` }));
  const flying = Object.keys(state.table.in_flight || {}).length;
  if (flying) legend.append(el("span", { class: "note" }, `${flying} hand-off${flying > 1 ? "s" : ""} in flight`));
}

function onMapHover(event) {
  const route = Number(event.target.getAttribute && event.target.getAttribute("data-route"));
  const tip = $("tip");
  if (!route) {
    tip.hidden = true;
    return;
  }
  const owner = state.table.owners[route - 1] ?? null;
  const lines = [`route ${route}`, `owner ${owner ?? "none"}`];
  const node = state.nodes.nodes.find((n) => n.name === owner);
  if (node && node.routes && node.routes[String(route)] !== undefined) {
    lines.push(`${fmtInt(node.routes[String(route)])} connections (node-reported)`);
  }
  const waiting = (state.summary.moving || []).find((m) => m.route === route);
  if (waiting) lines.push(`moves to ${waiting.to ?? "no node"} in a later step (paced)`);
  const since = (state.table.in_flight || {})[String(route)];
  if (since !== undefined) lines.push(`hand-off in flight since ${fmtTime(since)}`);
  const moved = state.movedAt.get(route);
  if (moved) lines.push(`moved ${fmtAgo((Date.now() - moved.t) / 1000)}${moved.from ? " from " + moved.from : ""}`);
  tip.textContent = lines.join("\n");
  tip.hidden = false;
  tip.style.left = `${event.clientX + 14}px`;
  tip.style.top = `${event.clientY + 14}px`;
}

function highlight() {
  const inc = state.selected !== null ? state.incidents.get(state.selected) : null;
  const routes = new Set(inc ? inc.moves.map((m) => m.route) : []);
  for (let i = 0; i < cells.length; i++) {
    cells[i].classList.toggle("hl", routes.has(i + 1));
    cells[i].classList.toggle("dim", routes.size > 0 && !routes.has(i + 1));
  }
}

// -- header, banners, warnings --------------------------------------------------------------

function paintHeader() {
  const s = state.summary;
  const snap = state.snapshot || {};
  const me = (snap.halod && snap.halod.name) || "";
  const role = s.role || "solo";
  const leader = s.leader ? s.leader.name : role === "solo" ? me || "this HaloD" : "none";
  const parts = [role === "leader" || role === "solo" ? `${role}${me ? " " + me : ""}` : `${role} · leader ${leader}`];
  parts.push(`table v${s.table_version ?? "–"}`, `${s.routes ?? state.routes} routes`, `policy ${s.policy ?? "–"}`);
  $("headline").textContent = parts.join(" · ");
  const chip = $("spare-chip");
  if (s.spares_wanted !== undefined && s.spares_wanted !== null) {
    chip.hidden = false;
    chip.textContent = `spares ${s.spares} of ${s.spares_wanted}`;
    chip.className = "chip " + (s.spares >= s.spares_wanted ? "ok" : "warn");
  }
  setFigure("f-failovers", s.failovers, fmtInt(s.failovers));

  const warnings = $("warnings");
  warnings.textContent = "";
  for (const w of s.warnings || []) warnings.append(el("div", { class: "warning", text: w }));

  const banners = $("banners");
  banners.textContent = "";
  if (s.leader && s.leader.status) state.leaders.add(s.leader.status);
  if (role === "follower") {
    const b = el("div", { class: "banner" }, "this HaloD follows; live figures are on the leader");
    if (s.leader && s.leader.status) {
      b.append(": ", el("a", { href: `http://${s.leader.status}/dashboard`, text: `${s.leader.name} (${s.leader.status})` }));
    }
    banners.append(b);
  } else if (role === "candidate") {
    const etcd = s.etcd && s.etcd.endpoints ? s.etcd.endpoints.map((e) => `${e.url} ${e.healthy ? "up" : "down"}`).join(", ") : "";
    banners.append(el("div", { class: "banner bad", text: `no HaloD leads${etcd ? " (etcd: " + etcd + ")" : ""}; the table is as the last copy had it` }));
  }
  if (state.downSince !== null) {
    const b = el("div", { class: "banner bad" }, `HaloD unreachable since ${fmtTime(state.downSince / 1000)} UTC`);
    const others = [...state.leaders].filter((a) => a !== location.host);
    if (others.length) {
      b.append(" · try ");
      others.forEach((a, i) => {
        if (i) b.append(", ");
        b.append(el("a", { href: `http://${a}/dashboard`, text: a }));
      });
    }
    banners.append(b);
  }
}

function setFigure(id, value, text) {
  const node = $(id);
  node.textContent = text;
  node.setAttribute("data-value", value === null || value === undefined ? "" : String(value));
}

function paintTotals() {
  const t = state.nodes.totals || {};
  setFigure("f-connections", t.connections, fmtInt(t.connections));
  setFigure("f-lingering", t.lingering, fmtInt(t.lingering));
  setFigure("f-events", t.events_per_s, fmtRate(t.events_per_s));
  setFigure("f-deliveries", t.deliveries_per_s, fmtRate(t.deliveries_per_s));
  setFigure("f-ack50", t.ack_p50_ms, fmtMs(t.ack_p50_ms));
  setFigure("f-ack99", t.ack_p99_ms, fmtMs(t.ack_p99_ms));
}

// -- nodes ----------------------------------------------------------------------------------

function spark(points) {
  const root = svg("svg", { class: "spark", viewBox: "0 0 120 22", preserveAspectRatio: "none" });
  if (!points || points.length < 2) return root;
  const max = Math.max(1, ...points);
  const step = 120 / (points.length - 1);
  const coords = points.map((v, i) => `${(i * step).toFixed(1)},${(21 - (v / max) * 20).toFixed(1)}`);
  root.append(svg("polyline", { points: coords.join(" ") }));
  return root;
}

function operatorKey() {
  try {
    return sessionStorage.getItem(KEY_STORE);
  } catch {
    return null;
  }
}

function nodeActions(n, previous) {
  const allowed = state.operatorRequired && operatorKey() && state.nodes.live;
  const action = n.state === "drained" ? "undrain" : "drain";
  const key = allowed ? action : "";
  // The same cell as before when nothing changed: a click in progress is not lost to the
  // repaint of the row every second.
  const old = previous.get(n.name);
  if (old && old.getAttribute("data-key") === key) return old;
  const td = el("td", { class: "actions-col", "data-key": key });
  if (!allowed) return td;
  const button = el("button", { class: action === "drain" ? "danger" : "", "data-action": action, "data-node": n.name, text: action === "drain" ? "Drain" : "Undrain" });
  button.addEventListener("click", () => operate(action, n.name));
  td.append(button);
  return td;
}

function paintNodes() {
  const ids = nodeIds();
  const body = $("nodes-body");
  const previous = new Map();
  for (const tr of body.querySelectorAll("tr[data-node]")) previous.set(tr.getAttribute("data-node"), tr.querySelector("td.actions-col"));
  body.textContent = "";
  for (const n of state.nodes.nodes) {
    const suspect = n.suspected ? `${n.suspected.cause}${n.suspected.probe ? " · probe " + n.suspected.probe : ""}` : "";
    const live = state.nodes.live; // a follower knows the table, not the connections
    const badge = el("span", { class: `badge ${n.suspected ? "suspect" : n.state}`, text: n.connected || !live ? n.state : `${n.state} · away` });
    const sw = el("span", { class: "swatch" });
    const colour = colourOf(n.name, ids);
    if (n.id !== null && n.id !== undefined) sw.style.background = colour;
    const conns = el("td", { class: "num", "data-field": "connections", "data-value": n.connections ?? "", text: fmtInt(n.connections) });
    if (n.capacity && n.connections !== null && n.connections !== undefined) {
      const share = Math.min(1, n.connections / n.capacity);
      const bar = el("span", { class: `bar${share > 0.8 ? " high" : ""}`, title: `${Math.round(share * 100)} % of capacity ${fmtInt(n.capacity)}` });
      const fill = el("i");
      fill.style.width = `${Math.max(2, share * 100)}%`;
      bar.append(fill);
      conns.append(bar);
    }
    const ack = n.ack_p50_ms === null || n.ack_p50_ms === undefined ? "–" : `${fmtMs(n.ack_p50_ms)} / ${fmtMs(n.ack_p99_ms)}`;
    let beat = "–";
    if (live && n.connected && n.heartbeat_age !== null && n.heartbeat_age !== undefined) beat = `${n.heartbeat_age.toFixed(1)} s`;
    else if (live && !n.connected) beat = `away ${n.disconnected_for ?? "?"} s`;
    const tr = el(
      "tr",
      { "data-node": n.name, "data-state": n.state },
      el("td", {}, badge),
      el("td", {}, sw, " ", el("b", { text: n.name }), el("span", { class: "idtag", text: n.id !== null && n.id !== undefined ? `#${n.id}` : "" })),
      el("td", { class: "mono", "data-field": "routes", text: n.ranges || "–", title: `${n.routes_count} routes: ${n.ranges || "none"}` }),
      conns,
      el("td", { class: "num", "data-field": "lingering", text: fmtInt(n.lingering) }),
      el("td", { class: "num", "data-field": "events_per_s", text: fmtRate(n.events_per_s) }),
      el("td", {}, spark(n.spark)),
      el("td", { class: "num", "data-field": "ack", text: ack }),
      el("td", { class: "num", text: beat }),
      el("td", { text: suspect }),
      nodeActions(n, previous),
    );
    body.append(tr);
  }
  const failed = $("failed-body");
  failed.textContent = "";
  for (const f of (state.summary.failed || []).slice().reverse()) {
    if (state.nodes.nodes.some((n) => n.name === f.name)) continue; // it came back
    failed.append(
      el(
        "tr",
        { "data-node": f.name, "data-state": "failed" },
        el("td", {}, el("span", { class: "badge failed", text: "failed" })),
        el("td", {}, el("b", { text: f.name })),
        el("td", { colspan: 9, text: `${f.why} · ${fmtTime(f.at)} UTC` }),
      ),
    );
  }
  paintOperator();
}

let operatorMode = null;

function paintOperator() {
  // Rebuilt only when what it shows changes: a key being typed survives the pushes.
  const mode = !state.nodes.live ? "follower" : !state.operatorRequired ? "cli" : operatorKey() ? "entered" : "ask";
  if (mode === operatorMode) return;
  operatorMode = mode;
  const box = $("operator");
  box.textContent = "";
  if (!state.nodes.live) {
    box.append("read-only: operator actions go to the leader");
  } else if (!state.operatorRequired) {
    box.append("operator actions: use the CLI, halod drain NAME / halod undrain NAME and orbited trace (no operator key configured)");
  } else if (operatorKey()) {
    const forget = el("button", { text: "Forget key" });
    forget.addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORE);
      paintNodes();
    });
    box.append("operator key entered (this tab only)", forget);
  } else {
    const input = el("input", { type: "password", name: "operator_key", placeholder: "operator key", autocomplete: "off" });
    const use = el("button", { type: "submit", text: "Use key", "data-action": "key" });
    const form = el("form", { class: "operator" }, input, use);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      if (input.value) {
        sessionStorage.setItem(KEY_STORE, input.value.trim());
        paintNodes();
      }
    });
    box.append(form);
  }
}

function toast(text, bad) {
  const t = $("toast");
  t.textContent = text;
  t.className = "toast" + (bad ? " bad" : "");
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.hidden = true), 4000);
}

function authHeaders() {
  const key = operatorKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function operate(action, name) {
  if (!confirm(`${action} ${name}?`)) return;
  try {
    const r = await fetch(`/nodes/${encodeURIComponent(name)}/${action}`, { method: "POST", headers: authHeaders(), cache: "no-store" });
    const body = await r.json().catch(() => ({}));
    if (r.ok) toast(`${name}: ${body.state || action}`);
    else {
      if (r.status === 401) sessionStorage.removeItem(KEY_STORE);
      toast(`${action} ${name}: ${(body.error && body.error.message) || r.status}`, true);
      paintNodes();
    }
  } catch (e) {
    toast(`${action} ${name}: ${e}`, true);
  }
}

// -- timeline -------------------------------------------------------------------------------

const ICON = { failover: "!", drain: "D", undrain: "U", join: "+", spare: "S", leave: "−", lead: "L", follow: "F", table: "T", readdress: "A", rehash: "H" };

function routesText(routes) {
  const sorted = [...new Set(routes)].sort((a, b) => a - b);
  const out = [];
  for (let i = 0; i < sorted.length; i++) {
    let j = i;
    while (j + 1 < sorted.length && sorted[j + 1] === sorted[j] + 1) j++;
    out.push(j > i ? `${sorted[i]}-${sorted[j]}` : String(sorted[i]));
    i = j;
  }
  return out.join(",");
}

function sentence(inc) {
  const byNew = new Map();
  for (const m of inc.moves || []) {
    const to = m.new ?? "no owner";
    if (!byNew.has(to)) byNew.set(to, []);
    byNew.get(to).push(m.route);
  }
  const moves = [...byNew.entries()].map(([to, rs]) => `routes ${routesText(rs)} to ${to}`).join("; ");
  const verb = {
    failover: `${inc.node} failed (${inc.reason})`, drain: `${inc.node} drained`, undrain: `${inc.node} undrained`,
    join: `${inc.node} joined`, spare: `${inc.node} joined as a spare`, leave: `${inc.node} left`,
    lead: `${inc.node || "this HaloD"} leads (${inc.reason})`, follow: `${inc.node || "this HaloD"} follows (${inc.reason})`,
    table: `table changed${inc.node ? " (" + inc.node + ")" : ""}`, readdress: `${inc.node} has new addresses`,
    rehash: `rehash: ${inc.reason}`,
  }[inc.kind] || `${inc.kind} ${inc.node}`;
  return moves ? `${verb} → ${moves}` : verb;
}

function phases(inc) {
  const out = [];
  if (inc.detect_s !== null && ["failover", "leave"].includes(inc.kind)) out.push(`detected ${fmtDur(inc.detect_s)}`);
  if (inc.detect_s !== null && ["drain", "undrain"].includes(inc.kind)) out.push(`decided ${fmtDur(inc.detect_s)}`);
  if ((inc.moves || []).some((m) => m.handoff)) out.push(`hand-off ${fmtDur(inc.handoff_s)}${inc.mailboxes_handed ? " · " + fmtInt(inc.mailboxes_handed) + " mailboxes" : ""}`);
  if (inc.browsers_moved) out.push(`${fmtInt(inc.browsers_back ?? 0)} of ${fmtInt(inc.browsers_moved)} browsers back${inc.back_s !== null ? " in " + fmtDur(inc.back_s) : ""}`);
  if (!inc.open && inc.settled === false) out.push("not settled in time");
  if (inc.table_version !== null && inc.table_version !== undefined) out.push(`v${inc.table_version}`);
  return out.join(" · ");
}

function paintTimeline() {
  const list = $("timeline");
  list.textContent = "";
  const all = [...state.incidents.values()].sort((a, b) => b.id - a.id).slice(0, TIMELINE_MAX);
  for (const inc of all) {
    const what = el("span", { class: "what", text: sentence(inc) });
    if (inc.open) what.append(el("span", { class: "spinner", title: "in progress" }));
    const li = el(
      "li",
      { "data-incident": inc.id, "data-kind": inc.kind, "data-open": inc.open ? "true" : "false", class: state.selected === inc.id ? "selected" : "" },
      el("span", { class: `icon k-${inc.kind}`, text: ICON[inc.kind] || "?" }),
      what,
      el("span", { class: "when", text: `${fmtTime(inc.first_sign, true)} UTC · #${inc.id}` }),
      el("span", { class: "phases", text: phases(inc) }),
    );
    li.addEventListener("click", () => {
      state.selected = state.selected === inc.id ? null : inc.id;
      paintTimeline();
      highlight();
    });
    list.append(li);
  }
  $("timeline-note").textContent = all.length ? `${all.length} events` : "nothing yet";
  hd.incidents = all;
}

// -- trace ----------------------------------------------------------------------------------

function traceRow(r) {
  const rel = (t) => (t === null || t === undefined ? "–" : `+${Math.max(0, Math.round((t - r.t) * 1000))}ms`);
  const written = r.written === null || r.written === undefined ? "–" : `${rel(r.written)} ${r.transport || ""}${r.rewritten ? " (replay)" : ""}`;
  return el(
    "tr",
    {},
    el("td", { text: fmtTime(r.t, true) }),
    el("td", { text: r.node ?? "" }),
    el("td", { text: r.event ?? "" }),
    el("td", { text: (r.request || "").slice(0, 8) }),
    el("td", { text: r.status ?? "" }),
    el("td", { text: r.seq ?? "–" }),
    el("td", { text: written }),
    el("td", { text: r.acked ? rel(r.acked) : r.outcome || "–" }),
    el("td", { text: r.handed ? r.handed.replace("out:", "handed out to ").replace("in:", "handed in from ") : "" }),
  );
}

function renderTrace(answer) {
  const out = $("trace-out");
  out.textContent = "";
  const asked = answer.asked || [];
  out.append(el("p", { class: "note", text: `asked ${asked.length} node${asked.length === 1 ? "" : "s"} (${asked.join(", ")}); answered ${(answer.answered || []).length}` }));
  for (const m of answer.missing || []) out.append(el("p", { class: "missing", text: `${m.name}: ${m.why}` }));
  const cut = answer.truncated || [];
  if (cut.length) out.append(el("p", { class: "missing", text: `answers of ${cut.join(", ")} were cut to fit: their oldest records are left out` }));
  for (const f of answer.failed_nodes || []) out.append(el("p", { class: "missing", text: `records of ${f.name} (failed ${fmtTime(f.at)} UTC, ${f.why}) are lost with its process` }));
  for (const v of answer.verdicts || []) {
    const who = v.key ? ` → ${JSON.stringify(v.key)}` : "";
    out.append(el("div", { class: "verdict", "data-event": v.event ?? "", text: `event ${v.event ?? "(any)"}${who}: ${v.text}` }));
  }
  for (const k of answer.keys || []) {
    const head = el("h3", { text: `${JSON.stringify(k.key)} · route ${k.route ?? "?"} · now on ${k.owner_now ?? "no node"}` });
    const table = el("table", {}, el("thead", {}, el("tr", {}, ...["time", "node", "event", "request", "status", "seq", "written", "acked", "note"].map((h) => el("th", { text: h })))));
    const tbody = el("tbody");
    for (const r of k.dispatches || []) tbody.append(traceRow(r));
    table.append(tbody);
    const notes = (k.notes || []).map((n) => `${fmtTime(n.t, true)} ${n.node || ""} ${n.what}`.trim()).join(" · ");
    out.append(el("div", { class: "trace-key" }, head, el("div", { class: "scroll" }, table), notes ? el("p", { class: "note", text: notes }) : null));
  }
  for (const inc of answer.incidents || []) out.append(el("p", { class: "note", text: `incident ${inc.id}: ${sentence(inc)} · ${phases(inc)}` }));
  if (!(answer.keys || []).length && !(answer.verdicts || []).length) out.append(el("p", { text: "no node has a record for this query" }));
}

async function trace(event) {
  event.preventDefault();
  const form = event.target;
  const params = new URLSearchParams();
  for (const name of ["user", "session", "location", "event"]) {
    const v = form.elements[name].value.trim();
    if (v) params.set(name, v);
  }
  const out = $("trace-out");
  if (state.operatorRequired && !operatorKey()) {
    out.textContent = "";
    out.append(el("p", { class: "missing", text: "enter the operator key (Nodes, top right) to trace" }));
    return;
  }
  out.textContent = "tracing…";
  try {
    const r = await fetch(`/trace?${params}`, { headers: authHeaders(), cache: "no-store" });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) {
      out.textContent = "";
      let text = (body.error && body.error.message) || `HTTP ${r.status}`;
      if (r.status === 403 && !state.operatorRequired) text += " (without an operator key, use `orbited trace`)";
      out.append(el("p", { class: "missing", text }));
      return;
    }
    renderTrace(body);
  } catch (e) {
    out.textContent = String(e);
  }
}

// -- applying the feed ------------------------------------------------------------------------

function applyTable(table) {
  state.table = table;
  paintMap(true);
  const v = table.version;
  if (v !== null && v !== undefined) {
    if (!(v in hd.appliedAt)) hd.appliedAt[v] = Date.now();
    hd.appliedVersion = v;
    document.body.dataset.tableVersion = String(v);
  }
}

function applyNodes(nodes) {
  // A node's `routes` come only when they changed: keep the ones the page has.
  const before = new Map(state.nodes.nodes.map((n) => [n.name, n.routes]));
  for (const n of nodes.nodes) if (n.routes === undefined) n.routes = before.get(n.name) || {};
  state.nodes = nodes;
  hd.nodes = nodes.nodes;
  paintTotals();
  paintNodes();
}

function applyIncident(inc) {
  state.incidents.set(inc.id, inc);
  if (state.incidents.size > TIMELINE_MAX) {
    const oldest = Math.min(...state.incidents.keys());
    state.incidents.delete(oldest);
  }
}

function paintTracePanel() {
  const form = $("trace-form");
  const note = $("trace-note");
  const open = state.operatorRequired && state.nodes.live;
  form.hidden = !open;
  note.hidden = open;
  note.textContent = !state.nodes.live
    ? "this HaloD follows: trace on the leader's dashboard"
    : "tracing from this page needs an operator key (operator_key_file); use orbited trace --user … --event …";
}

function applySnapshot(snap) {
  state.snapshot = snap;
  state.palette = snap.palette || [];
  state.routes = snap.routes || 0;
  state.operatorRequired = !!(snap.operator && snap.operator.required);
  state.summary = snap.summary || {};
  state.incidents = new Map();
  for (const inc of snap.timeline || []) state.incidents.set(inc.id, inc);
  state.nodes = snap.nodes;
  hd.nodes = snap.nodes.nodes;
  paintHeader();
  paintTotals();
  paintNodes();
  applyTable(snap.table);
  paintTimeline();
  paintTracePanel();
}

function onMessage(kind, handler) {
  return (event) => {
    state.lastMessage = Date.now();
    if (state.downSince !== null) {
      state.downSince = null;
      paintHeader();
    }
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    handler(data);
  };
}

function connect() {
  const source = new EventSource("/dashboard/events");
  source.addEventListener("snapshot", onMessage("snapshot", applySnapshot));
  source.addEventListener("table", onMessage("table", applyTable));
  source.addEventListener("nodes", onMessage("nodes", applyNodes));
  source.addEventListener("summary", onMessage("summary", (s) => {
    state.summary = s;
    paintHeader();
    paintNodes();
    paintMap(false);
  }));
  source.addEventListener("incident", onMessage("incident", (inc) => {
    applyIncident(inc);
    paintTimeline();
    highlight();
  }));
  source.addEventListener("open", () => (state.lastMessage = Date.now()));
  return source;
}

function watch() {
  const stream = $("stream");
  const text = $("stream-text");
  const quiet = Date.now() - state.lastMessage;
  if (!state.lastMessage) {
    text.textContent = "connecting";
  } else if (quiet > STALE_MS) {
    stream.className = "stream stale";
    text.textContent = `stale ${Math.round(quiet / 1000)} s`;
    if (state.downSince === null) {
      state.downSince = state.lastMessage;
      paintHeader();
    }
  } else {
    stream.className = "stream live";
    text.textContent = "live";
  }
}

function start() {
  $("trace-form").addEventListener("submit", trace);
  connect();
  setInterval(watch, 500);
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
