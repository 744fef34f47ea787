// The fleet view page: live from /api/events (server-sent events), read-only.
// Every text from the fleet goes into the DOM with text nodes (el() below): never innerHTML.
"use strict";
const state = { devices: new Map(), rollouts: new Map(), meta: null, offset: 0 };
const rowsById = new Map();
const COLORS = ["#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f"];
const PROBLEMS = ["offline", "behind", "failing", "refused", "unreachable", "disabled", "unexpected", "alerting"];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v; else node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === "") continue;
    node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
const now = () => Date.now() / 1000 + state.offset;
function ago(t) {
  if (t === null || t === undefined) return "";
  const s = Math.max(0, now() - t);
  return s < 120 ? `${s.toFixed(0)}s` : s < 7200 ? `${(s / 60).toFixed(0)}m` : `${(s / 3600).toFixed(1)}h`;
}
const fmt = (v, digits = 1, unit = "") => (v === null || v === undefined) ? "–" : `${Number(v).toFixed(digits)}${unit}`;
const devicePage = () => { const m = location.pathname.match(/^\/devices\/([^/]+)$/); return m ? decodeURIComponent(m[1]) : null; };

// ---- header: broker state, counts, skipped messages ----------------------------------------
function renderMeta() {
  const meta = state.meta; if (!meta) return;
  const broker = document.getElementById("broker");
  broker.textContent = `broker ${meta.broker.address} ${meta.broker.connected ? "connected" : "unreachable"}`;
  broker.className = "pill " + (meta.broker.connected ? "ok" : "down");
  const banner = document.getElementById("banner");
  if (!meta.broker.connected) {
    banner.hidden = false; banner.className = "broker";
    banner.textContent = `MQTT broker ${meta.broker.address} unreachable for ${ago(meta.broker.since)}` +
      (meta.broker.error ? ` (${meta.broker.error})` : "") + ": showing the last known state; it reconnects by itself.";
  } else if (banner.className === "broker") { banner.hidden = true; banner.className = ""; }
  const devices = [...state.devices.values()];
  const offline = devices.filter(d => d.online === false).length;
  const problems = devices.filter(d => d.problems.length).length;
  const alerts = devices.reduce((n, d) => n + d.alerts.length, 0);
  document.getElementById("summary").textContent =
    `${devices.length} devices · ${offline} offline · ${problems} with problems · ${alerts} alerts firing`;
  const skipped = document.getElementById("skipped");
  skipped.textContent = meta.ignored_total ? `${meta.ignored_total} messages skipped (` +
    Object.entries(meta.ignored).map(([k, v]) => `${k} ${v}`).join(", ") + ")" : "";
  skipped.title = meta.last_ignored_topic ? `last on ${meta.last_ignored_topic} (click to show)` : "";
  skipped.dataset.count = meta.ignored_total;
  const last = document.getElementById("skipped-topic");
  last.textContent = meta.last_ignored_topic ? `last skipped message was on topic ${meta.last_ignored_topic}` : "";
}

