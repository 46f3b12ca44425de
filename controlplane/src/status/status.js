// uturn status page. Reads /status.json every second and /sessions and /timeline every five
// seconds from the admin endpoint it was served by. Everything shown is set with textContent
// (user names and addresses come from clients). With an admin token, the token comes from the
// URL fragment (#token=T: never sent to the server), is kept in this tab's sessionStorage and
// sent as "Authorization: Bearer T".
"use strict";

const SVG = "http" + "://www.w3.org/2000/svg";
const TOKEN_KEY = "uturn-admin-token";
const STATUS_EVERY_MS = 1000;
const SESSIONS_EVERY_MS = 5000;
const MAX_ROWS = 200;

const state = { expanded: new Set(), sessions: [], timeline: new Map(), untracked: 0, gotStatus: false, gotSessions: false };

const MEANING = {
  300: "try alternate (draining)", 400: "bad request", 401: "unauthenticated", 403: "forbidden (peer policy)",
  420: "unknown attribute", 437: "allocation mismatch", 438: "stale nonce", 440: "address family not supported",
  441: "wrong credentials", 442: "unsupported transport", 443: "peer address family mismatch",
  486: "allocation quota reached", 500: "server error", 508: "insufficient capacity", other: "other codes",
};

function takeTokenFromFragment() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

class Unauthorized extends Error {}

async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const r = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
  if (r.status === 401) throw new Unauthorized(path);
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

// ---- formatting -------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

const count = (n) => Number(n).toLocaleString("en-US");

function unit(n, units, base) {
  let i = 0;
  n = Number(n);
  while (Math.abs(n) >= base && i < units.length - 1) { n /= base; i++; }
  return (i === 0 ? String(Math.round(n)) : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)) + " " + units[i];
}
const bytes = (n) => unit(n, ["B", "kB", "MB", "GB", "TB"], 1000);
const bits = (n) => unit(n, ["bit/s", "kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"], 1000);
const pps = (n) => unit(n, ["pkt/s", "k pkt/s", "M pkt/s"], 1000);

function duration(s) {
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  const h = Math.floor(s / 3600);
  if (h < 48) return h + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(h / 24) + " d " + (h % 24) + " h";
}

const ms = (t) => (t < 1000 ? "+" + t + " ms" : "+" + (t / 1000).toFixed(t < 10000 ? 2 : 1) + " s");

// ---- the node, counts, refusals, drops ----------------------------------------------------

function setMetric(name, value, text) {
  for (const e of document.querySelectorAll('[data-metric="' + name + '"]')) {
    e.dataset.value = String(value);
    e.textContent = text === undefined ? count(value) : text;
  }
}

function renderStatus(s) {
  document.getElementById("version").textContent = s.version;
  const pill = document.getElementById("state");
  pill.textContent = s.node.draining ? "draining" : "serving";
  pill.className = "pill " + (s.node.draining ? "bad" : "ok");
  const node = document.getElementById("node");
  const rows = [
    ["version", s.version], ["uptime", duration(s.uptime_s)], ["workers", s.node.workers],
    ["I/O backend", s.node.backend], ["XDP fast path", s.node.xdp],
    ["listeners", s.node.listeners.join("  ")], ["relay IPs", s.node.relay_ips.join("  ")],
    ["relay ports", s.node.port_range[0] + "–" + s.node.port_range[1]], ["realm", s.node.realm],
  ];
  node.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-node": k }, v)]));
  const t = s.totals;
  for (const k of ["allocations", "permissions", "channels", "connections", "packets_to_peer", "packets_to_client",
                   "allocations_granted", "allocations_expired"]) setMetric(k, t[k]);
  setMetric("bytes_to_peer", t.bytes_to_peer, bytes(t.bytes_to_peer));
  setMetric("bytes_to_client", t.bytes_to_client, bytes(t.bytes_to_client));
  renderCharts(s.series);
  const refusals = [];
  for (const [code, n] of Object.entries(s.refusals.allocate)) {
    refusals.push(["allocate_" + code, "Allocate " + (code === "other" ? "" : code + " ") + (MEANING[code] || ""), n]);
  }
  for (const [outcome, n] of Object.entries(s.refusals.auth)) {
    if (outcome !== "ok") refusals.push(["auth_" + outcome, "authentication: " + outcome.replace(/_/g, " "), n]);
  }
  refusals.push(["capacity", "CreatePermission/ChannelBind 508 (per-allocation caps)", s.refusals.capacity]);
  refusals.push(["connections_refused", "TCP/TLS connections refused", s.refusals.connections_refused]);
  renderReasons("refusals", refusals);
  renderReasons("drops", Object.entries(s.drops).map(([r, n]) => [r, r.replace(/_/g, " "), n]));
}

const openDetails = new Set();

