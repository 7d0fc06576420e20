// The web page: plain JS, no build step. Every call goes through api() so the API key header is sent.
"use strict";
const $ = (id) => document.getElementById(id);
const esc = (v) => v == null ? "" : String(v).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
let queryFile = null;

function headers() {
  const k = $("key").value;
  if (k) localStorage.setItem("reidKey", k);
  return k ? {"X-API-Key": k} : {};
}

// Image ids are 63-bit integers: past 2^53 a JS number loses digits, so they are read as strings.
function parseJson(text) { return JSON.parse(text.replace(/"id":\s*(\d{16,})/g, '"id":"$1"')); }

async function api(path, opts = {}) {
  const r = await fetch(path, {...opts, headers: {...headers(), ...(opts.headers || {})}});
  const ct = r.headers.get("content-type") || "";
  const body = ct.includes("json") ? parseJson(await r.text()) : null;
  if (!r.ok) throw new Error(body && body.error ? `${body.error.code}: ${body.error.message}` : r.statusText);
  return body;
}

function fail(el, e) { el.innerHTML = `<span class="err">${esc(e.message || e)}</span>`; }

async function loadGalleries(select) {
  try {
    const body = await api("v1/galleries");
    const cur = select || $("gallery").value;
    $("gallery").innerHTML = body.galleries.map(g =>
      `<option value="${esc(g.name)}">${esc(g.name)} (${g.count})</option>`).join("");
    if (cur && body.galleries.some(g => g.name === cur)) $("gallery").value = cur;
    if (!body.galleries.length) $("status").textContent = "No galleries yet: add images below.";
  } catch (e) { fail($("status"), e); }
}

function setQuery(f) {
  if (!f) return;
  queryFile = f;
  $("preview").src = URL.createObjectURL(f);
  $("preview").hidden = false;
}

// Thumbnails need the API key header, so they are fetched, not linked.
async function thumb(img, gallery, id) {
  try {
    const r = await fetch(`v1/galleries/${encodeURIComponent(gallery)}/images/${id}/thumbnail`, {headers: headers()});
    if (r.ok) img.src = URL.createObjectURL(await r.blob());
    else img.alt = "no image kept";
  } catch (e) { img.alt = "thumbnail failed"; }
}

function render(gallery, body) {
  const grid = $("grid");
  grid.innerHTML = "";
  body.results.forEach((x, i) => {
    const card = document.createElement("div");
    const cls = x.match === true ? "match" : x.match === false ? "nomatch" : "";
    card.className = `card ${cls}`;
    card.dataset.id = x.id;
    const badge = x.match === undefined ? "" : `<span class="badge">${x.match ? "match" : "no match"}</span>`;
    card.innerHTML = `<img alt="result ${i + 1}"><div><span class="rank">#${i + 1}</span>${badge}</div>` +
      `<div>score ${x.score.toFixed(4)}</div><div>cosine ${x.cosine.toFixed(4)}</div>` +
      `<div>camera ${esc(x.camera_id ?? "–")}</div><div>${esc(x.captured_at ?? "")}</div>` +
      `<div class="muted">id ${esc(x.id)}${x.person_id ? " · " + esc(x.person_id) : ""}</div>`;
    grid.appendChild(card);
    thumb(card.querySelector("img"), gallery, x.id);
  });
}

async function search(ev) {
  ev.preventDefault();
  const gallery = $("gallery").value;
  if (!gallery) return fail($("status"), "pick a gallery first");
  if (!queryFile) return fail($("status"), "drop or choose a query image first");
  const fd = new FormData();
  fd.append("file", queryFile);
  fd.append("top_k", $("topk").value || "10");
  if ($("refine").value) fd.append("refine", $("refine").value);
  if ($("qcam").value) fd.append("query_camera_id", $("qcam").value);
  if ($("samecam").checked) fd.append("exclude_same_camera", "true");
  $("status").textContent = "Searching…";
  try {
    const body = await api(`v1/galleries/${encodeURIComponent(gallery)}/search`, {method: "POST", body: fd});
    render(gallery, body);
    const th = body.threshold === undefined ? "not calibrated" : `match above cosine ${body.threshold.toFixed(3)}`;
    $("status").textContent = `${body.results.length} result(s), refine ${body.refine_applied}${body.refine === "auto" ? " (auto)" : ""}, ` +
      `${body.timing_ms.total.toFixed(1)} ms, model ${body.model}, ${th}`;
  } catch (e) { fail($("status"), e); $("grid").innerHTML = ""; }
}

const ARCHIVE = /\.(zip|tar|tgz|tar\.gz)$/i;

// XMLHttpRequest, not fetch: it reports upload progress.
function send(url, fd, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      let body = null;
      try { body = parseJson(xhr.responseText); } catch (e) { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new Error(body && body.error ? `${body.error.code}: ${body.error.message}` : xhr.statusText));
    };
    xhr.onerror = () => reject(new Error("network error"));
    xhr.send(fd);
  });
}

async function followJob(id, bar, status) {
  for (;;) {
    const job = await api(`v1/jobs/${id}`);
    const r = job.result || {};
    bar.value = job.progress;
    status.textContent = `import ${job.status}: ${r.done ?? 0}/${r.total ?? "?"} done, ${r.created ?? 0} new, ` +
      `${r.exists ?? 0} already there, ${r.failed ?? 0} failed`;
    if (!["queued", "running"].includes(job.status)) return job;
    await new Promise(ok => setTimeout(ok, 500));
  }
}

async function upload(ev) {
  ev.preventDefault();
  const gallery = $("newgallery").value.trim() || $("gallery").value;
  const files = [...$("ufiles").files];
  const bar = $("uprogress"), status = $("ustatus");
  if (!gallery) return fail(status, "name a gallery");
  if (!files.length) return fail(status, "choose images or an archive");
  const fd = new FormData();
  files.forEach(f => fd.append("files", f));
  const asJob = files.some(f => ARCHIVE.test(f.name)) || files.length > 64;
  if (!asJob && $("ucam").value) fd.append("camera_id", $("ucam").value);
  bar.hidden = false; bar.value = 0;
  status.textContent = "Uploading…";
  const url = `v1/galleries/${encodeURIComponent(gallery)}/${asJob ? "imports" : "images"}`;
  try {
    const body = await send(url, fd, p => { bar.value = asJob ? p * 0.5 : p; });
    if (asJob) await followJob(body.id, bar, status);
    else {
      bar.value = 1;
      const n = body.items.filter(x => x.status === "created").length;
      status.textContent = `${n} new, ${body.items.length - n} already there, ${body.errors.length} rejected` +
        (body.errors.length ? ": " + body.errors.map(e => `${e.filename}: ${e.message}`).join("; ") : "");
    }
    await loadGalleries(gallery);
  } catch (e) { fail(status, e); }
}

const drop = $("drop");
["dragenter", "dragover"].forEach(t => drop.addEventListener(t, e => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach(t => drop.addEventListener(t, e => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", e => setQuery(e.dataTransfer.files[0]));
$("file").addEventListener("change", () => setQuery($("file").files[0]));
$("search").addEventListener("submit", search);
$("upload").addEventListener("submit", upload);
$("reload").addEventListener("click", () => loadGalleries());
$("key").value = localStorage.getItem("reidKey") || "";
$("key").addEventListener("change", () => loadGalleries());
loadGalleries();