// ---- the fleet table -----------------------------------------------------------------------
function modelsCell(d) {
  return el("td", { class: "models" }, d.models.map(m => el("div", { "data-model": m.name },
    `${m.name}: `, m.desired && m.desired !== m.active ? `${m.desired} → ${m.active || "–"}` : (m.active || "–"),
    m.job ? el("span", { class: "small" }, ` (${m.job})`) : null)));
}
function updateCell(d) {
  const u = d.update, h = d.health;
  return el("td", { class: "update" },
    u ? el("div", {}, [u.state, u.model, u.version].filter(Boolean).join(" "),
      u.code ? el("div", { class: "refusal" }, `${u.code}${u.message ? ": " + u.message : ""}`) : null) : "–",
    h ? el("div", { class: "small health" }, `updates: ${h.health}` + (h.health !== "ok" && h.message ? ` (${h.message})` : "")) : null);
}
function telemetryCells(d) {
  const t = d.telemetry || {};
  return [
    el("td", { class: "num cpu" }, fmt(t.cpu_pct, 0, " %")),
    el("td", { class: "num mem" }, fmt(t.memory_pct, 0, " %")),
    el("td", { class: "num temp" }, fmt(t.temperature_c, 0, " °C")),
    el("td", { class: "num power", title: t.energy_source || "" }, fmt(t.power_w, 1, " W"),
      t.energy_method ? el("div", { class: "small" }, t.energy_method) : null),
    el("td", { class: "jpt" }, Object.entries(t.j_per_token || {}).filter(([, v]) => v !== null)
      .map(([m, v]) => el("div", { class: "small" }, `${m}: ${fmt(v, 3)} J`))),
  ];
}
function renderRow(d) {
  const flags = Object.entries(d.flags).map(([name, text]) => el("span", { class: `flag ${name}`, title: text || null },
    name, text ? `: ${text}` : ""));
  const alerts = d.alerts.map(a => el("span", { class: `flag alerting sev-${a.severity}`, title: a.message }, `alert ${a.rule}`));
  const online = d.online === null ? "?" : d.online ? `online ${ago(d.since)}` : `offline ${ago(d.since)}`;
  return el("tr", { "data-device": d.device, "data-online": String(d.online), "data-problems": d.problems.join(" "),
                    class: d.online === false ? "offline" : "" },
    el("td", { class: "device" }, el("a", { href: `/devices/${encodeURIComponent(d.device)}` }, d.device)),
    el("td", { class: "group" }, d.group || "–"),
    el("td", { class: `online ${d.online ? "yes" : "no"}`, "data-since": d.since },
      online, d.offline_reason ? el("div", { class: "small" }, d.offline_reason) : null),
    el("td", { class: "agent" }, d.agent_version || "–"),
    modelsCell(d), updateCell(d), ...telemetryCells(d),
    el("td", { class: "flags" }, flags, alerts, flags.length || alerts.length ? null : "ok"));
}
function matches(d) {
  const group = document.getElementById("f-group").value, st = document.getElementById("f-state").value;
  const problem = document.getElementById("f-problem").value;
  if (group && d.group !== group) return false;
  if (st === "online" && d.online !== true) return false;
  if (st === "offline" && d.online !== false) return false;
  if (problem === "any" && !d.problems.length) return false;
  if (problem === "none" && d.problems.length) return false;
  if (problem && !["any", "none"].includes(problem) && !d.problems.includes(problem)) return false;
  return true;
}
function fleetSkeleton() {
  const main = document.getElementById("main");
  main.replaceChildren(
    el("h2", {}, "Rollouts"), el("div", { id: "rollouts" }, el("p", { class: "small" }, "none")),
    el("p", { class: "small" }, "Read-only: this page has no operator authentication. Pause, resume or abort with `edgefleet hub rollout pause|resume|abort ID`."),
    el("h2", {}, "Devices"),
    el("div", { class: "filters" },
      el("label", {}, "group ", el("select", { id: "f-group" }, el("option", { value: "" }, "all"))),
      el("label", {}, "state ", el("select", { id: "f-state" }, ["", "online", "offline"].map(v => el("option", { value: v }, v || "all")))),
      el("label", {}, "problem ", el("select", { id: "f-problem" },
        el("option", { value: "" }, "all"), el("option", { value: "any" }, "any problem"), el("option", { value: "none" }, "none"),
        PROBLEMS.map(p => el("option", { value: p }, p)))),
      el("span", { id: "shown", class: "small" })),
    el("table", { id: "devices" }, el("thead", {}, el("tr", {}, ["device", "group", "online", "agent", "models (desired → active)",
      "update", "CPU", "memory", "temp", "power", "J/token", "problems"].map(h => el("th", {}, h)))), el("tbody", {})));
  for (const id of ["f-group", "f-state", "f-problem"]) document.getElementById(id).addEventListener("change", applyFilters);
}
function applyFilters() {
  let shown = 0;
  for (const [id, tr] of rowsById) { const ok = matches(state.devices.get(id)); tr.hidden = !ok; shown += ok; }
  document.getElementById("shown").textContent = `${shown} of ${rowsById.size} shown`;
}
function upsertRows(devices) {
  const tbody = document.querySelector("#devices tbody");
  for (const d of devices) {
    state.devices.set(d.device, d);
    const tr = renderRow(d);
    tr.hidden = !matches(d);
    const old = rowsById.get(d.device);
    if (old) old.replaceWith(tr);
    else {
      const next = [...rowsById.keys()].sort().find(k => k > d.device);
      tbody.insertBefore(tr, next ? rowsById.get(next) : null);
    }
    rowsById.set(d.device, tr);
  }
  const select = document.getElementById("f-group"), groups = new Set([...state.devices.values()].map(d => d.group).filter(Boolean));
  const have = new Set([...select.options].map(o => o.value));
  for (const g of [...groups].sort()) if (!have.has(g)) select.appendChild(el("option", { value: g }, g));
  document.getElementById("shown").textContent = `${[...rowsById.values()].filter(r => !r.hidden).length} of ${rowsById.size} shown`;
}

