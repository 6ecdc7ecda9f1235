// The fleet view of `bootstrap serve`: vanilla JS, no framework, nothing fetched but our own API.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { selected: null, provenance: null, timer: null };

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const short = (s, n = 16) => (s && s.length > n ? s.slice(0, n) + "…" : s || "");
// ISO 8601 UTC to the second: a fleet spans days and time zones, a bare local time does not say which
const when = (t) => (t ? new Date(t * 1000).toISOString().replace(/\.\d+Z$/, "Z") : "");

async function api(path, opts) {
  const r = await fetch(path, Object.assign({ headers: { Accept: "application/json" } }, opts || {}));
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.status);
  return body;
}

function appraisalCell(d) {
  const a = d.appraisal;
  if (!a) return el("td", { "data-col": "appraisal" }, el("span", { class: "status none" }, d.ready ? "pending" : "—"));
  const checks = el("ul", { class: "checks" },
    (a.checks || []).map((c) => el("li", { class: c.status, "data-check": c.check },
      `${c.check}: ${c.status}: ${c.reason}`)));
  const btn = el("button", { onclick: (ev) => { ev.stopPropagation(); appraise(d.mac); } }, "appraise now");
  return el("td", { class: "appraisal", "data-col": "appraisal" },
    el("span", { class: `status ${a.status}`, "data-status": a.status }, a.status), " ", when(a.time), " ", btn, checks);
}

function resultsCell(d) {
  return el("td", { "data-col": "results" }, el("ul", { class: "results" }, d.results.map((r) =>
    el("li", {}, `${r.definition} = ${short(r.value, 60)} `,
      r.cid ? el("a", { class: "prov", "data-cid": r.cid, onclick: (ev) => { ev.stopPropagation(); showProvenance(r.cid); } },
        "provenance") : null))));
}

function problemsCell(d) {
  const items = d.problems.map((p) => el("li", { class: p.kind === "veto" ? "warning" : "contraindicated",
    "data-kind": p.kind }, `${p.stage} ${p.kind}: ${p.reason}`, p.cid ? el("code", {}, ` ${short(p.cid, 20)}`) : null));
  for (const r of d.rejected) {
    items.push(el("li", { class: "rejected", "data-kind": "rejected-event" }, `rejected ${r.stage} ${r.kind} event: ${r.reason}`));
  }
  return el("td", { "data-col": "problems" }, el("ul", { class: "problems" }, items));
}

function renderFleet(devices) {
  const body = $("#fleet tbody");
  body.replaceChildren(...devices.map((d) => el("tr", {
    class: "device" + (state.selected === d.mac ? " selected" : ""), "data-mac": d.mac,
    onclick: () => selectDevice(d.mac),
  },
  el("td", { class: "mono", title: d.device_id || "", "data-col": "device" }, d.device_id ? short(d.device_id) : "(no DICE id)"),
  el("td", { class: "mono", "data-col": "mac" }, d.mac),
  el("td", { "data-col": "role" }, d.role || (d.appraisal && d.appraisal.registered_role) || ""),
  el("td", { "data-col": "arch" }, d.arch || ""),
  el("td", { "data-col": "firmware" }, d.firmware || ""),
  el("td", { "data-col": "stage" }, `${d.stage} ${d.phase || d.kind}`),
  el("td", { "data-col": "last-event" }, d.last_event || "", el("br"), el("small", {}, when(d.last_seen))),
  el("td", { class: d.trust, "data-col": "events" }, d.trust, " ", d.boot_mode || ""),
  appraisalCell(d), resultsCell(d), problemsCell(d))));
  $("#updated").textContent = `updated ${when(Date.now() / 1000)}`;
}

async function refresh() {
  try {
    const { devices } = await api("/api/devices");
    renderFleet(devices);
    if (state.selected) await selectDevice(state.selected, true);
    if (!state.provenance) {
      const first = devices.flatMap((d) => d.results).find((r) => r.cid);
      if (first) await showProvenance(first.cid);
    }
    document.body.dataset.loaded = "yes";
  } catch (e) {
    $("#updated").textContent = `error: ${e.message}`;
  }
}

function soon() {
  clearTimeout(state.timer);
  state.timer = setTimeout(refresh, 200);
}

async function selectDevice(mac, quiet) {
  state.selected = mac;
  const d = await api(`/api/devices/${encodeURIComponent(mac)}?limit=200`);
  $("#timeline-section").hidden = false;
  $("#timeline-device").textContent = mac;
  $("#timeline").replaceChildren(...d.events.map((e) => el("li", { class: e.trust, "data-kind": e.kind, "data-stage": e.stage,
    "data-trust": e.trust },
    `${when(e.received)} ${e.stage} ${e.kind} `,
    el("span", { class: `status ${e.trust}` }, e.trust),
    e.trust === "verified" ? "" : ` (${e.trust_reason})`,
    Object.keys(e.detail).length ? el("code", {}, " " + Object.entries(e.detail).map(([k, v]) => `${k}=${short(v, 80)}`).join(" ")) : "")));
  if (!quiet) for (const tr of document.querySelectorAll("tr.device")) tr.classList.toggle("selected", tr.dataset.mac === mac);
}

async function appraise(mac) {
  await api(`/api/devices/${encodeURIComponent(mac)}/appraise`, { method: "POST" });
  soon();
}