/** A table of reason → count: the non-zero ones, largest first, then a line for the zeros. */
function renderReasons(id, rows) {
  const table = document.getElementById(id);
  const nonzero = rows.filter((r) => r[2] > 0).sort((a, b) => b[2] - a[2]);
  const zeros = rows.filter((r) => r[2] === 0);
  const trs = nonzero.map(([key, label, n]) =>
    el("tr", { "data-reason": key }, el("td", {}, label), el("td", { "data-value": n }, count(n))));
  if (!nonzero.length) trs.push(el("tr", {}, el("td", { colspan: 2 }, "none")));
  if (zeros.length) {
    const open = openDetails.has(id);
    const details = el("details", open ? { open: "" } : {}, el("summary", {}, zeros.length + " more at 0"),
      zeros.map((r) => r[1]).join(", "));
    details.addEventListener("toggle", () => { if (details.open) openDetails.add(id); else openDetails.delete(id); });
    trs.push(el("tr", { class: "zero" }, el("td", { colspan: 2 }, details)));
  }
  table.replaceChildren(...trs);
}

// ---- charts -------------------------------------------------------------------------------

function chart(title, t, peer, client, fmt) {
  const W = 320, H = 90, L = 4, R = 4, T = 14, B = 12;
  const max = Math.max(1, ...peer, ...client);
  // The last 5 minutes; less while the relay is younger, but at least one minute.
  const span = Math.min(300, Math.max(60, ...t.map((s) => -s)));
  const x = (s) => L + (W - L - R) * (1 + s / span);
  const y = (v) => T + (H - T - B) * (1 - v / max);
  const s = svg("svg", { viewBox: "0 0 " + W + " " + H, preserveAspectRatio: "none", role: "img" });
  s.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#d1d5db" }));
  const line = (vals, cls) => {
    if (!vals.length) return;
    const pts = vals.map((v, i) => x(t[i]).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
    s.append(svg("polyline", { points: pts, class: cls }));
  };
  line(peer, "line-peer");
  line(client, "line-client");
  s.append(svg("text", { x: L + 2, y: 10, class: "axis" }, "max " + fmt(max)));
  s.append(svg("text", { x: L + 2, y: H - 2, class: "axis" }, span >= 300 ? "−5 min" : "−" + Math.round(span) + " s"));
  s.append(svg("text", { x: W - R - 2, y: H - 2, class: "axis", "text-anchor": "end" }, "now"));
  const last = (a) => (a.length ? a[a.length - 1] : 0);
  return el("div", { class: "chart" },
    el("h3", {}, title + ": " + fmt(last(peer)) + " → peer, " + fmt(last(client)) + " → client"), s);
}

function renderCharts(series) {
  const charts = [];
  series.workers.forEach((w, i) => {
    charts.push(chart("worker " + i + " packets", series.t, w.pps_to_peer, w.pps_to_client, pps));
    charts.push(chart("worker " + i + " bits", series.t, w.bps_to_peer, w.bps_to_client, bits));
  });
  document.getElementById("charts").replaceChildren(...charts);
}

// ---- sessions and timelines ---------------------------------------------------------------

function traffic(t) {
  return t ? count(t.packets) + " pkts / " + bytes(t.bytes) : "–";
}

function renderSessions() {
  const live = new Map(state.sessions.map((s) => [s.id, s]));
  const ended = [...state.timeline.values()].filter((l) => l.end && !live.has(l.id)).sort((a, b) => b.id - a.id);
  const rows = [...state.sessions, ...ended].slice(0, MAX_ROWS);
  const tbody = document.querySelector("#sessions tbody");
  const trs = [];
  for (const r of rows) {
    const s = live.get(r.id);
    const log = state.timeline.get(r.id);
    const cells = s
      ? [s.id, s.user, s.client, s.relayed, duration(s.age_s), duration(s.expires_in_s), s.permissions.length,
         s.channels.length, traffic(s.to_peer), traffic(s.to_client), "live"]
      : [log.id, log.user, log.client, log.relayed, duration(log.end.at_ms / 1000), "–", "–", "–",
         traffic(log.end.to_peer), traffic(log.end.to_client), "ended: " + log.end.reason];
    const tr = el("tr", { class: "row" + (s ? "" : " ended"), "data-session": r.id }, ...cells.map((c) => el("td", {}, c)));
    tr.addEventListener("click", () => { toggle(r.id); });
    trs.push(tr);
    if (state.expanded.has(r.id)) trs.push(timelineRow(r.id, s, log));
  }
  if (!trs.length) trs.push(el("tr", {}, el("td", { colspan: 11, class: "dim" }, "no sessions")));
  tbody.replaceChildren(...trs);
  const total = state.sessions.length;
  document.getElementById("sessions-note").textContent =
    "(" + count(total) + " live" + (ended.length ? ", " + ended.length + " recently ended" : "") +
    (rows.length < total + ended.length ? "; first " + MAX_ROWS + " shown" : "") +
    (state.untracked ? "; " + count(state.untracked) + " without timeline" : "") + "; click a row for its timeline)";
}

function toggle(id) {
  if (state.expanded.has(id)) {
    state.expanded.delete(id);
    renderSessions();
  } else {
    state.expanded.add(id);
    guarded(refreshSessions);
  }
}

function timelineRow(id, s, log) {
  const td = el("td", { colspan: 11 });
  const row = el("tr", { class: "timeline", "data-timeline": id }, td);
  if (!log) {
    td.append(el("span", { class: "dim" }, "No timeline for this session (it started before this process took over, " +
      "or while the timeline limit was reached)."));
    return row;
  }
  const items = [{ at: 0, kind: "allocate", text: "relayed " + log.relayed + " over " + log.transport + ", lifetime " +
    log.lifetime_s + " s, worker " + log.worker + (log.tcp_allocation ? ", TCP allocation (RFC 6062)" : "") }];
  for (const e of log.events) {
    items.push({ at: e.at_ms, kind: e.kind, text: e.detail + (e.count > 1 ? "  ×" + e.count + " (last " + ms(e.last_ms) + ")" : "") });
  }
  const endAt = log.end ? log.end.at_ms : (s ? s.age_s * 1000 : items[items.length - 1].at);
  if (log.end) {
    items.push({ at: log.end.at_ms, kind: "end", text: log.end.reason + "; client → peer " + traffic(log.end.to_peer) +
      ", peer → client " + traffic(log.end.to_client) });
  } else if (s) {
    items.push({ at: s.age_s * 1000, kind: "now", text: "live; client → peer " + traffic(s.to_peer) + ", peer → client " +
      traffic(s.to_client) + "; expires in " + duration(s.expires_in_s) });
  }
  const W = 1000, H = 34, span = Math.max(1, endAt);
  const bar = svg("svg", { viewBox: "0 0 " + W + " " + H, preserveAspectRatio: "none" });
  bar.append(svg("rect", { x: 10, y: 15, width: W - 20, height: 4, rx: 2, fill: log.end ? "#d1d5db" : "#86efac" }));
  const colors = { allocate: "#0f766e", permission: "#7c3aed", channel: "#2563eb", refresh: "#a16207",
                   refused: "#b91c1c", revoked: "#374151", end: "#374151", now: "#15803d" };
  for (const it of items) {
    const cx = 10 + (W - 20) * Math.min(1, it.at / span);
    bar.append(svg("circle", { cx: cx.toFixed(1), cy: 17, r: 6, fill: colors[it.kind] || "#6b7280" }, undefined));
  }
  if (log.omitted) items.splice(1, 0, { at: items[1] ? items[1].at : 0, kind: "…", text: log.omitted + " older events not kept" });
  const started = new Date(log.started_unix_ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  td.append(el("div", { class: "dim" }, "session " + id + " of " + log.user + " from " + log.client + ", started " + started),
    bar,
    el("ol", {}, ...items.map((it) => el("li", { "data-kind": it.kind }, el("span", { class: "t" }, ms(it.at)),
      el("span", { class: "kind k-" + it.kind }, it.kind), it.text))));
  return row;
}

// ---- polling --------------------------------------------------------------------------------

function showLogin(message) {
  document.getElementById("main").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("state").textContent = "token required";
  document.getElementById("login-error").textContent = message || "";
}

async function refreshStatus() {
  renderStatus(await api("/status.json"));
  state.gotStatus = true;
}

/** The live sessions, the ended ones' timelines, and the timelines of the opened live rows
 * (one request each: the whole /timeline can be megabytes on a busy relay). */
async function refreshSessions() {
  const [sessions, ended] = await Promise.all([api("/sessions"), api("/timeline/ended")]);
  const timeline = new Map(ended.sessions.map((l) => [l.id, l]));
  const opened = sessions.filter((s) => state.expanded.has(s.id) && !timeline.has(s.id));
  const logs = await Promise.all(opened.map((s) => api("/timeline/" + s.id).catch((e) => {
    if (e instanceof Unauthorized) throw e;
    return null; // no timeline (404): said so in its row
  })));
  for (const log of logs) if (log) timeline.set(log.id, log);
  state.sessions = sessions;
  state.timeline = timeline;
  state.untracked = ended.untracked;
  renderSessions();
  state.gotSessions = true;
}

async function guarded(f) {
  try {
    await f();
    document.getElementById("main").hidden = false;
    document.getElementById("login").hidden = true;
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString("en-GB");
    document.body.dataset.ready = state.gotStatus && state.gotSessions ? "1" : "0";
    return true;
  } catch (e) {
    if (e instanceof Unauthorized) {
      showLogin(sessionStorage.getItem(TOKEN_KEY) ? "That token was refused." : "");
    } else {
      document.getElementById("updated").textContent = "update failed: " + e.message;
    }
    return false;
  }
}

function loop(f, every) {
  const tick = async () => {
    if (!document.getElementById("pause").checked) await guarded(f);
    setTimeout(tick, every);
  };
  tick();
}

/** For tests and the console: refresh everything now; expand a session's timeline. */
window.uturnStatus = {
  refresh: () => guarded(async () => { await Promise.all([refreshStatus(), refreshSessions()]); }),
  expand: (id) => { state.expanded.add(id); return guarded(refreshSessions); },
};

takeTokenFromFragment();
document.getElementById("login").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value);
  window.uturnStatus.refresh();
});
loop(refreshStatus, STATUS_EVERY_MS);
loop(refreshSessions, SESSIONS_EVERY_MS);
