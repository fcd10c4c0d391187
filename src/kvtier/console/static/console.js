// kvtier console: polls api/data every interval and draws it with uPlot.
// Pictures first: the charts' legends show the numbers under the cursor, bars and meters
// carry theirs in a tooltip. Each number the page prints sits in an element with
// data-key (where in api/data it comes from) and data-value (the raw value), so tests and
// scripts can read exactly what a person sees.
"use strict";

const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948",
  "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const TIER_COLORS = { "vllm prefix": "#76b7b2", memory: "#4e79a7", disk: "#f28e2b",
  redis: "#e15759", valkey: "#e15759", shared: "#b07aa1" };
const RECENT_ROWS = 12;
const charts = {};
let colorOf = {};
let renders = 0;

function color(label) {
  const tier = label.split(" ")[0];
  if (TIER_COLORS[label]) return TIER_COLORS[label];
  if (TIER_COLORS[tier] && !label.includes("://")) return TIER_COLORS[tier];
  if (!colorOf[label]) colorOf[label] = PALETTE[Object.keys(colorOf).length % PALETTE.length];
  return colorOf[label];
}

function fmt(v, kind) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (kind === "pct") return (100 * v).toFixed(1) + "%";
  if (kind === "s") return v < 1 ? (1000 * v).toFixed(0) + " ms" : v.toFixed(2) + " s";
  if (kind === "bytes") {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return v.toFixed(i ? 1 : 0) + " " + units[i];
  }
  if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(2) + "M";
  if (Math.abs(v) >= 1e4) return (v / 1e3).toFixed(1) + "k";
  return Number.isInteger(v) ? String(v) : v.toFixed(2);
}

function at(obj, path) {
  return path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);
}

function lineChart(id, t, table, kind, opts = {}) {
  const el = document.getElementById(id);
  const labels = Object.keys(table).sort();
  const key = labels.join("|");
  const data = [t, ...labels.map((l) => table[l])];
  let c = charts[id];
  if (!c || c.key !== key) {
    if (c) c.plot.destroy();
    const width = Math.max(el.clientWidth, 280);
    const plot = new uPlot({
      width, height: 190,
      // From zero, and an idle chart spans 0-1 rather than uPlot's 0-100.
      scales: { x: { time: true }, y: opts.y || { range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1] } },
      series: [{}, ...labels.map((l) => ({
        label: l, stroke: color(l), width: 2, spanGaps: false,
        dash: l.endsWith(" written") || l.endsWith(" waiting") ? [6, 4] : undefined,
        fill: opts.fill ? color(l) + "22" : undefined,
        value: (u, v) => fmt(v, kind),
      }))],
      axes: [{}, { size: 72, values: (u, vals) => vals.map((v) => fmt(v, kind)) }],
      legend: { live: true },
    }, data, el);
    c = charts[id] = { plot, key };
  } else {
    c.plot.setData(data);
  }
  el.dataset.points = String(t.length);
}

function ttftChart(ttft) {
  const el = document.getElementById("ttft");
  const le = ttft.le || [];
  const xs = le.map((_, i) => i);
  const labels = le.map((b) => (b === null ? "+Inf" : "≤" + fmt(b, "s")));
  const key = labels.join("|");
  let c = charts.ttft;
  const data = [xs, ttft.counts || []];
  if (!c || c.key !== key) {
    if (c) c.plot.destroy();
    const plot = new uPlot({
      width: Math.max(el.clientWidth, 280), height: 190,
      scales: { x: { time: false } },
      series: [
        { value: (u, i) => (i == null ? "–" : labels[i]) },
        { label: "requests", stroke: "#4e79a7", fill: "#4e79a7aa",
          paths: uPlot.paths.bars({ size: [0.8, 40] }), points: { show: false } },
      ],
      axes: [{ values: (u, vals) => vals.map((i) => labels[i] || "") , rotate: -45, size: 60 },
        { size: 50 }],
    }, data, el);
    c = charts.ttft = { plot, key };
  } else {
    c.plot.setData(data);
  }
  el.dataset.points = String(ttft.count || 0);
}