// -- provenance graph: parents to the left, the result on the right -------------------------
async function showProvenance(cid) {
  state.provenance = cid;
  if (!location.hash.includes(`prov=${cid}`)) location.hash = `prov=${cid}`;
  const g = await api(`/api/provenance/${cid}`);
  $("#provenance-section").hidden = false;
  $("#provenance-root").textContent = cid;
  drawGraph(g);
}

function drawGraph(g) {
  const byCid = new Map(g.nodes.map((n) => [n.cid, n]));
  const depth = new Map([[g.root, 0]]);
  const queue = [g.root];
  while (queue.length) {           // longest distance from the result: a parent left of every child
    const c = queue.shift();
    const n = byCid.get(c);
    for (const p of (n && n.parents) || []) {
      const d = depth.get(c) + 1;
      if (!depth.has(p) || depth.get(p) < d) { depth.set(p, d); if (d < 64) queue.push(p); }
    }
  }
  const maxDepth = Math.max(0, ...depth.values());
  const cols = new Map();
  for (const n of g.nodes) {
    const d = depth.has(n.cid) ? depth.get(n.cid) : maxDepth;
    if (!cols.has(d)) cols.set(d, []);
    cols.get(d).push(n);
  }
  const W = 230, H = 64, GX = 70, GY = 18;
  const pos = new Map();
  let rows = 0;
  for (const [d, list] of cols) {
    list.forEach((n, i) => pos.set(n.cid, { x: 10 + (maxDepth - d) * (W + GX), y: 10 + i * (H + GY) }));
    rows = Math.max(rows, list.length);
  }
  const svgNS = "http://www.w3.org/2000/svg";
  const mk = (tag, attrs, text) => {
    const e = document.createElementNS(svgNS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const svg = mk("svg", { width: 20 + (maxDepth + 1) * (W + GX), height: 20 + rows * (H + GY) + H, "data-root": g.root });
  for (const e of g.edges) {
    const a = pos.get(e.from), b = pos.get(e.to);
    if (!a || !b) continue;
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
    const dip = x2 - x1 > W + GX ? H * 0.9 : 0;  // an edge that skips a column bends around the boxes between
    svg.append(mk("path", { d: `M${x1},${y1} C${x1 + GX},${y1 + dip} ${x2 - GX},${y2 + dip} ${x2},${y2}`,
      class: "edge", "data-from": e.from, "data-to": e.to }));
  }
  for (const n of g.nodes) {
    const p = pos.get(n.cid);
    const kind = n.origin === "flow" ? "flow" : n.operation ? "op" : "seed";
    const forged = n.signature && n.signature.status !== "verified";
    const grp = mk("g", { class: `node ${kind}${forged ? " forged" : ""}`, "data-cid": n.cid,
      "data-definition": n.definition, transform: `translate(${p.x},${p.y})` });
    grp.append(mk("rect", { width: W, height: H, rx: 6 }));
    grp.append(mk("text", { x: 8, y: 17, "font-weight": 600 }, n.definition));
    grp.append(mk("text", { x: 8, y: 33 }, kind === "flow" ? "the flow" : kind === "seed" ? "seed" : `by ${n.operation}`));
    const who = n.producer_device ? `producer ${n.producer_device}` : n.producer ? `producer ${short(n.producer, 12)}` : "";
    grp.append(mk("text", { x: 8, y: 49 }, `${who} ${n.signature ? n.signature.status : ""}`));
    grp.append(mk("title", {}, `${n.cid}\n${n.value !== undefined ? JSON.stringify(n.value) : ""}`));
    if (kind !== "flow") grp.addEventListener("click", () => showNode(n.cid));
    svg.append(grp);
  }
  $("#provenance").replaceChildren(svg);
  if (Object.keys(g.errors || {}).length) {
    $("#provenance").append(el("p", { class: "contraindicated" }, "missing: " + JSON.stringify(g.errors)));
  }
}

async function showNode(cid) {
  const n = await api(`/api/node/${cid}`);
  if (state.provenance && !location.hash.includes(`node=${cid}`)) location.hash = `prov=${state.provenance}&node=${cid}`;
  const pre = $("#node-detail");
  pre.hidden = false;
  pre.dataset.cid = cid;
  pre.dataset.signature = n.signature ? n.signature.status : "";
  pre.replaceChildren(el("a", { href: n.raw, class: "raw" }, "signed node (raw DAG-CBOR block)"), "\n",
    `${n.definition} = ${JSON.stringify(n.value)}  ${n.operation ? "by " + n.operation : "seed"}  signature ${n.signature.status}: ${n.signature.reason}\n`,
    JSON.stringify(n, null, 2));
}

function live() {
  const es = new EventSource("/api/stream");
  es.onopen = () => { $("#live").textContent = "live"; $("#live").className = "live on"; };
  es.onmessage = soon;
  es.onerror = () => { $("#live").textContent = "reconnecting"; $("#live").className = "live off"; };
}

// deep links: /?device=MAC opens that device's timeline, #prov=CID a result's graph, &node=CID one signed node
const m = /prov=([a-z0-9]+)/.exec(location.hash);
const nodeLink = /node=([a-z0-9]+)/.exec(location.hash);
if (m) showProvenance(m[1]).then(() => (nodeLink ? showNode(nodeLink[1]) : null)).catch(() => {});
const deviceLink = new URLSearchParams(location.search).get("device");
if (deviceLink) selectDevice(deviceLink).catch(() => {});
refresh();
if (!new URLSearchParams(location.search).has("static")) live();
else $("#live").textContent = "static (no live updates)";
