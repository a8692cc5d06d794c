// The explorer page: tokens of a prompt as chips; a click reads that token's state with Patchscopes.
// All model work goes through the server's job queue (/api/jobs): progress is polled, and Cancel stops it.
"use strict";
const state = { prompt: null, position: null, jobs: new Set(), info: null };
const $ = (id) => document.getElementById(id);

async function api(method, path, body) {
  const response = await fetch(path, { method, headers: { "Content-Type": "application/json" },
                                       body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await response.json(); } catch (error) { data = null; }
  if (!response.ok || data === null) {
    throw (data && data.error) || { field: "request", message: `${response.status} ${response.statusText}` };
  }
  return data;
}

function showWarnings(list) {
  $("warning").textContent = (list || []).join("; ");
}

function showError(error) {
  $("error").textContent = error ? `${error.field}: ${error.message}` : "";
}

function busy() {
  const working = state.jobs.size > 0;
  $("status").textContent = working ? "working" : "ready";
  $("cancel").disabled = !working;
  if (!working) { $("progress").value = 0; $("progress-text").textContent = ""; }
}

function query(kind) {
  return { kind, prompt: state.prompt, position: state.position, preset: $("preset").value,
           target_prompt: $("preset").value === "custom" ? $("target-prompt").value : null,
           variant: $("variant").value, verify: $("verify").checked };
}

async function runJob(kind, position, onDone) {
  const body = query(kind);
  if (position !== undefined) body.position = position;
  let id;
  try {
    const made = await api("POST", "/api/jobs", body);
    id = made.id; showWarnings(made.warnings);
  } catch (error) { showError(error); return; }
  state.jobs.add(id); busy();
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, 120));
    let job;
    try { job = await api("GET", `/api/jobs/${id}`); } catch (error) { showError(error); break; }
    $("progress").value = job.progress;
    $("progress-text").textContent = `${kind} ${Math.round(job.progress * 100)}%`;
    if (job.state === "done") { onDone(job.result); break; }
    if (job.state === "error") { showError(job.error); break; }
    if (job.state === "cancelled") { $("error").textContent = `${kind}: cancelled`; break; }
  }
  state.jobs.delete(id); busy();
}

async function tokenize() {
  showError(null);
  const prompt = $("prompt").value;
  let data;
  try { data = await api("POST", "/api/tokens", { prompt }); } catch (error) { showError(error); return; }
  showWarnings(data.warnings);
  state.prompt = prompt; state.position = null;
  const box = $("tokens"); box.replaceChildren();
  for (const token of data.tokens) {
    const chip = document.createElement("span");
    chip.className = "chip" + (token.special ? " special" : "");
    chip.dataset.index = token.index;
    chip.textContent = token.label;
    chip.title = `position ${token.index}`;
    if (!token.special) chip.addEventListener("click", () => select(token.index));
    box.appendChild(chip);
  }
  runJob("jacobian", -1, drawJacobian);
}

function drawJacobian(result) {
  const box = $("jacobian"); box.replaceChildren();
  for (const token of result.tokens) {
    const chip = document.createElement("span");
    chip.className = "jchip"; chip.dataset.index = token.index; chip.textContent = token.label;
    chip.style.background = `rgba(214, 39, 40, ${0.08 + 0.8 * token.shade})`;
    chip.title = `score ${token.score.toPrecision(3)}: click to read this token with Patchscopes`;
    chip.addEventListener("click", () => select(token.index));
    box.appendChild(chip);
  }
  const note = document.createElement("span");
  note.className = "hint"; note.textContent = ` → predicts ${result.prediction_label} (${result.variant})`;
  box.appendChild(note);
}

function select(index) {
  showError(null);
  state.position = index;
  for (const chip of document.querySelectorAll(".chip, .jchip")) {
    chip.classList.toggle("selected", Number(chip.dataset.index) === index);
  }
  $("layers").replaceChildren(); $("heatmap").replaceChildren();
  runJob("layers", index, (result) => PatchscopesTable.render($("layers"), result.table, {}));
  runJob("grid", index, (result) => PatchscopesHeatmap.render($("heatmap"), result.grid,
                                                             { onClick: (i, j) => showCell(result.grid, i, j) }));
}

async function showCell(grid, i, j) {
  const body = { ...query("grid"), source_layer: grid.rows[i], target_layer: grid.cols[j] };
  let made;
  try { made = await api("POST", "/api/spec", body); } catch (error) { showError(error); return; }
  $("cell-spec").textContent = made.json;
  $("python-line").textContent = made.python;
  $("cli-line").textContent = made.cli;
  $("download-spec").href = "data:application/json;charset=utf-8," + encodeURIComponent(made.json);
}

async function cancelAll() {
  for (const id of state.jobs) { try { await api("DELETE", `/api/jobs/${id}`); } catch (error) { showError(error); } }
}

async function start() {
  const info = await api("GET", "/api/info");
  state.info = info;
  $("model").textContent = `${info.model}, ${info.n_layers} layers`;
  const preset = $("preset");
  for (const name of [...info.presets.filter((p) => p !== "multihop"), ...info.catalogue, info.custom]) {
    const option = document.createElement("option"); option.value = name; option.textContent = name;
    const fitted = info.fitted[name];  // a fitted mapping applies at its own (l, l*) only
    if (fitted) option.textContent = `${name} (l = ${fitted[0]} → l* = ${fitted[1]} only)`;
    preset.appendChild(option);
  }
  $("prompt").maxLength = info.max_prompt_chars; $("target-prompt").maxLength = info.max_prompt_chars;
  preset.value = "token-identity";
  for (const name of info.variants) {
    const option = document.createElement("option"); option.value = name; option.textContent = name;
    $("variant").appendChild(option);
  }
  $("tokenize").addEventListener("click", tokenize);
  $("prompt").addEventListener("keydown", (event) => { if (event.key === "Enter") tokenize(); });
  $("cancel").addEventListener("click", cancelAll);
  $("variant").addEventListener("change", () => { if (state.prompt) runJob("jacobian", -1, drawJacobian); });
  $("verify").addEventListener("change", () => { if (state.position !== null) select(state.position); });
  busy();
}
start();
