// pairfree search page: plain JS, no build step, no network beyond this server.
"use strict";
const $ = (id) => document.getElementById(id);
let current = null; // {name, info}

function setStatus(msg, isError) {
  $("status").textContent = msg || "";
  $("status").className = isError ? "error" : "";
}

async function api(path, options) {
  const r = await fetch(path, options);
  const body = await r.json().catch(() => ({ detail: r.statusText }));
  if (!r.ok) throw new Error(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
  return body;
}

function targets() {
  return [...document.querySelectorAll("#targets input:checked")].map((c) => c.value);
}

async function loadIndex(name) {
  const info = await api(`/indices/${encodeURIComponent(name)}`);
  current = { name, info };
  $("targets").innerHTML = "Show: " + Object.entries(info.modalities)
    .map(([m, e]) => `<label><input type="checkbox" value="${m}" checked> ${m} (${e.count})</label>`).join("");
  setStatus(`index ${name}: query by ${info.query_modalities.join(", ") || "id / embedding"}`);
}

function drawPoints(canvas, points) {
  const ctx = canvas.getContext("2d");
  const w = (canvas.width = canvas.clientWidth * 2), h = (canvas.height = canvas.clientHeight * 2);
  const a = 0.6, b = 0.45; // a fixed oblique view: rotate about y then x
  const proj = points.map(([x, y, z]) => {
    const x1 = x * Math.cos(a) + z * Math.sin(a), z1 = -x * Math.sin(a) + z * Math.cos(a);
    return [x1, y * Math.cos(b) - z1 * Math.sin(b), y * Math.sin(b) + z1 * Math.cos(b)];
  });
  const xs = proj.map((p) => p[0]), ys = proj.map((p) => p[1]), zs = proj.map((p) => p[2]);
  const [x0, x1, y0, y1, z0, z1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys), Math.min(...zs), Math.max(...zs)];
  const s = 0.85 * Math.min(w / (x1 - x0 || 1), h / (y1 - y0 || 1));
  proj.sort((p, q) => p[2] - q[2]).forEach(([x, y, z]) => {
    const t = (z - z0) / (z1 - z0 || 1);
    ctx.fillStyle = `rgba(${40 + 120 * t},${85 + 60 * t},${216 - 80 * t},0.85)`;
    ctx.beginPath();
    ctx.arc(w / 2 + (x - (x0 + x1) / 2) * s, h / 2 - (y - (y0 + y1) / 2) * s, 2.2, 0, 2 * Math.PI);
    ctx.fill();
  });
  canvas.dataset.rendered = String(points.length);
}

function card(m, r) {
  const el = document.createElement("div");
  el.className = "card";
  el.dataset.modality = m;
  let media = "";
  if (r.url && m === "image") media = `<img src="${r.url}" alt="${m} ${r.rank}" loading="lazy">`;
  else if (r.url && m === "audio") media = `<audio controls preload="none" src="${r.url}"></audio>`;
  else if (r.preview) media = `<canvas data-preview="${r.preview}"></canvas>`;
  const caption = r.caption || (m === "text" ? r.id : "");
  el.innerHTML = `${media}<div class="meta"><span>#${r.rank}</span><span>${r.score.toFixed(3)}</span></div>
    <div class="caption"></div><a class="more">more like this</a>`;
  el.querySelector(".caption").textContent = caption;
  el.querySelector(".more").onclick = () => search({ id: r.id, id_modality: m });
  const canvas = el.querySelector("canvas");
  if (canvas) api(r.preview).then((p) => drawPoints(canvas, p.points)).catch(() => {});
  return el;
}

function show(resp) {
  const main = $("results");
  main.innerHTML = "";
  for (const block of resp.results) {
    const sec = document.createElement("section");
    sec.dataset.modality = block.modality;
    sec.innerHTML = `<h2>${block.modality}</h2>`;
    block.results.forEach((r) => sec.appendChild(card(block.modality, r)));
    main.appendChild(sec);
  }
  setStatus(`${resp.query_modality} query: ${resp.results.map((b) => `${b.results.length} ${b.modality}`).join(", ")}`);
}

async function search(body) {
  if (!current) return;
  setStatus("searching…");
  try {
    show(await api("/knn-service", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ indice_name: current.name, modalities: targets(), num_results: +$("k").value || 8, ...body }),
    }));
  } catch (e) { setStatus(e.message, true); }
}

async function searchFile(file) {
  if (!current || !file) return;
  setStatus(`searching with ${file.name}…`);
  const form = new FormData();
  form.append("file", file);
  form.append("indice_name", current.name);
  form.append("modalities", targets().join(","));
  form.append("num_results", String(+$("k").value || 8));
  try { show(await api("/knn-service/upload", { method: "POST", body: form })); }
  catch (e) { setStatus(e.message, true); }
}

$("query-form").onsubmit = (ev) => { ev.preventDefault(); const t = $("text").value.trim(); if (t) search({ text: t }); };
$("file").onchange = (ev) => searchFile(ev.target.files[0]);
$("index").onchange = (ev) => loadIndex(ev.target.value).catch((e) => setStatus(e.message, true));
const drop = $("drop");
drop.ondragover = (ev) => { ev.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (ev) => { ev.preventDefault(); drop.classList.remove("over"); searchFile(ev.dataTransfer.files[0]); };

(async () => {
  try {
    const names = await api("/indices-list");
    $("index").innerHTML = names.map((n) => `<option>${n}</option>`).join("");
    if (names.length) await loadIndex(names[0]);
    const q = new URLSearchParams(location.search).get("q");
    if (q) { $("text").value = q; search({ text: q }); }
  } catch (e) { setStatus(e.message, true); }
})();
