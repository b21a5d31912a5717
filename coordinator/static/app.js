// Nord dashboard: polls the coordinator's JSON API and renders cards, the contributors' leaderboard,
// the open round's progress and hand-written SVG charts (each with a text alternative in aria-label).
"use strict";

const POLL_MS = 3000;
const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#5fb3ff", "#b58cff", "#3fcf8e", "#f5b942", "#ff7eb6", "#4dd0e1", "#ff8a4c", "#a3e635"];
const BOARD_ROWS = 50;
const $ = (id) => document.getElementById(id);

// ---------- formatting ----------
function fmtInt(n) { return n == null ? "–" : Math.round(n).toLocaleString("en-US"); }
function fmtCompact(n) {
  if (n == null) return "–";
  const a = Math.abs(n);
  if (a >= 1e9) return (n / 1e9).toFixed(a >= 1e10 ? 1 : 2) + "B";
  if (a >= 1e6) return (n / 1e6).toFixed(a >= 1e7 ? 1 : 2) + "M";
  if (a >= 1e3) return (n / 1e3).toFixed(a >= 1e4 ? 1 : 2) + "k";
  return String(Math.round(n * 100) / 100);
}
function fmtBytes(n) {
  if (n == null) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0, v = n;
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
  return (i === 0 ? v : v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)) + " " + units[i];
}
function fmtAgo(ts, now) {
  if (!ts) return "–";
  const s = Math.max(0, (now || Date.now() / 1000) - ts);
  if (s < 5) return "just now";
  if (s < 60) return Math.floor(s) + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  if (s < 86400) return Math.floor(s / 3600) + " h ago";
  return Math.floor(s / 86400) + " d ago";
}
function fmtDuration(s) {
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  const pad = (v) => String(v).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(sec)}` : `${m}:${pad(sec)}`;
}
function fmtNum(v) {
  if (v == null || !isFinite(v)) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a < 1e-3 || a >= 1e5) return v.toExponential(1);
  return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : a >= 1 ? v.toFixed(2) : v.toFixed(3);
}
// A share as a percentage with up to one decimal that is not rounded away: 0.125 -> "12.5%", 0.3 -> "30%".
function fmtPct(v) {
  if (v == null || !isFinite(v)) return "–";
  return String(Math.round(v * 1000) / 10) + "%";
}
function fmtPerSecond(v) {
  if (v == null) return "–";
  return v >= 1000 ? fmtCompact(v) : v >= 10 ? String(Math.round(v)) : v.toFixed(1);
}
function fmtRate(v) { return v == null ? "–" : fmtPerSecond(v) + " tok/s"; }
function fmtClock(ts, withSeconds) {
  const d = new Date(ts * 1000);
  const opts = { hour: "2-digit", minute: "2-digit", hour12: false };
  if (withSeconds) opts.second = "2-digit";
  return d.toLocaleTimeString("en-GB", opts);
}
function fmtWhen(ts) { return ts ? new Date(ts * 1000).toLocaleString("en-GB", { hour12: false }) : "–"; }

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}
function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}

// ---------- scales and ticks ----------
function niceTicks(lo, hi, count = 4, minStep = 0) {
  if (!(hi > lo)) { const pad = Math.abs(lo) * 0.1 || 1; lo -= pad; hi += pad; }
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = Math.max(minStep, [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || 10 * mag);
  const start = Math.floor(lo / step) * step, end = Math.ceil(hi / step) * step;
  const ticks = [];
  for (let t = start; t <= end + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

// Rounds: whole numbers at a 1-2-5 step, so r0 r2 r4 … rather than r0 r2 r3 r5.
function roundAxis(xs) {
  const min = Math.min(...xs), max = Math.max(...xs);
  const values = niceTicks(min, Math.max(max, min + 1), 5, 1).filter((t) => t >= min && t <= max && Number.isInteger(t));
  return { min, max, values, fmt: (x) => "r" + x, title: "round", tip: (x) => "round " + x };
}

const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800];
// Wall clock: steps of 1 s … 1 week, aligned to local time, labelled HH:MM (HH:MM:SS under a minute).
function timeAxis(xs) {
  let min = Math.min(...xs), max = Math.max(...xs);
  if (max - min < 1) { min -= 30; max += 30; }
  const step = TIME_STEPS.find((s) => (max - min) / s <= 5) || TIME_STEPS[TIME_STEPS.length - 1];
  const offset = new Date(min * 1000).getTimezoneOffset() * 60;
  const values = [];
  for (let t = Math.ceil((min - offset) / step) * step + offset; t <= max; t += step) values.push(t);
  const fmt = step >= 86400 ? (t) => new Date(t * 1000).toLocaleDateString("en-GB", { day: "numeric", month: "short" })
    : (t) => fmtClock(t, step < 60);
  return { min, max, values, fmt, title: "time (local)", tip: (t) => fmtClock(t, true) };
}

// ---------- charts ----------
function chartFrame(container, x, yTicks, fmtY, yTitle, label) {
  const w = Math.max(container.clientWidth, 240), h = Math.max(container.clientHeight, 160);
  const m = { l: 70, r: 14, t: 10, b: 38 };
  const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, role: "img", "aria-label": label });
  const yMin = yTicks[0], yMax = yTicks[yTicks.length - 1];
  const sx = (v) => m.l + (x.max === x.min ? 0.5 : (v - x.min) / (x.max - x.min)) * (w - m.l - m.r);
  const sy = (v) => h - m.b - ((v - yMin) / (yMax - yMin || 1)) * (h - m.t - m.b);
  const grid = svg("g", { class: "grid" }), axis = svg("g", { class: "axis" });
  for (const t of yTicks) {
    grid.appendChild(svg("line", { x1: m.l, x2: w - m.r, y1: sy(t), y2: sy(t) }));
    axis.appendChild(svg("text", { x: m.l - 8, y: sy(t) + 3.5, "text-anchor": "end" }, fmtY(t)));
  }
  for (const v of x.values) axis.appendChild(svg("text", { x: sx(v), y: h - m.b + 16, "text-anchor": "middle", class: "xtick" }, x.fmt(v)));
  axis.appendChild(svg("text", { x: m.l + (w - m.l - m.r) / 2, y: h - 4, "text-anchor": "middle", class: "title" }, x.title));
  axis.appendChild(svg("text", { x: -(m.t + (h - m.t - m.b) / 2), y: 12, transform: "rotate(-90)", "text-anchor": "middle", class: "title" }, yTitle));
  root.append(grid, axis);
  return { root, sx, sy, w, h, m };
}

function emptyChart(container, message) {
  container.replaceChildren();
  const s = svg("svg", { viewBox: "0 0 300 120", "data-empty": "1", role: "img", "aria-label": message });
  s.appendChild(svg("text", { x: 150, y: 64, "text-anchor": "middle", class: "empty-text" }, message));
  container.appendChild(s);
}

// series: [{name, color, points: [[x, y, round], ...], area}]; the text alternative names each series' latest
// value. `area` (per series, else the option) shades under the line. `counts`: whole numbers from 0 (peers),
// so the axis never shows 3.6 … 4.4 for a steady 4.
function lineChart(container, series, { fmtY = fmtNum, yTitle, what, axisOf, area = false, counts = false }) {
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) return emptyChart(container, `${what}: waiting for the first sealed round`);
  const ys = pts.map((p) => p[1]);
  const yTicks = counts ? niceTicks(0, Math.max(1, ...ys), 4, 1) : niceTicks(Math.min(...ys), Math.max(...ys));
  const x = axisOf(pts.map((p) => p[0]));
  const latest = series.filter((s) => s.points.length).map((s) => {
    const p = s.points[s.points.length - 1];
    return `${s.name} ${fmtY(p[1])} at round ${p[2]}`;
  });
  const rounds = Math.max(...series.map((s) => s.points.length));
  const label = `${what} over ${x.title === "round" ? "rounds" : "time"}, ${rounds} sealed rounds; latest: ${latest.join("; ")}`;
  const f = chartFrame(container, x, yTicks, fmtY, yTitle, label);
  for (const s of series) {
    if (!s.points.length) continue;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${f.sx(p[0]).toFixed(1)},${f.sy(p[1]).toFixed(1)}`).join("");
    if ((s.area ?? area) && s.points.length > 1) {
      const base = f.sy(yTicks[0]);
      const a = `${d}L${f.sx(s.points[s.points.length - 1][0]).toFixed(1)},${base}L${f.sx(s.points[0][0]).toFixed(1)},${base}Z`;
      f.root.appendChild(svg("path", { d: a, class: "area", fill: s.color }));
    }
    f.root.appendChild(svg("path", { d, class: "line", stroke: s.color, "data-series": s.name }));
    const showDots = s.points.length <= 40;
    for (const p of s.points) {
      if (!showDots && p !== s.points[s.points.length - 1]) continue;
      const dot = svg("circle", { cx: f.sx(p[0]), cy: f.sy(p[1]), r: 3.2, class: "dot", fill: s.color });
      dot.appendChild(svg("title", {}, `${s.name} · round ${p[2]} · ${x.tip(p[0])}: ${fmtY(p[1])}`));
      f.root.appendChild(dot);
    }
  }
  container.replaceChildren(f.root);
}

