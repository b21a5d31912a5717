// Nord dashboard: polls the coordinator's JSON API and renders cards, tables and hand-drawn SVG charts.
"use strict";

const POLL_MS = 3000;
const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#5fb3ff", "#b58cff", "#3fcf8e", "#f5b942", "#ff7eb6", "#4dd0e1", "#ff8a4c", "#a3e635"];
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
function short(h, n = 10) { return h ? h.slice(0, n) + "…" : "–"; }
function fmtNum(v) {
  if (v == null || !isFinite(v)) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
  return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : a >= 1 ? v.toFixed(2) : v.toFixed(3);
}

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

// ---------- charts ----------
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

function chartFrame(container, xTicks, yTicks, fmtY, xLabelOf) {
  const w = Math.max(container.clientWidth, 240), h = Math.max(container.clientHeight, 160);
  const m = { l: 48, r: 12, t: 10, b: 24 };
  const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, role: "img" });
  const yMin = yTicks[0], yMax = yTicks[yTicks.length - 1];
  const xMin = xTicks.min, xMax = xTicks.max;
  const sx = (x) => m.l + (xMax === xMin ? 0.5 : (x - xMin) / (xMax - xMin)) * (w - m.l - m.r);
  const sy = (y) => h - m.b - ((y - yMin) / (yMax - yMin || 1)) * (h - m.t - m.b);
  const grid = svg("g", { class: "grid" }), axis = svg("g", { class: "axis" });
  for (const t of yTicks) {
    grid.appendChild(svg("line", { x1: m.l, x2: w - m.r, y1: sy(t), y2: sy(t) }));
    axis.appendChild(svg("text", { x: m.l - 8, y: sy(t) + 3.5, "text-anchor": "end" }, fmtY(t)));
  }
  for (const x of xTicks.values) axis.appendChild(svg("text", { x: sx(x), y: h - 6, "text-anchor": "middle" }, xLabelOf(x)));
  root.append(grid, axis);
  return { root, sx, sy, w, h, m };
}

function xTickValues(xs) {
  const min = Math.min(...xs), max = Math.max(...xs);
  const n = Math.min(6, max - min + 1);
  const values = [];
  for (let i = 0; i < n; i++) values.push(Math.round(min + (i * (max - min)) / Math.max(1, n - 1)));
  return { min, max, values: [...new Set(values)] };
}

function emptyChart(container, message) {
  container.replaceChildren();
  const s = svg("svg", { viewBox: "0 0 300 120", "data-empty": "1" });
  s.appendChild(svg("text", { x: 150, y: 64, "text-anchor": "middle", class: "empty-text" }, message));
  container.appendChild(s);
}