// ---- rollouts ------------------------------------------------------------------------------
function renderRollout(r) {
  const steps = el("span", { class: "steps" }, r.steps.map((s, i) => el("span", {
    class: i < r.step || r.state === "completed" ? "done" : i === r.step && r.state !== "aborted" ? "current" : "" }, `${s}%`)));
  const counts = Object.entries(r.counts).filter(([, v]) => v).map(([k, v]) => `${k} ${v}`).join(" · ");
  return el("div", { class: `rollout ${r.state}`, "data-rollout": r.id, "data-state": r.state },
    el("div", {}, el("strong", {}, r.id), ` ${r.group}: ${r.model} ${r.from_version || "(new)"} → ${r.to_version} `,
      el("span", { class: "rstate" }, r.state), " ", steps, ` step ${r.step + 1} of ${r.steps.length} (${r.percent}%)`),
    el("div", { class: "small counts" }, r.in_step ? `${r.in_step} devices in step: ${counts}` : "no device in the step yet"),
    r.reason ? el("div", { class: "reason" }, (["aborted", "completed"].includes(r.state) ? "why it stopped: " : "") + r.reason)
      : r.note ? el("div", { class: "small note" }, `${r.decision}: ${r.note}`) : null,
    r.failing.length ? el("div", { class: "small failing" }, "failing: ",
      r.failing.map(f => `${f.device} ${f.outcome}${f.code ? " (" + f.code + ")" : ""}`).join(", "),
      r.failing_total > r.failing.length ? ` and ${r.failing_total - r.failing.length} more` : "") : null);
}
function renderRollouts(list, ids) {
  for (const r of list) state.rollouts.set(r.id, r);
  for (const id of [...state.rollouts.keys()]) if (!ids.includes(id)) state.rollouts.delete(id);
  const box = document.getElementById("rollouts"); if (!box) return;
  const all = [...state.rollouts.values()].sort((a, b) => (b.created_at || 0) - (a.created_at || 0));
  box.replaceChildren(...(all.length ? all.map(renderRollout) : [el("p", { class: "small" }, "none")]));
}