function barChart(container, rows, stacks, { fmtY = fmtCompact, yTitle, what, integer = false }) {
  if (!rows.length) return emptyChart(container, `${what}: waiting for the first sealed round`);
  const totals = rows.map((r) => stacks.reduce((acc, s) => acc + (r[s.key] || 0), 0));
  const yTicks = niceTicks(0, Math.max(1, ...totals), 4, integer ? 1 : 0);
  const xr = roundAxis(rows.map((r) => r.round));
  const lastRow = rows[rows.length - 1];
  const label = `${what}, ${rows.length} rounds; round ${lastRow.round}: ` + stacks.map((s) => `${s.name} ${fmtY(lastRow[s.key] || 0)}`).join(", ");
  const f = chartFrame(container, { ...xr, min: xr.min - 0.5, max: xr.max + 0.5 }, yTicks, fmtY, yTitle, label);
  const slot = (f.w - f.m.l - f.m.r) / Math.max(1, xr.max - xr.min + 1);
  const bw = Math.max(2, Math.min(28, slot * 0.7));
  for (const r of rows) {
    let acc = 0;
    for (const s of stacks) {
      const v = r[s.key] || 0;
      if (v <= 0) continue;
      const y0 = f.sy(acc), y1 = f.sy(acc + v);
      const rect = svg("rect", { x: f.sx(r.round) - bw / 2, y: y1, width: bw, height: Math.max(0.5, y0 - y1), rx: 2, fill: s.color, class: "bar" });
      rect.appendChild(svg("title", {}, `round ${r.round} · ${s.name}: ${fmtY(v)}`));
      f.root.appendChild(rect);
      acc += v;
    }
  }
  container.replaceChildren(f.root);
}

