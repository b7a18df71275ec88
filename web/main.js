// The demo page: opens the GPU through the wasm module (wasm-bindgen's `--target web` output
// in pkg/), runs the chosen shape on the GPU and the CPU, shows the figures and head 0's
// weights. `document.body.dataset.status` is `ready`, `running`, `done` or `error`, and
// `data-max-diff` holds the last difference, for web/check-page.py.
import init, { adapter, run_demo } from "./pkg/wgpu_attention_web.js";

const $ = (id) => document.getElementById(id);
const num = (id) => Number($(id).value);
const optional = (id, none) => ($(id).value === "" ? none : Number($(id).value));

function showError(e) {
  $("error").textContent = String(e && e.message ? e.message : e);
  document.body.dataset.status = "error";
}

// Weights in [0, max] to a white-to-dark-blue ramp.
function colour(w, max) {
  const t = max > 0 ? Math.sqrt(w / max) : 0;
  const r = Math.round(255 - 230 * t), g = Math.round(255 - 200 * t), b = Math.round(255 - 90 * t);
  return `rgb(${r},${g},${b})`;
}

function ticks(n) {
  const out = new Set([0, n - 1]);
  const step = Math.max(1, Math.ceil(n / 6));
  for (let i = 0; i < n; i += step) out.add(i);
  return [...out].sort((a, b) => a - b);
}

function drawHeatMap(weights, rows, cols) {
  const canvas = $("heat");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const left = 60, top = 30, bottom = 50, right = 20;
  const w = canvas.width - left - right, h = canvas.height - top - bottom;
  const cw = w / cols, ch = h / rows;
  let max = 0;
  for (const x of weights) max = Math.max(max, x);
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < cols; j++) {
      ctx.fillStyle = colour(weights[i * cols + j], max);
      ctx.fillRect(left + j * cw, top + i * ch, Math.ceil(cw), Math.ceil(ch));
    }
  }
  ctx.strokeStyle = "#444";
  ctx.strokeRect(left, top, w, h);
  ctx.fillStyle = "#222";
  ctx.font = "12px system-ui, sans-serif";
  ctx.textAlign = "center";
  for (const j of ticks(cols)) ctx.fillText(String(j), left + (j + 0.5) * cw, top + h + 16);
  ctx.fillText("key position", left + w / 2, top + h + 38);
  ctx.textAlign = "right";
  for (const i of ticks(rows)) ctx.fillText(String(i), left - 6, top + (i + 0.5) * ch + 4);
  ctx.save();
  ctx.translate(16, top + h / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center";
  ctx.fillText("query position", 0, 0);
  ctx.restore();
  ctx.textAlign = "left";
  ctx.fillText(`head 0 attention weights (max ${max.toPrecision(3)})`, left, top - 10);
}

async function run(event) {
  if (event) event.preventDefault();
  document.body.dataset.status = "running";
  $("error").textContent = "";
  $("run").disabled = true;
  try {
    const r = await run_demo(
      $("path").value, num("heads"), num("kv_heads"), num("q_len"), num("kv_len"), num("head_dim"),
      $("causal").checked, optional("window", -1), optional("softcap", 0), num("seed"),
    );
    $("plan").textContent = r.plan;
    $("gpu_ms").textContent = `${r.gpu_ms.toFixed(2)} ms`;
    $("cpu_ms").textContent = `${r.cpu_ms.toFixed(2)} ms`;
    const agree = r.max_abs_diff <= 1e-5;
    $("diff").innerHTML = `${r.max_abs_diff.toExponential(2)} <span class="${agree ? "agree" : "disagree"}">${agree ? "agree" : "DISAGREE"}</span>`;
    drawHeatMap(r.weights, r.rows, r.cols);
    document.body.dataset.maxDiff = String(r.max_abs_diff);
    document.body.dataset.status = "done";
  } catch (e) {
    showError(e);
  } finally {
    $("run").disabled = false;
  }
}

try {
  await init();
  const name = await adapter();
  // A software adapter (SwiftShader, lavapipe) runs WebGPU on the CPU: say so by the times.
  $("adapter").textContent = name.endsWith("Cpu)")
    ? `${name}: a software adapter, its GPU times say nothing about a GPU`
    : name;
  $("form").addEventListener("submit", run);
  $("run").disabled = false;
  document.body.dataset.status = "ready";
  // One run on load, so the page shows something (and the check has a result to read).
  await run();
} catch (e) {
  $("adapter").textContent = "none";
  showError(e);
}