function bars(id, values, kind, empty) {
  const el = document.getElementById(id);
  const entries = Object.entries(values || {}).sort((a, b) => b[1] - a[1]);
  const top = Math.max(1, ...entries.map((e) => e[1]));
  if (!entries.length) {
    el.textContent = empty;
    return;
  }
  el.replaceChildren(...entries.map(([label, v]) => {
    const row = document.createElement("div");
    row.className = "bar";
    row.title = `${label}: ${fmt(v, kind)}`;
    row.innerHTML = `<span class="bar-label"></span><span class="bar-track"><span class="bar-fill">` +
      `</span></span><span class="bar-value"></span>`;
    row.querySelector(".bar-label").textContent = label;
    const fill = row.querySelector(".bar-fill");
    fill.style.width = (100 * v / top).toFixed(1) + "%";
    fill.style.background = color(label);
    const value = row.querySelector(".bar-value");
    value.textContent = fmt(v, kind);
    value.dataset.key = `${id}.${label}`;
    value.dataset.value = String(v);
    return row;
  }));
}

function tiersTable(rows) {
  const body = document.querySelector("#tiers tbody");
  body.replaceChildren(...rows.map((r) => {
    const tr = document.createElement("tr");
    const used = r.used_bytes, cap = r.capacity_bytes;
    const share = cap ? used / cap : null;
    const health = r.up === null ? "unknown" : r.up ? "up" : "down";
    tr.innerHTML = `<td></td><td></td><td><span class="dot ${health}"></span>${health}</td>` +
      `<td><div class="meter"><div class="meter-fill"></div></div><span class="meter-text"></span></td>` +
      `<td></td><td></td><td></td><td></td>`;
    const cells = tr.children;
    cells[0].textContent = r.engine;
    cells[1].textContent = r.tier;
    const fill = tr.querySelector(".meter-fill");
    fill.style.width = share === null ? "0%" : Math.min(100, 100 * share).toFixed(1) + "%";
    fill.style.background = color(r.tier);
    tr.querySelector(".meter").title =
      `${fmt(used, "bytes")} of ${cap ? fmt(cap, "bytes") : "no set capacity"}` +
      `; read ${fmt(r.bytes_read, "bytes")}, written ${fmt(r.bytes_written, "bytes")}` +
      `, evictions ${fmt(r.evictions, "n")}`;
    const text = tr.querySelector(".meter-text");
    text.textContent = cap ? `${fmt(used, "bytes")} / ${fmt(cap, "bytes")}` : fmt(used, "bytes");
    text.dataset.key = `tiers.${r.engine}.${r.tier}.used_bytes`;
    text.dataset.value = String(used);
    cells[4].textContent = fmt(r.chunks, "n");
    cells[5].textContent = r.tokens == null ? "-" : fmt(r.tokens, "n");
    cells[5].dataset.key = `tiers.${r.engine}.${r.tier}.tokens`;
    cells[5].dataset.value = String(r.tokens);
    const ratio = r.raw_bytes_written ? r.bytes_written / r.raw_bytes_written : null;
    cells[6].textContent = ratio === null ? "-" : ratio.toFixed(3) + "x";
    cells[6].dataset.key = `tiers.${r.engine}.${r.tier}.stored_ratio`;
    cells[6].dataset.value = String(ratio);
    cells[6].title = `${fmt(r.tokens_written, "n")} tokens written in ${fmt(r.bytes_written, "bytes")}`;
    cells[7].textContent = fmt(r.errors + r.corruptions, "n");
    cells[7].title = `errors ${r.errors}, corruptions ${r.corruptions}, writes dropped ${r.writes_dropped}`;
    return tr;
  }));
}