// ---------- state ----------
let last = null;
let xMode = localStorage.getItem("nord-x") === "round" ? "round" : "time";
let clockSkew = 0;  // coordinator clock minus this browser's, so countdowns use the coordinator's time
let shownRound = null;
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
const coordNow = () => Date.now() / 1000 + clockSkew;

// ---------- rendering ----------
function addressScope(maddr) {
  const m = /^\/(ip4|ip6|dns4?|dns6)\/([^/]+)/.exec(maddr || "");
  if (!m) return "unknown";
  const host = m[2].toLowerCase();
  if (m[1].startsWith("dns")) return host === "localhost" ? "loopback" : "public";
  if (host === "::1" || host.startsWith("127.")) return "loopback";
  if (/^(10\.|192\.168\.|169\.254\.|172\.(1[6-9]|2\d|3[01])\.|100\.(6[4-9]|[7-9]\d|1[01]\d|12[0-7])\.)/.test(host)) return "private";
  if (/^(f[cd]|fe80)/.test(host)) return "private";
  return "public";
}

function renderJoin(s) {
  $("join-cmd").textContent = s.join_command;
  const scopes = (s.multiaddrs || []).map(addressScope);
  const warn = $("join-warn");
  let hint = "on any machine with Nord installed; GPUs and CPUs both welcome";
  warn.hidden = true;
  if (!scopes.length) {
    hint = "waiting for the coordinator's address";
  } else if (scopes[0] === "loopback") {
    hint = "on this machine only";
    warn.hidden = false;
    warn.textContent = "The coordinator announces only a loopback address (127.0.0.1): other machines cannot reach it. " +
      "Start it with --announce-maddrs /ip4/<public-ip>/tcp/<port> (and open that port) to share this command.";
  } else if (scopes[0] === "private") {
    hint = "on this network only";
    warn.hidden = false;
    warn.textContent = "The coordinator announces only a private address: machines outside this network cannot reach it. " +
      "Start it with --announce-maddrs /ip4/<public-ip>/tcp/<port> to share this command beyond it.";
  }
  $("join-hint").textContent = hint;
  $("maddrs").textContent = s.multiaddrs && s.multiaddrs.length ? "announced: " + s.multiaddrs.join("  ·  ") : "";
}

