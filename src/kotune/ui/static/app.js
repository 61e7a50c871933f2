// kotune ui: four pages over the JSON API (server.py). Plain DOM and SVG, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;
const CURVES = [
  { id: "loss", title: "Loss", keys: ["loss", "eval_loss"] },
  { id: "lr", title: "Learning rate", keys: ["lr"] },
  { id: "tokens_per_s", title: "Tokens per second (input, trained)", keys: ["input_tokens_per_s", "tokens_per_s"] },
  { id: "memory", title: "GPU memory (GiB, peak)", keys: ["peak_allocated_gib", "peak_reserved_gib"] },
];
const COLOURS = ["#1f7ae0", "#e0701f", "#1f9d55", "#6b4fbb"];
let timer = null;

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json", "X-Kotune": "1" },
  };
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

const fmt = (v, digits = 4) => (v === null || v === undefined ? "–" : Number(v).toPrecision(digits));
function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.round((s % 3600) / 60)}m` : s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
}
const runLink = (name) => "#run/" + name.split("/").map(encodeURIComponent).join("/");

// -- pages -------------------------------------------------------------------------------------------
function show(page) {
  for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== "page-" + page;
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.id === "nav-" + (page === "run" ? "runs" : page));
}

async function route() {
  clearInterval(timer);
  const hash = decodeURIComponent(location.hash.slice(1)) || "runs";
  if (hash.startsWith("run/")) {
    show("run"); const name = hash.slice(4);
    $("run-predicted").hidden = true;
    $("run-predict").onclick = () => predict("run/" + name, $("run-plan-gpu").value, $("run-predicted"));
    await fillGpus($("run-plan-gpu")); await showRun(name); timer = setInterval(() => showRun(name), POLL_MS);
  }
  else if (hash === "data") { show("data"); await fillConfigs($("data-config")); }
  else if (hash === "launch") { show("launch"); await openLaunch(); timer = setInterval(showRecent, POLL_MS); }
  else if (hash === "chat") { show("chat"); await fillModels(); }
  else { show("runs"); await showRuns(); timer = setInterval(showRuns, POLL_MS); }
}

// -- runs --------------------------------------------------------------------------------------------
async function showRuns() {
  const data = await api("/api/runs");
  $("root").textContent = data.root;
  const body = $("runs-table").tBodies[0];
  body.replaceChildren(...data.runs.map((r) => el("tr", { "data-run": r.name },
    el("td", {}, el("a", { href: runLink(r.name), text: r.name })),
    el("td", {}, el("span", { class: "state " + r.state, text: r.state })),
    el("td", { text: r.total_steps ? `${r.step} / ${r.total_steps}` : String(r.step) }),
    el("td", { text: fmt(r.loss) }), el("td", { text: fmt(r.eval_loss) }),
    el("td", { text: duration(r.eta_s) }), el("td", { text: r.checkpoints.join(", ") || "–" }))));
  $("runs-empty").hidden = data.runs.length > 0;
}

async function showRun(name) {
  let run;
  try { run = await api("/api/runs/" + name.split("/").map(encodeURIComponent).join("/")); }
  catch (e) { $("run-name").textContent = name; $("run-progress").textContent = e.message; return; }
  $("run-name").textContent = run.name;
  const state = $("run-state");
  state.textContent = run.state; state.className = "state " + run.state;
  const done = run.done === null ? "" : ` (${Math.round(100 * run.done)}%)`;
  $("run-progress").textContent = `step ${run.step}${run.total_steps ? " of " + run.total_steps : ""}${done}` +
    (run.state === "running" ? ` · ETA ${duration(run.eta_s)}` : "") + (run.checkpoints.length ? ` · checkpoints: ${run.checkpoints.join(", ")}` : "");
  $("run-stop").disabled = run.state !== "running";
  $("run-resume").disabled = !(run.state === "interrupted" || run.state === "failed") || !run.checkpoints.length;
  $("run-stop").onclick = () => act(`/api/runs/${run.name}/stop`, "stop signal sent; the run saves a checkpoint and ends");
  $("run-resume").onclick = () => act(`/api/runs/${run.name}/resume`, "resumed");
  drawCharts(run.metrics);
  $("run-plan").replaceChildren(...Object.entries(run.plan || {}).map(([k, v]) => el("tr", {}, el("td", { text: k }), el("td", { text: String(v) }))));
  const pending = `(written when the run finishes; the Data page shows it now for run/${run.name})`;
  $("run-audit").replaceChildren(...(run.audit.length ? run.audit : [pending]).map((line) => el("li", { text: line })));
  $("run-evals").replaceChildren(...(run.evals.length ? run.evals.map(evalTable) : [el("p", { class: "note", text: "No eval report in this run folder (kotune eval RUN --out RUN/eval)." })]));
  $("run-launches").replaceChildren(...(run.launches.length ? run.launches.map(launchView) : [el("p", { class: "note", text: "None: this run was started outside the page." })]));
  $("run-config").textContent = run.config;
}

function launchView(l) {
  return el("div", { class: "launch" },
    el("p", {}, "Ran ", el("code", { class: "command", text: l.command }), ` for `, el("a", { href: runLink(l.run), text: l.run }),
      ` (pid ${l.pid}, ${new Date(l.started * 1000).toLocaleString()})`),
    el("pre", { class: "log", text: l.output }));
}

async function act(path, done) {
  try { await api(path, {}); $("run-message").textContent = done; }
  catch (e) { $("run-message").textContent = e.message; }
}

function evalTable(report) {
  const rows = report.table.trim().split("\n").filter((l) => l.startsWith("|") && !/^\|[-|]+\|$/.test(l));
  const cells = (line) => line.slice(1, -1).split("|").map((c) => c.trim());
  const table = el("table", { class: "eval" }, ...rows.map((line, i) => el("tr", {}, ...cells(line).map((c) => el(i ? "td" : "th", { text: c })))));
  const title = report.compared_with ? `${report.where}: ${report.model} compared with ${report.compared_with}` : `${report.where}: ${report.model}`;
  const notes = report.table.split("\n").filter((l) => l.startsWith("Not comparable"));
  return el("div", {}, el("h3", { text: title }), table, ...notes.map((n) => el("p", { class: "note", text: n })));
}

// -- charts: one SVG per curve, redrawn whole on each poll ------------------------------------------
function drawCharts(records) {
  const box = $("charts");
  box.replaceChildren(...CURVES.map((curve) => chart(curve, records)));
}

function chart(curve, records) {
  const series = curve.keys.map((key) => records.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]));
  const points = series.reduce((n, s) => n + s.length, 0);
  const card = el("div", { class: "chart", id: "chart-" + curve.id, "data-points": String(points) }, el("h3", { text: curve.title }));
  if (!points) { card.append(el("p", { class: "note", text: curve.id === "memory" ? "not logged (no GPU)" : "nothing logged yet" })); return card; }
  const all = series.flat();
  const [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const W = 400, H = 180, L = 52, B = 20;
  const sx = (x) => L + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (W - L - 8);
  const sy = (y) => 6 + (1 - (y - y0) / (y1 - y0)) * (H - B - 10);
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const add = (tag, attrs, text) => { const n = document.createElementNS(NS, tag); for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v); if (text) n.textContent = text; svg.append(n); return n; };
  add("line", { x1: L, y1: H - B, x2: W, y2: H - B, stroke: "#b8c0cf" });
  add("line", { x1: L, y1: 4, x2: L, y2: H - B, stroke: "#b8c0cf" });
  const digits = Math.min(8, Math.max(3, Math.ceil(Math.log10(Math.max(Math.abs(y0), Math.abs(y1)) / (y1 - y0))) + 2));
  add("text", { x: L - 4, y: 12, "text-anchor": "end", "font-size": 10 }, fmt(y1, digits));
  add("text", { x: L - 4, y: H - B, "text-anchor": "end", "font-size": 10 }, fmt(y0, digits));
  add("text", { x: L, y: H - 4, "font-size": 10 }, `step ${x0}`);
  add("text", { x: W - 4, y: H - 4, "text-anchor": "end", "font-size": 10 }, `step ${x1}`);
  series.forEach((s, i) => {
    if (!s.length) return;
    const d = s.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    add("path", { d, class: "line series-" + curve.keys[i], stroke: COLOURS[i], "data-points": s.length });
    if (s.length === 1) add("circle", { cx: sx(s[0][0]), cy: sy(s[0][1]), r: 3, fill: COLOURS[i] });
    add("text", { x: W - 4, y: 14 + 12 * i, "text-anchor": "end", "font-size": 10, fill: COLOURS[i] }, curve.keys[i]);
  });
  card.append(svg);
  return card;
}

// -- kotune plan: predicted memory and time of a config on a GPU -----------------------------------------
async function fillGpus(select) {
  if (select.options.length) return;
  const { gpus } = await api("/api/gpus");
  select.replaceChildren(el("option", { value: "", text: "this machine's GPU" }), ...gpus.map((g) => el("option", { value: g, text: g })));
}

async function predict(config, gpu, out) {
  out.hidden = false;
  out.textContent = "kotune plan: tokenizing and estimating…";
  try {
    const result = await api(`/api/plan?config=${encodeURIComponent(config)}&gpu=${encodeURIComponent(gpu)}`);
    out.textContent = result.lines.join("\n");
    out.className = result.fits ? "" : "error";
  } catch (e) { out.textContent = e.message; out.className = "error"; }
}

// -- data --------------------------------------------------------------------------------------------
async function fillConfigs(select) {
  const { configs } = await api("/api/configs");
  const keep = select.value;
  select.replaceChildren(...configs.map((c) => el("option", { value: c, text: c })));
  if (configs.includes(keep)) select.value = keep;
}

async function showPreview() {
  const config = $("data-config").value;
  if (!config) return;
  $("data-status").textContent = "tokenizing…";
  try {
    const data = await api(`/api/preview?config=${encodeURIComponent(config)}&split=${$("data-split").value}&limit=5`);
    $("data-status").textContent = `${data.count} rows in this split; the first ${data.rows.length} as training sees them`;
    $("data-rows").replaceChildren(...data.rows.map((r) => el("div", { class: "row", "data-row": r.row },
      el("div", { class: "head", text: `row ${r.row}: ${r.tokens} tokens, ${r.trained} trained` }),
      el("div", { class: "text" }, ...r.spans.map((s) => el("span", { class: s.trained ? "trained" : "masked", "data-tokens": s.tokens, text: s.text }))))));
    $("data-findings").replaceChildren(...data.findings.map((f) => el("li", { class: f.level, text: `${f.level}: ${f.message}` })));
  } catch (e) { $("data-status").textContent = e.message; $("data-status").className = "error"; }
}

// -- launch ------------------------------------------------------------------------------------------
let checkTimer = null;
async function showRecent() {
  const { launches } = await api("/api/launches");
  $("launch-recent").replaceChildren(...(launches.length ? launches.map(launchView) : [el("p", { class: "note", text: "None yet." })]));
}

async function openLaunch() {
  await fillConfigs($("launch-config"));
  await fillGpus($("launch-plan-gpu"));
  await showRecent();
  if (!$("launch-yaml").value && $("launch-config").value) await loadConfigText();
}

async function loadConfigText() {
  const { text } = await api("/api/configs/" + $("launch-config").value);
  $("launch-yaml").value = text;
  await checkYaml();
}

async function checkYaml() {
  const result = await api("/api/configs/check", { text: $("launch-yaml").value });
  const box = $("launch-check");
  box.textContent = result.ok ? "config OK (kotune's own checks)" : result.error;
  box.className = result.ok ? "ok" : "error";
  return result.ok;
}

async function startFromEditor(resume) {
  try {
    const saved = await api("/api/configs/save", { name: $("launch-name").value, text: $("launch-yaml").value });
    const record = await api("/api/launch", { config: saved.config, resume });
    $("launch-command").textContent = record.command;
    $("launch-check").textContent = `started ${record.run} (pid ${record.pid})`;
    $("launch-check").className = "ok";
    const link = el("a", { href: runLink(record.run), id: "launch-open", text: " open the run" });
    $("launch-check").append(link);
  } catch (e) { $("launch-check").textContent = e.message; $("launch-check").className = "error"; }
}

// -- chat --------------------------------------------------------------------------------------------
let chatAbort = null;
async function fillModels() {
  const { models } = await api("/api/models");
  const keep = $("chat-model").value;
  $("chat-model").replaceChildren(...models.map((m) => el("option", { value: m, text: m })));
  if (models.includes(keep)) $("chat-model").value = keep;
}

async function sendChat(event) {
  event.preventDefault();
  const message = $("chat-input").value.trim();
  if (!message || chatAbort) return;
  $("chat-input").value = "";
  $("chat-log").append(el("div", { class: "msg user", text: message }));
  const reply = el("div", { class: "msg assistant" });
  $("chat-log").append(reply);
  chatAbort = new AbortController();
  $("chat-stop").disabled = false; $("chat-send").disabled = true;
  try {
    const response = await fetch("/api/chat", { method: "POST", signal: chatAbort.signal,
      headers: { "Content-Type": "application/json", "X-Kotune": "1" },
      body: JSON.stringify({ model: $("chat-model").value, message }) });
    if (!response.ok) throw new Error((await response.json()).error);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      reply.textContent += decoder.decode(value, { stream: true });
      $("chat-log").scrollTop = $("chat-log").scrollHeight;
    }
    reply.dataset.done = "1";
  } catch (e) {
    reply.append(e.name === "AbortError" ? el("span", { class: "note", text: " [stopped]" }) : el("div", { class: "error", text: e.message }));
    reply.dataset.done = e.name === "AbortError" ? "stopped" : "error";
  } finally {
    chatAbort = null; $("chat-stop").disabled = true; $("chat-send").disabled = false;
  }
}

async function stopChat() {
  if (chatAbort) chatAbort.abort();
  await api("/api/chat/stop", {});
}

// -- wiring ------------------------------------------------------------------------------------------
$("data-show").onclick = showPreview;
$("launch-config").onchange = loadConfigText;
$("launch-yaml").oninput = () => { clearTimeout(checkTimer); checkTimer = setTimeout(checkYaml, 400); };
$("launch-predict").onclick = () => predict($("launch-config").value, $("launch-plan-gpu").value, $("launch-predicted"));
$("launch-start").onclick = () => startFromEditor(false);
$("launch-resume").onclick = () => startFromEditor(true);
$("chat-form").onsubmit = sendChat;
$("chat-stop").onclick = stopChat;
$("chat-reset").onclick = () => { api("/api/chat/reset", {}); $("chat-log").replaceChildren(); };
window.addEventListener("hashchange", route);
route();