function tenantsTable(rows) {
  const panel = document.getElementById("tenants-panel");
  panel.hidden = !rows || rows.length === 0;
  if (panel.hidden) return;
  const body = document.querySelector("#tenants tbody");
  body.replaceChildren(...rows.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.tenant = r.tenant;
    const cached = r.loaded_tokens + r.vllm_prefix_tokens;
    let evictions = 0;
    const meters = Object.entries(r.tiers || {}).map(([tier, part]) => {
      evictions += part.evictions;
      const div = document.createElement("div");
      div.className = "tenant-tier";
      const used = part.used_bytes, share = part.share_bytes;
      div.innerHTML = `<span class="tier-name"></span><div class="meter"><div class="meter-fill"></div></div>` +
        `<span class="meter-text"></span>`;
      div.querySelector(".tier-name").textContent = tier;
      const fill = div.querySelector(".meter-fill");
      fill.style.width = share ? Math.min(100, 100 * used / share).toFixed(1) + "%" : "0%";
      fill.style.background = used > share ? "#d9534f" : color(tier);
      const text = div.querySelector(".meter-text");
      text.textContent = `${fmt(used, "bytes")} / ${fmt(share, "bytes")}`;
      text.dataset.key = `tenants.${r.tenant}.${tier}.used_bytes`;
      text.dataset.value = String(used);
      div.title = `${r.tenant} holds ${fmt(used, "bytes")} of ${tier}; its quota or equal share: ` +
        `${fmt(share, "bytes")}; ${fmt(part.evictions, "n")} of its chunks evicted`;
      return div;
    });
    tr.innerHTML = "<td></td><td></td><td></td><td></td><td></td><td></td>";
    const cells = tr.children;
    cells[0].textContent = r.tenant;
    cells[1].textContent = fmt(r.hit_rate, "pct");
    cells[2].textContent = fmt(r.requested_tokens, "n");
    cells[3].textContent = fmt(cached, "n");
    cells[4].replaceChildren(...meters);
    if (!meters.length) cells[4].textContent = "no tier divided among tenants";
    cells[5].textContent = fmt(evictions, "n");
    return tr;
  }));
}

function routing(r, now) {
  const panel = document.getElementById("routing-panel");
  panel.hidden = !r;
  if (!r) return;
  bars("reasons", r.reasons, "n", "no request routed yet");
  const reuse = r.reuse || {};
  const el = document.getElementById("reuse");
  el.textContent = reuse.measured ?
    `${fmt(reuse.precision, "pct")} of the predicted tokens were reused, over ${reuse.measured} requests ` +
    `(predicted ${fmt(reuse.predicted_tokens, "n")}, reused ${fmt(reuse.reused_tokens, "n")})` :
    "no request has reported its reuse yet";
  el.dataset.key = "routing.reuse.precision";
  el.dataset.value = String(reuse.precision ?? "");
  const body = document.querySelector("#recent tbody");
  body.replaceChildren(...(r.recent || []).slice(-RECENT_ROWS).reverse().map((d) => {
    const tr = document.createElement("tr");
    for (const v of [fmt(now - d.t, "s"), d.engine, d.reason, fmt(d.tokens, "n"),
      fmt(d.predicted, "n"), d.reused === null ? "–" : fmt(d.reused, "n")]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    return tr;
  }));
}

function render(d) {
  for (const el of document.querySelectorAll("[data-key]")) {
    if (!el.dataset.format) continue;
    const v = at(d, el.dataset.key);
    el.textContent = fmt(v, el.dataset.format);
    el.dataset.value = v === null || v === undefined ? "" : String(v);
  }
  lineChart("hit", d.t, d.hit_rate, "pct", { y: { range: [0, 1] } });
  lineChart("saved", d.t, { "seconds saved": d.saved_s }, "s", { fill: true });
  lineChart("bytes", d.t, d.bytes_per_s, "bytes");
  lineChart("load", d.t, d.load, "n");
  ttftChart(d.ttft);
  bars("loaded", d.totals.loaded_tokens, "n", "no tokens loaded from kvtier's tiers yet");
  tiersTable(d.tiers);
  tenantsTable(d.tenants);
  routing(d.routing, d.updated);
  const down = d.engines.filter((e) => !e.up);
  const status = document.getElementById("status");
  status.className = "status " + (down.length ? "bad" : "ok");
  status.textContent = down.length ?
    `${down.length} of ${d.engines.length} engines not answering: ${down.map((e) => e.error).join("; ")}` :
    `${d.engines.length} engine${d.engines.length === 1 ? "" : "s"} · updated ` +
    new Date(d.updated * 1000).toLocaleTimeString();
  renders += 1;
  document.body.dataset.renders = String(renders);
  document.body.dataset.updated = String(d.updated);
  if (renders === 1) document.body.dataset.firstRenderMs = performance.now().toFixed(1);
}

async function poll() {
  let wait = 2000;
  try {
    const response = await fetch("api/data", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const d = await response.json();
    wait = 1000 * d.interval_s;
    render(d);
  } catch (err) {
    const status = document.getElementById("status");
    status.className = "status bad";
    status.textContent = `console data unavailable: ${err.message}`;
  }
  setTimeout(poll, wait);
}

poll();