function renderSummary(s, progress) {
  $("run-id").textContent = s.run_id;
  document.title = `Nord · ${s.run_id} · round ${s.round}`;
  const model = s.model || {};
  $("s-model").textContent = model.name || "–";
  $("s-params").textContent = `${fmtCompact(s.parameters)} parameters` + (model.layers ? ` · ${model.layers} layers` : "");
  $("s-round").textContent = fmtInt(s.round);
  $("s-round-sub").textContent = `${fmtInt(s.sealed_rounds)} sealed · opened ${fmtAgo(s.round_opened_at, s.now)}`;
  $("s-tokens").textContent = fmtCompact(s.tokens_seen);
  $("s-tokens").title = fmtInt(s.tokens_seen) + " tokens";
  $("s-rate").textContent = progress.tokens_per_s == null ? "in accepted contributions" : fmtRate(progress.tokens_per_s);
  $("s-peers").textContent = fmtInt(s.peers_online);
  $("s-peers-sub").textContent = `${fmtInt(s.peers_total)} seen in total · heard within ${s.online_window_s} s`;
  $("s-hash").textContent = s.weights_hash || "–";
  renderJoin(s);
  if (shownRound !== null && s.round !== shownRound) {
    $("round-announcer").textContent = `Round ${s.round - 1} sealed; round ${s.round} is open. ${fmtCompact(s.tokens_seen)} tokens seen.`;
  }
  shownRound = s.round;
}

function renderProgress(p) {
  const open = p.open_round;
  const meter = $("p-quorum");
  if (open) {
    meter.style.setProperty("--fill", Math.min(1, open.quorum_fill));
    meter.setAttribute("aria-valuenow", open.quorum_fill.toFixed(3));
    meter.setAttribute("aria-valuetext", `${open.pooled} of ${open.quorum} contributions`);
    $("h-progress").textContent = `Open round ${open.round}`;
    $("p-quorum-text").textContent = `${open.pooled} of ${open.quorum} contributions pooled (${fmtPct(open.quorum_fill)})` +
      (open.rejected ? ` · ${open.rejected} rejected` : "");
  } else {
    meter.style.setProperty("--fill", 0);
    $("p-quorum-text").textContent = "no round open";
  }
  tickDeadline();
  renderTarget(p.target);
  $("p-rate").textContent = fmtRate(p.tokens_per_s);
  const w = p.rate_window;
  $("p-window").textContent = w ? `rates over rounds ${w.first_round}–${w.last_round} (${fmtDuration(w.seconds)})` : "rates after the first sealed round";
}

function fmtSpan(s) {
  if (s < 90) return Math.round(s) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " days";
}

function renderTarget(t) {
  $("p-target").hidden = !t;
  if (!t) return;
  const meter = $("p-target-meter");
  meter.style.setProperty("--fill", t.fraction);
  meter.setAttribute("aria-valuenow", t.fraction.toFixed(3));
  const fmt = t.unit === "tokens" ? fmtCompact : fmtInt;
  const of = `${fmt(t.done)} of ${fmt(t.goal)} ${t.unit} (${fmtPct(t.fraction)})`;
  meter.setAttribute("aria-valuetext", of);
  const eta = t.eta_s === 0 ? "reached" : t.eta_s == null ? "ETA after the first sealed rounds"
    : `ETA ${fmtSpan(t.eta_s)} (${fmtWhen(t.eta_at)}) at the recent pace`;
  $("p-target-text").textContent = `${of} · ${eta}`;
}