// ---- one device: details, charts, job history ----------------------------------------------
function chart(title, series, unit) {
  const W = 300, H = 110, all = series.flatMap(s => s.points);
  const box = el("div", { class: "chart", "data-chart": title }, el("div", {}, title));
  if (!all.length) { box.appendChild(el("div", { class: "small" }, "no data yet")); return box; }
  const t0 = Math.min(...all.map(p => p[0])), t1 = Math.max(...all.map(p => p[0])) || t0 + 1;
  const v0 = Math.min(0, ...all.map(p => p[1])), v1 = Math.max(...all.map(p => p[1])) || 1;
  const x = t => 30 + (W - 35) * (t1 > t0 ? (t - t0) / (t1 - t0) : 1), y = v => H - 12 - (H - 20) * (v - v0) / ((v1 - v0) || 1);
  const NS = "http://www.w3.org/2000/svg", svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const text = (tx, ty, s) => { const n = document.createElementNS(NS, "text"); n.setAttribute("x", tx); n.setAttribute("y", ty);
    n.setAttribute("font-size", "9"); n.setAttribute("fill", "#666"); n.textContent = s; svg.appendChild(n); };
  text(0, 10, `${fmt(v1, 2)}${unit}`); text(0, H - 12, `${fmt(v0, 2)}${unit}`); text(30, H - 1, `${ago(t0)} ago`); text(W - 30, H - 1, "now");
  series.forEach((s, i) => { const line = document.createElementNS(NS, "polyline");
    line.setAttribute("points", s.points.map(p => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "));
    line.setAttribute("stroke", COLORS[i % COLORS.length]); svg.appendChild(line); });
  box.appendChild(svg);
  if (series.length > 1) box.appendChild(el("div", { class: "small" }, series.map((s, i) => {
    const key = el("span", {}, `${i ? " · " : ""}■ ${s.name}`); key.style.color = COLORS[i % COLORS.length]; return key; })));
  return box;
}
async function renderDevice(id) {
  const response = await fetch(`/api/devices/${encodeURIComponent(id)}`);
  const main = document.getElementById("main");
  if (!response.ok) { main.replaceChildren(el("p", {}, `No device ${id} has reported (yet).`)); return; }
  const body = await response.json(), d = body.device, t = d.telemetry || {}, s = body.series;
  state.devices.set(d.device, d);
  const jpt = Object.keys(s).filter(k => k.startsWith("j_per_token:")).map(k => ({ name: k.slice(12), points: s[k] }));
  main.replaceChildren(
    el("p", {}, el("a", { href: "/" }, "← fleet")),
    el("h2", { id: "device-title" }, d.device),
    el("table", { id: "devices" }, el("tbody", {}, renderRow(d))),
    el("h2", {}, "History"),
    el("div", { class: "charts" },
      chart("power (W)", [{ name: "power", points: s.power_w || [] }], " W"),
      chart("energy per token (J)", jpt, " J"),
      chart("tokens/s", [{ name: "tokens/s", points: s.tokens_per_s || [] }], ""),
      chart("memory (%)", [{ name: "memory", points: s.memory_pct || [] }], " %"),
      chart("temperature (°C)", [{ name: "temperature", points: s.temperature_c || [] }], " °C")),
    el("p", { class: "small" }, t.energy_source ? `energy source: ${t.energy_method}: ${t.energy_source}` : ""),
    el("h2", {}, "Alerts firing"),
    d.alerts.length ? el("ul", {}, d.alerts.map(a => el("li", { class: `sev-${a.severity}` }, `${a.rule} (${a.severity}, ${ago(a.since)}): ${a.message}`)))
      : el("p", { class: "small" }, "none"),
    el("h2", {}, "Update jobs"),
    el("table", { id: "jobs" }, el("thead", {}, el("tr", {}, ["received", "job", "model", "version", "state", "code", "message"].map(h => el("th", {}, h)))),
      el("tbody", {}, body.jobs.map(j => el("tr", {}, el("td", {}, `${ago(j.received_at)} ago`), el("td", {}, j.job || "–"),
        el("td", {}, j.model || "–"), el("td", {}, `${j.from_version || ""} → ${j.version || ""}`), el("td", {}, j.state),
        el("td", {}, j.code || ""), el("td", {}, j.message || "")))))
  );
}

// ---- live ----------------------------------------------------------------------------------
let deviceTimer = null;
function apply(body, snapshot) {
  state.meta = body.meta; state.offset = body.meta.now - Date.now() / 1000;
  const one = devicePage();
  if (one) {
    if (body.devices.some(d => d.device === one) && !deviceTimer) deviceTimer = setTimeout(() => { deviceTimer = null; renderDevice(one); }, 1000);
    for (const d of body.devices) state.devices.set(d.device, d);
  } else {
    if (snapshot) { rowsById.clear(); state.devices.clear(); document.querySelector("#devices tbody").replaceChildren(); }
    upsertRows(body.devices); renderRollouts(body.rollouts, body.rollout_ids);
  }
  renderMeta();
}
function connect() {
  const source = new EventSource("/api/events");
  source.addEventListener("snapshot", e => { apply(JSON.parse(e.data), true); document.body.dataset.live = "yes"; });
  source.addEventListener("update", e => apply(JSON.parse(e.data), false));
  source.onerror = () => {
    document.body.dataset.live = "no";
    const banner = document.getElementById("banner");
    if (banner.className !== "broker") { banner.hidden = false; banner.className = "page"; banner.textContent = "Lost the connection to the fleet view server; retrying…"; }
  };
  source.onopen = () => { const b = document.getElementById("banner"); if (b.className === "page") { b.hidden = true; b.className = ""; } };
}
document.getElementById("skipped").addEventListener("click", () => {
  const last = document.getElementById("skipped-topic"); last.hidden = !last.hidden; });
const id = devicePage();
if (id) renderDevice(id); else fleetSkeleton();
connect();
setInterval(() => { if (!devicePage()) for (const [i, tr] of rowsById) { const d = state.devices.get(i); const td = tr.querySelector("td.online");
  if (d && td && d.since) td.firstChild.textContent = `${d.online ? "online" : "offline"} ${ago(d.since)}`; } renderMeta(); }, 5000);
