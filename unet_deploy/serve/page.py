"""The web page at ``/``: choose or drop an image, see the overlay and the mask side by side with the time
taken. Self-contained (inline CSS and JavaScript, no external asset): nothing outside the machine is needed."""

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>unet-deploy</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 72rem; }
  #drop { border: 2px dashed #888; border-radius: 8px; padding: 2rem; text-align: center; cursor: pointer; }
  #drop.over { background: #eef6ff; border-color: #36c; }
  .row { display: flex; gap: 1rem; margin-top: 1rem; flex-wrap: wrap; }
  figure { margin: 0; flex: 1 1 20rem; }
  figure img { max-width: 100%; border: 1px solid #ccc; background: #fafafa; min-height: 2rem; }
  #status { margin-top: 1rem; min-height: 1.5em; }
  .error { color: #b00020; }
  label { margin-right: 1rem; }
</style>
</head>
<body>
<h1>unet-deploy</h1>
<p id="model">Loading the model's description...</p>
<div id="drop">Drop an image here, or <label><input type="file" id="file" accept="image/*"> choose one</label></div>
<p>
  <label><input type="checkbox" id="crf"> dense CRF</label>
  <label><input type="checkbox" id="tta"> flip TTA</label>
  <label>token <input type="password" id="token" size="16" placeholder="if the server needs one"></label>
</p>
<div id="status"></div>
<div class="row">
  <figure><figcaption>Overlay</figcaption><img id="overlay" alt=""></figure>
  <figure><figcaption>Mask</figcaption><img id="mask" alt=""></figure>
</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
function headers() {
  const token = $("token").value.trim();
  return token ? { "Authorization": "Bearer " + token } : {};
}
async function describe() {
  const r = await fetch("/v1/model", { headers: headers() });
  if (!r.ok) { $("model").textContent = "Model: (send the token to see it)"; return; }
  const m = await r.json();
  $("model").textContent = `Model: ${m.architecture}, ${m.classes} class(es), scale ${m.scale}, ` +
    `${m.backend} (${m.precision}) on ${m.provider}`;
}
async function ask(file, format) {
  const body = new FormData();
  body.append("file", file);
  const query = `format=${format}&crf=${$("crf").checked ? 1 : 0}&tta=${$("tta").checked ? 1 : 0}`;
  const r = await fetch("/v1/predict?" + query, { method: "POST", body, headers: headers() });
  if (!r.ok) {
    let message = r.status + " " + r.statusText;
    try { message = (await r.json()).error; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return { blob: await r.blob(), ms: r.headers.get("X-Inference-Ms") };
}
async function run(file) {
  $("status").className = "";
  $("status").textContent = `Predicting ${file.name}...`;
  $("overlay").removeAttribute("src");
  $("mask").removeAttribute("src");
  const t0 = performance.now();
  try {
    const [overlay, mask] = await Promise.all([ask(file, "overlay"), ask(file, "png")]);
    $("overlay").src = URL.createObjectURL(overlay.blob);
    $("mask").src = URL.createObjectURL(mask.blob);
    const total = (performance.now() - t0).toFixed(0);
    $("status").textContent = `${file.name}: model and post-processing ${mask.ms} ms; ${total} ms in all`;
    $("status").dataset.done = "1";
  } catch (e) {
    $("status").className = "error";
    $("status").textContent = `${file.name}: ${e.message}`;
  }
}
$("file").addEventListener("change", () => { if ($("file").files.length) run($("file").files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) run(e.dataTransfer.files[0]);
});
$("token").addEventListener("change", describe);
describe();
</script>
</body>
</html>
"""