function tickDeadline() {
  const open = last && last.progress.open_round;
  if (!open) { $("p-deadline").textContent = "–"; $("p-deadline-sub").textContent = ""; return; }
  const left = open.deadline_at - coordNow();
  $("p-deadline").textContent = left > 0 ? fmtDuration(left) : "passed";
  $("p-deadline-sub").textContent = left > 0
    ? `seals at ${fmtClock(open.deadline_at, true)} at the latest (with one accepted contribution), sooner at quorum`
    : "seals as soon as one contribution is accepted";
}

function peerCell(p) {
  const td = el("td", { class: "peer", "data-label": "Peer" });
  td.append(el("span", { class: "dot-online" + (p.online ? " on" : ""), title: p.online ? "online" : "offline" }));
  if (p.name) td.append(el("strong", { class: "name" }, p.name), document.createTextNode(" "));
  td.append(el("code", { class: "mono", title: p.peer }, p.short));
  if (p.ban_reason) td.append(document.createTextNode(" "), el("span", { class: "tag banned", title: p.ban_reason }, "banned"));
  return td;
}

function renderBoard(board) {
  const body = $("peers-table").tBodies[0];
  const q = board.query;
  $("h-peers").textContent = q ? `${board.matches} of ${board.total} match “${q}”` : `${board.online} online of ${board.total}`;
  if (!board.peers.length) {
    const msg = q ? `No peer matches “${q}”. Your id is printed by nord-node join (“joined run … as peer <id>”).` : "No peers yet — share the join command above.";
    body.replaceChildren(el("tr", { class: "empty" }));
    body.rows[0].append(el("td", { colspan: 10 }, msg));
    return;
  }
  body.replaceChildren(...board.peers.map((p) => {
    const tr = el("tr", { "data-peer": p.peer, class: q ? "match" : "" });
    const rejected = el("td", { class: "num" + (p.rejected ? " bad" : ""), "data-label": "Rejected" }, fmtInt(p.rejected));
    if (p.rejection_reasons.length) {
      rejected.classList.add("has-reasons");
      const list = el("ul", { class: "reasons" });
      for (const r of p.rejection_reasons) list.append(el("li", {}, r.count > 1 ? `${r.reason} (×${r.count})` : r.reason));
      rejected.append(list);
    }
    tr.append(el("td", { class: "num rank", "data-label": "Rank" }, "#" + p.rank), peerCell(p),
      el("td", { class: "num", "data-label": "Tokens", title: fmtInt(p.tokens) }, fmtCompact(p.tokens)),
      el("td", { class: "num", "data-label": "Tokens/s" }, fmtPerSecond(p.tokens_per_s)),
      el("td", { class: "num ok", "data-label": "Accepted" }, fmtInt(p.accepted)), rejected,
      el("td", { class: "num", "data-label": "Bytes" }, fmtBytes(p.bytes)),
      el("td", { "data-label": "Device" }, p.device || "–"),
      el("td", { "data-label": "First seen", title: fmtWhen(p.first_seen) }, fmtAgo(p.first_seen, board.now)),
      el("td", { "data-label": "Last seen", title: fmtWhen(p.last_seen) }, fmtAgo(p.last_seen, board.now)));
    return tr;
  }));
}

function copyButton(text, label) {
  return el("button", { class: "btn small", type: "button", "data-copy-text": text, "aria-label": label }, "Copy");
}

function renderCheckpoints(ckpts, s) {
  if (!ckpts.length) return;
  const origin = location.origin;
  const pin = s.authority ? ` --authority ${s.authority.slice(0, 20)}` : "";
  $("ckpt-table").replaceChildren(...ckpts.slice().reverse().map((c) => {
    const li = el("li", { "data-round": c.round });
    const head = el("div", { class: "ckpt-head" });
    head.append(el("strong", {}, "round " + c.round), el("span", { class: "sub" }, `${fmtBytes(c.bytes)} · ${fmtAgo(c.created_at, s.now)}`),
      el("a", { href: c.url, download: "" }, "download"));
    const cmd = `nord-node pull --from ${origin}${c.url}${pin} --out ${s.run_id}-r${c.round}.safetensors`;
    const pull = el("div", { class: "cmd-row" });
    pull.append(el("code", { class: "wrap" }, cmd), copyButton(cmd, `Copy the pull command of round ${c.round}`));
    const hash = el("div", { class: "cmd-row" });
    hash.append(el("code", { class: "wrap hash-full", title: "weights sha256" }, c.weights_hash), copyButton(c.weights_hash, `Copy the weights hash of round ${c.round}`));
    li.append(head, pull, hash);
    return li;
  }));
}