function lineChart(container, series, { fmtY = fmtNum, area = false } = {}) {
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) return emptyChart(container, "waiting for the first sealed round");
  const ys = pts.map((p) => p[1]);
  const yTicks = niceTicks(Math.min(...ys), Math.max(...ys));
  const f = chartFrame(container, xTickValues(pts.map((p) => p[0])), yTicks, fmtY, (x) => "r" + x);
  for (const s of series) {
    if (!s.points.length) continue;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${f.sx(p[0]).toFixed(1)},${f.sy(p[1]).toFixed(1)}`).join("");
    if (area && s.points.length > 1) {
      const base = f.sy(yTicks[0]);
      const a = `${d}L${f.sx(s.points[s.points.length - 1][0]).toFixed(1)},${base}L${f.sx(s.points[0][0]).toFixed(1)},${base}Z`;
      f.root.appendChild(svg("path", { d: a, class: "area", fill: s.color }));
    }
    f.root.appendChild(svg("path", { d, class: "line", stroke: s.color, "data-series": s.name }));
    const showDots = s.points.length <= 40;
    for (const p of s.points) {
      if (!showDots && p !== s.points[s.points.length - 1]) continue;
      const dot = svg("circle", { cx: f.sx(p[0]), cy: f.sy(p[1]), r: 3.2, class: "dot", fill: s.color });
      dot.appendChild(svg("title", {}, `${s.name} · round ${p[0]}: ${fmtY(p[1])}`));
      f.root.appendChild(dot);
    }
  }
  container.replaceChildren(f.root);
}

function barChart(container, rows, stacks, { fmtY = fmtCompact, integer = false } = {}) {
  if (!rows.length) return emptyChart(container, "waiting for the first sealed round");
  const totals = rows.map((r) => stacks.reduce((acc, s) => acc + (r[s.key] || 0), 0));
  const yTicks = niceTicks(0, Math.max(1, ...totals), 4, integer ? 1 : 0);
  const xs = rows.map((r) => r.round);
  const xt = xTickValues(xs);
  const f = chartFrame(container, { min: xt.min - 0.5, max: xt.max + 0.5, values: xt.values }, yTicks, fmtY, (x) => "r" + x);
  const slot = (f.w - f.m.l - f.m.r) / Math.max(1, xt.max - xt.min + 1);
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

// ---------- rendering ----------
let last = null;
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

function renderSummary(s) {
  $("run-id").textContent = s.run_id;
  document.title = `Nord · ${s.run_id} · round ${s.round}`;
  const model = s.model || {};
  $("s-model").textContent = model.name || "–";
  $("s-params").textContent = `${fmtCompact(s.parameters)} parameters` + (model.layers ? ` · ${model.layers} layers` : "");
  $("s-round").textContent = fmtInt(s.round);
  $("s-round-sub").textContent = `${fmtInt(s.sealed_rounds)} sealed · opened ${fmtAgo(s.round_opened_at, s.now)} · quorum ${s.quorum}`;
  $("s-tokens").textContent = fmtCompact(s.tokens_seen);
  $("s-tokens").title = fmtInt(s.tokens_seen) + " tokens";
  $("s-peers").textContent = fmtInt(s.peers_online);
  $("s-peers-sub").textContent = `${fmtInt(s.peers_total)} seen in total`;
  $("s-hash").textContent = s.weights_hash || "–";
  $("s-hash").title = s.weights_hash || "";
  $("join-cmd").textContent = s.join_command;
  const maddrs = $("maddrs");
  maddrs.replaceChildren();
  if (s.multiaddrs && s.multiaddrs.length) maddrs.textContent = "multiaddrs: " + s.multiaddrs.join("  ·  ");
}

function renderPeers(peers, now) {
  const body = $("peers-table").tBodies[0];
  $("h-peers").textContent = peers.length ? `${peers.filter((p) => p.online).length} online of ${peers.length}` : "";
  if (!peers.length) return;
  body.replaceChildren(...peers.map((p) => {
    const tr = el("tr", { "data-peer": p.peer });
    const id = el("td", { class: "mono", title: p.peer });
    id.append(el("span", { class: "dot-online" + (p.online ? " on" : "") }), document.createTextNode(short(p.peer, 12)));
    const mode = el("td");
    if (p.ban_reason) mode.append(el("span", { class: "tag banned", title: p.ban_reason }, "banned"));
    else if (p.mode) mode.append(el("span", { class: "tag " + p.mode }, p.mode));
    else mode.textContent = "–";
    tr.append(id, mode, el("td", {}, p.device || "–"), el("td", { title: new Date(p.last_seen * 1000).toLocaleString() }, fmtAgo(p.last_seen, now)),
      el("td", { class: "num ok" }, fmtInt(p.accepted)), el("td", { class: "num" + (p.rejected ? " bad" : "") }, fmtInt(p.rejected)),
      el("td", { class: "num" }, fmtBytes(p.bytes)));
    return tr;
  }));
}

function renderCheckpoints(ckpts, now) {
  if (!ckpts.length) return;
  $("ckpt-table").tBodies[0].replaceChildren(...ckpts.slice().reverse().map((c) => {
    const tr = el("tr");
    const link = el("a", { href: c.url, download: "" }, "download");
    const td = el("td", { class: "num" });
    td.appendChild(link);
    tr.append(el("td", {}, "r" + c.round), el("td", { class: "mono", title: c.weights_hash }, short(c.weights_hash, 16)),
      el("td", { class: "num" }, fmtBytes(c.bytes)), el("td", {}, fmtAgo(c.created_at, now)), td);
    return tr;
  }));
}

function renderRevocations(data) {
  const revs = data.revocations || [], bans = data.bans || [];
  if (revs.length) {
    $("revoke-table").tBodies[0].replaceChildren(...revs.map((r) => {
      const tr = el("tr");
      tr.append(el("td", {}, r.round == null ? "–" : "r" + r.round), el("td", { class: "mono", title: r.contribution_id }, short(r.contribution_id)),
        el("td", { class: "mono", title: r.peer || "" }, short(r.peer)), el("td", { class: "reason" }, r.reason), el("td", {}, r.by));
      return tr;
    }));
  }
  $("bans").textContent = bans.length ? "Banned: " + bans.map((b) => `${short(b.peer)} (${b.reason})`).join(", ") : "";
}

function renderCharts(metrics) {
  const loss = metrics.filter((m) => m.val_loss != null).map((m) => [m.round, m.val_loss]);
  const ppl = metrics.filter((m) => m.val_ppl != null).map((m) => [m.round, m.val_ppl]);
  lineChart($("chart-loss"), [{ name: "validation loss", color: css("--accent"), points: loss }], { area: true });
  lineChart($("chart-ppl"), [{ name: "perplexity", color: css("--accent-2"), points: ppl }], { area: true });
  $("h-loss").textContent = loss.length ? `latest ${fmtNum(loss[loss.length - 1][1])} nats/token` : "";
  $("h-ppl").textContent = ppl.length ? `latest ${fmtNum(ppl[ppl.length - 1][1])}` : "";

  const layers = [...new Set(metrics.flatMap((m) => Object.keys(m).filter((k) => k.startsWith("firing_rate/"))))].sort();
  const rateSeries = layers.map((k, i) => ({
    name: k.slice("firing_rate/".length), color: PALETTE[i % PALETTE.length],
    points: metrics.filter((m) => m[k] != null).map((m) => [m.round, m[k]]),
  }));
  lineChart($("chart-rates"), rateSeries, { fmtY: (v) => (v * 100).toFixed(v < 0.1 ? 1 : 0) + "%" });
  $("legend-rates").replaceChildren(...rateSeries.map((s) => {
    const span = el("span");
    const sw = el("i");
    sw.style.background = s.color;
    span.append(sw, document.createTextNode(s.name));
    return span;
  }));

  barChart($("chart-bytes"), metrics, [{ key: "bytes", name: "bytes", color: css("--accent") }], { fmtY: fmtBytes });
  const totalBytes = metrics.reduce((a, m) => a + (m.bytes || 0), 0);
  $("h-bytes").textContent = metrics.length ? `${fmtBytes(totalBytes)} in total` : "";
  barChart($("chart-contrib"), metrics, [
    { key: "accepted", name: "accepted", color: css("--ok") },
    { key: "rejected", name: "rejected", color: css("--bad") },
  ], { fmtY: (v) => fmtInt(v), integer: true });
}

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

async function refresh() {
  try {
    const [summary, peers, metrics, ckpts, revs] = await Promise.all(
      ["/api/summary", "/api/peers", "/api/metrics", "/api/checkpoints", "/api/revocations"].map(getJSON));
    last = { summary, peers, metrics, ckpts, revs };
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
  renderSummary(last.summary);
  renderPeers(last.peers, last.summary.now);
  renderCharts(last.metrics);
  renderCheckpoints(last.ckpts, last.summary.now);
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

$("copy-join").addEventListener("click", async () => {
  const text = $("join-cmd").textContent;
  const btn = $("copy-join");
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {
    const range = document.createRange();  // clipboard API needs a secure context; fall back to selecting
    range.selectNodeContents($("join-cmd"));
    const sel = getSelection(); sel.removeAllRanges(); sel.addRange(range);
    document.execCommand("copy");
  }
  btn.textContent = "Copied"; btn.classList.add("done");
  setTimeout(() => { btn.textContent = "Copy"; btn.classList.remove("done"); }, 1500);
});

let resizeTimer;
addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(render, 150); });
refresh();
setInterval(refresh, POLL_MS);
