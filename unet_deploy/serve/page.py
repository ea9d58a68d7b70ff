"""The web page at ``/``: choose or drop an image, see the overlay and the mask side by side with the time
taken. One request per image (``format=json``: the mask as RLE, drawn in the page, and the overlay drawn
over the chosen file). Self-contained (inline CSS and JavaScript, no external asset): nothing outside the
machine is needed."""

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
async function ask(file) {
  const body = new FormData();
  body.append("file", file);
  const query = `format=json&crf=${$("crf").checked ? 1 : 0}&tta=${$("tta").checked ? 1 : 0}`;
  const r = await fetch("/v1/predict?" + query, { method: "POST", body, headers: headers() });
  if (!r.ok) {
    let message = r.status + " " + r.statusText;
    try { message = (await r.json()).error; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return await r.json();
}
function maskOf(answer) {
  const mask = new Uint8Array(answer.width * answer.height);
  const runs = answer.rle.split(" ").filter((x) => x).map(Number);  // 1-based start, length, ...
  for (let i = 0; i + 1 < runs.length; i += 2) mask.fill(1, runs[i] - 1, runs[i] - 1 + runs[i + 1]);
  return mask;
}
function canvasOf(width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  return canvas;
}
function show(canvas, id) {
  return new Promise((done) => canvas.toBlob((blob) => {
    $(id).src = URL.createObjectURL(blob);
    done();
  }, "image/png"));
}
async function draw(file, answer) {
  const { width, height } = answer;
  const mask = maskOf(answer);
  const maskCanvas = canvasOf(width, height);
  const maskContext = maskCanvas.getContext("2d");
  const pixels = maskContext.createImageData(width, height);
  for (let i = 0; i < mask.length; i++) {
    const v = mask[i] ? 255 : 0;
    pixels.data.set([v, v, v, 255], 4 * i);
  }
  maskContext.putImageData(pixels, 0, 0);
  const shown = [show(maskCanvas, "mask")];
  try {  // the overlay: the chosen file as the browser decodes it, the foreground tinted green
    const picture = await createImageBitmap(file, { imageOrientation: "from-image" });
    const overlay = canvasOf(width, height);
    const context = overlay.getContext("2d");
    context.drawImage(picture, 0, 0, width, height);
    const image = context.getImageData(0, 0, width, height);
    for (let i = 0; i < mask.length; i++) {
      if (!mask[i]) continue;
      image.data[4 * i] = image.data[4 * i] >> 1;
      image.data[4 * i + 1] = (image.data[4 * i + 1] + 255) >> 1;
      image.data[4 * i + 2] = image.data[4 * i + 2] >> 1;
    }
    context.putImageData(image, 0, 0);
    shown.push(show(overlay, "overlay"));
  } catch (e) { /* a format this browser cannot show (TIFF): the mask only */ }
  await Promise.all(shown);
}
async function run(file) {
  $("status").className = "";
  $("status").textContent = `Predicting ${file.name}...`;
  $("overlay").removeAttribute("src");
  $("mask").removeAttribute("src");
  const t0 = performance.now();
  try {
    const answer = await ask(file);  // one request per image: the mask comes back as RLE
    await draw(file, answer);
    const total = (performance.now() - t0).toFixed(0);
    $("status").textContent = `${file.name}: model and post-processing ${answer.ms} ms; ${total} ms in all`;
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