function renderRevocations(data) {
  const revs = data.revocations || [], bans = data.bans || [];
  if (revs.length) {
    $("revoke-table").tBodies[0].replaceChildren(...revs.map((r) => {
      const tr = el("tr");
      tr.append(el("td", { "data-label": "Round" }, r.round == null ? "–" : "r" + r.round),
        el("td", { class: "mono", title: r.contribution_id, "data-label": "Contribution" }, r.contribution_id.slice(0, 12) + "…"),
        el("td", { class: "mono", title: r.peer || "", "data-label": "Peer" }, r.peer ? r.peer.slice(0, 20) : "–"),
        el("td", { class: "reason", "data-label": "Reason" }, r.reason), el("td", { "data-label": "By" }, r.by));
      return tr;
    }));
  }
  $("bans").textContent = bans.length ? "Banned: " + bans.map((b) => `${b.peer.slice(0, 20)} (${b.reason})`).join(", ") : "";
}

function legend(container, series) {
  container.replaceChildren(...series.map((s) => {
    const span = el("span");
    const sw = el("i");
    sw.style.background = s.color;
    span.append(sw, document.createTextNode(s.name));
    return span;
  }));
}

function renderCharts(metrics, progress) {
  const sealedAt = new Map(progress.rounds.filter((r) => r.sealed_at != null).map((r) => [r.round, r.sealed_at]));
  const byTime = xMode === "time";
  // x of a round's point: when it was sealed (its metrics are measured then), or the round itself
  const at = (round) => (byTime ? sealedAt.get(round) : round);
  const axisOf = byTime ? timeAxis : roundAxis;
  const series = (key) => metrics.filter((m) => m[key] != null && at(m.round) != null).map((m) => [at(m.round), m[key], m.round]);
  const loss = series("val_loss"), ppl = series("val_ppl");
  lineChart($("chart-loss"), [{ name: "validation loss", color: css("--accent"), points: loss }],
    { area: true, yTitle: "loss (nats/token)", what: "Validation loss", axisOf });
  lineChart($("chart-ppl"), [{ name: "perplexity", color: css("--accent-2"), points: ppl }],
    { area: true, yTitle: "perplexity", what: "Perplexity", axisOf });
  $("h-loss").textContent = loss.length ? `latest ${fmtNum(loss[loss.length - 1][1])} nats/token` : "";
  $("h-ppl").textContent = ppl.length ? `latest ${fmtNum(ppl[ppl.length - 1][1])}` : "";

  // both sampled at each seal: peers heard from within the online window then, and peers that contributed
  const atSeals = (key) => progress.rounds.filter((r) => r.sealed_at != null && r[key] != null)
    .map((r) => [byTime ? r.sealed_at : r.round, r[key], r.round]);
  const peerSeries = [
    { name: "peers online", color: css("--accent"), points: atSeals("peers_online"), area: true },
    { name: "peers contributing", color: css("--ok"), points: atSeals("contributors") },
  ];
  lineChart($("chart-online"), peerSeries, {
    fmtY: (v) => fmtInt(v), yTitle: "peers", axisOf, counts: true,
    what: `Peers online (heard from within ${progress.online_window_s} s) and peers that sent a contribution, at each seal`,
  });
  legend($("legend-online"), peerSeries);
  $("h-online").textContent = `${fmtInt(progress.peers_online)} online now`;

  const layers = [...new Set(metrics.flatMap((m) => Object.keys(m).filter((k) => k.startsWith("firing_rate/"))))].sort();
  const rateSeries = layers.map((k, i) => ({ name: k.slice("firing_rate/".length), color: PALETTE[i % PALETTE.length], points: series(k) }));
  lineChart($("chart-rates"), rateSeries, { fmtY: fmtPct, yTitle: "firing rate", what: "Firing rate per layer", axisOf });
  legend($("legend-rates"), rateSeries);

  barChart($("chart-bytes"), metrics, [{ key: "bytes", name: "bytes", color: css("--accent") }],
    { fmtY: fmtBytes, yTitle: "bytes received", what: "Bytes per round" });
  const totalBytes = metrics.reduce((a, m) => a + (m.bytes || 0), 0);
  $("h-bytes").textContent = metrics.length ? `${fmtBytes(totalBytes)} in total` : "";
  barChart($("chart-contrib"), metrics, [
    { key: "accepted", name: "accepted", color: css("--ok") },
    { key: "rejected", name: "rejected", color: css("--bad") },
  ], { fmtY: (v) => fmtInt(v), integer: true, yTitle: "contributions", what: "Contributions per round" });
}

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

