"""The web page the serving application shows at ``/``: one self-contained
HTML document (inline CSS and script, no external assets). Upload a photo;
it posts to ``/v1/reconstruct`` and shows the photo and its reconstruction
side by side, the plan by dimension, the timings and a download link."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>AesFormer</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; padding: 0 1rem; color: #222; }
 h1 { font-size: 1.6rem; margin-bottom: .2rem; }
 p.lead { color: #555; margin-top: 0; }
 form { display: flex; flex-wrap: wrap; gap: .8rem; align-items: end; padding: 1rem; background: #f4f4f6;
        border-radius: 8px; }
 label { display: flex; flex-direction: column; font-size: .85rem; gap: .25rem; }
 textarea { width: 28rem; height: 3.2rem; }
 button { padding: .5rem 1.2rem; font-size: 1rem; }
 #status { margin: 1rem 0; min-height: 1.4rem; }
 #status.working::before { content: ""; display: inline-block; width: .9rem; height: .9rem; margin-right: .5rem;
        border: 2px solid #999; border-top-color: transparent; border-radius: 50%; animation: spin 1s linear infinite;
        vertical-align: -2px; }
 #status.error { color: #b00020; }
 @keyframes spin { to { transform: rotate(360deg); } }
 .pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
 figure { margin: 0; } figure img { width: 100%; border: 1px solid #ccc; border-radius: 4px; image-rendering: auto; }
 figcaption { font-size: .85rem; color: #555; }
 table { border-collapse: collapse; margin-top: 1rem; width: 100%; }
 td, th { border-bottom: 1px solid #ddd; padding: .35rem .5rem; text-align: left; vertical-align: top; }
 th { width: 18rem; font-weight: 600; }
 td.missing { color: #999; font-style: italic; }
 #result[hidden] { display: none; }
</style>
</head>
<body>
<h1>AesFormer</h1>
<p class="lead">Upload a photo: AesThinker writes a plan along seven photographic dimensions, AesEditor carries it out.</p>
<form id="form">
 <label>Photo <input id="photo" name="image" type="file" accept="image/*" required></label>
 <label>Plan (optional: the thinker writes one) <textarea id="plan" name="plan"></textarea></label>
 <label>Seed <input id="seed" name="seed" type="number" value="0" min="0" style="width:5rem"></label>
 <label>API token (if the server asks for one) <input id="token" type="password" autocomplete="off"></label>
 <button id="go" type="submit">Reconstruct</button>
</form>
<div id="status" role="status"></div>
<div id="result" hidden>
 <div class="pair">
  <figure><img id="input-img" alt="your photo"><figcaption>Your photo</figcaption></figure>
  <figure><img id="output-img" alt="reconstruction"><figcaption>Reconstruction &middot;
   <a id="download" download="reconstruction.png">download PNG</a></figcaption></figure>
 </div>
 <table id="plan-table"><thead><tr><th>Dimension</th><th>Action</th></tr></thead><tbody></tbody></table>
 <p id="free-text" hidden></p>
 <p id="timings"></p>
</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const file = $("photo").files[0];
  if (!file) return;
  const body = new FormData();
  body.append("image", file, file.name);
  if ($("plan").value.trim()) body.append("plan", $("plan").value);
  body.append("seed", $("seed").value || "0");
  const headers = {};
  if ($("token").value) headers["Authorization"] = "Bearer " + $("token").value;
  $("status").className = "working";
  $("status").textContent = "Working: thinking, then editing…";
  $("go").disabled = true;
  const t0 = performance.now();
  try {
    const resp = await fetch("v1/reconstruct", { method: "POST", body, headers });
    const data = await resp.json();
    if (!resp.ok) throw new Error((data.error && data.error.message) || resp.statusText);
    show(file, data);
    $("status").className = "done";
    $("status").textContent = "Done in " + ((performance.now() - t0) / 1000).toFixed(1) + " s.";
  } catch (err) {
    $("status").className = "error";
    $("status").textContent = "Error: " + err.message;
  } finally {
    $("go").disabled = false;
  }
});
function show(file, data) {
  $("input-img").src = URL.createObjectURL(file);
  const url = "data:image/png;base64," + data.image.b64_png;
  $("output-img").src = url;
  $("download").href = url;
  const rows = $("plan-table").querySelector("tbody");
  rows.replaceChildren();
  for (const d of data.plan.dimensions) {
    const tr = document.createElement("tr");
    tr.className = "dimension";
    const th = document.createElement("th");
    th.textContent = "(" + d.index + ") " + d.header;
    const td = document.createElement("td");
    if (d.text) { td.textContent = d.text; } else { td.textContent = "not in the plan"; td.className = "missing"; }
    tr.append(th, td);
    rows.append(tr);
  }
  const free = $("free-text");
  free.hidden = data.plan.parsed;
  free.textContent = data.plan.parsed ? "" : "The plan is not in the seven-dimension format; the editor got it as free text: " + data.plan.text;
  $("timings").textContent = "Timings (ms): " + Object.entries(data.timings_ms).map(([k, v]) => k + " " + v).join(", ");
  $("result").hidden = false;
}
</script>
</body>
</html>
"""