function boardPath() {
  const q = $("board-q").value.trim();
  return `/api/leaderboard?limit=${BOARD_ROWS}` + (q ? "&q=" + encodeURIComponent(q) : "");
}

let perSeal = null; // metrics and checkpoints change only when a round is sealed: fetched once per seal

async function refresh() {
  try {
    const summary = await getJSON("/api/summary");
    const sealed = !perSeal || perSeal.sealedRounds !== summary.sealed_rounds;
    const [progress, board, revs, metrics, ckpts] = await Promise.all(
      ["/api/progress?rounds=1000", boardPath(), "/api/revocations",
        ...(sealed ? ["/api/metrics", "/api/checkpoints"] : [])].map(getJSON));
    if (sealed) perSeal = { sealedRounds: summary.sealed_rounds, metrics, ckpts };
    clockSkew = summary.now - Date.now() / 1000;
    last = { summary, progress, board, metrics: perSeal.metrics, ckpts: perSeal.ckpts, revs };
    render();
    $("status").dataset.state = "live";
    $("status").textContent = "live";
  } catch (e) {
    $("status").dataset.state = "offline";
    $("status").textContent = "offline";
  }
}

function render() {
  if (!last) return;
  renderSummary(last.summary, last.progress);
  renderProgress(last.progress);
  renderBoard(last.board);
  renderCharts(last.metrics, last.progress);
  renderCheckpoints(last.ckpts, last.summary);
  renderRevocations(last.revs);
  document.body.dataset.round = last.summary.round;
}

// ---------- controls ----------
function applyTheme(theme) {
  if (theme) document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
  render();
}
const stored = localStorage.getItem("nord-theme");
applyTheme(stored || (matchMedia("(prefers-color-scheme: light)").matches ? "light" : null));
$("theme-toggle").addEventListener("click", () => {
  const next = document.documentElement.dataset.theme === "light" ? "dark" : "light";
  localStorage.setItem("nord-theme", next);
  applyTheme(next === "dark" ? null : "light");
});

function setXMode(mode) {
  xMode = mode;
  localStorage.setItem("nord-x", mode);
  for (const b of document.querySelectorAll("[data-x]")) b.setAttribute("aria-pressed", String(b.dataset.x === mode));
  render();
}
for (const b of document.querySelectorAll("[data-x]")) b.addEventListener("click", () => setXMode(b.dataset.x));
setXMode(xMode);

// The search is kept, so a volunteer who found their row once finds it again on the next visit.
const search = $("board-q");
search.value = localStorage.getItem("nord-find") || "";
let searchTimer;
search.addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => { localStorage.setItem("nord-find", search.value.trim()); refresh(); }, 250);
});
$("board-search").addEventListener("submit", (e) => { e.preventDefault(); refresh(); });

async function copyText(text, btn, source) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {
    const range = document.createRange();  // clipboard API needs a secure context; fall back to selecting
    range.selectNodeContents(source || btn.previousElementSibling);
    const sel = getSelection(); sel.removeAllRanges(); sel.addRange(range);
    document.execCommand("copy");
  }
  btn.textContent = "Copied"; btn.classList.add("done");
  setTimeout(() => { btn.textContent = "Copy"; btn.classList.remove("done"); }, 1500);
}
document.addEventListener("click", (e) => {
  const btn = e.target.closest("button[data-copy], button[data-copy-text]");
  if (!btn) return;
  const source = btn.dataset.copy ? $(btn.dataset.copy) : null;
  copyText(source ? source.textContent : btn.dataset.copyText, btn, source);
});

let resizeTimer;
addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(render, 150); });
refresh();
setInterval(refresh, POLL_MS);
setInterval(tickDeadline, 1000);
