// The web page: plain JS, no build step. Every call goes through api() so the API key header is sent.
// It runs under a strict Content-Security-Policy (service/security_headers.py): no inline script or style,
// images only from this origin or blob: URLs, so everything is built here with the DOM.
"use strict";
const $ = (id) => document.getElementById(id);
const esc = (v) => v == null ? "" : String(v).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const enc = encodeURIComponent;
const PAGE_SIZE = 24;  // images per page of the gallery view
let query = null;  // {file}: a dropped or chosen image; {id, gallery, image}: an image of the gallery
let browsing = 0;  // the latest gallery-view request: an older one that answers late is dropped

// The key lives in sessionStorage: this tab only, gone when it closes, never left on disk for other pages.
function headers() {
  const k = $("key").value;
  if (k) sessionStorage.setItem("reidKey", k);
  else sessionStorage.removeItem("reidKey");
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

// What a person reads about an image: who, which camera, when (the raw id is only in the tooltip).
function fmtTime(s) {
  if (!s) return "";
  const d = new Date(s);
  return isNaN(d) ? s : d.toISOString().slice(0, 16).replace("T", " ") + " UTC";
}
const who = (x) => x.person_id != null ? `person ${x.person_id}` : "unlabelled";
const camera = (x) => x.camera_id ?? "–";
const describe = (x) => `${who(x)}, camera ${camera(x)}, ${fmtTime(x.captured_at) || "time unknown"}`;

async function loadGalleries(select) {
  try {
    const body = await api("v1/galleries");
    const cur = select || $("gallery").value;
    $("gallery").innerHTML = body.galleries.map(g =>
      `<option value="${esc(g.name)}">${esc(g.name)} (${g.count})</option>`).join("");
    if (cur && body.galleries.some(g => g.name === cur)) $("gallery").value = cur;
    if (!body.galleries.length) $("status").textContent = "No galleries yet: add images below.";
    await browse(0);
  } catch (e) { fail($("status"), e); }
}

// Thumbnails need the API key header, so they are fetched, not linked.
async function thumb(img, gallery, id) {
  try {
    const r = await fetch(`v1/galleries/${enc(gallery)}/images/${id}/thumbnail`, {headers: headers()});
    if (!r.ok) { img.alt = "no image kept"; return; }
    const url = URL.createObjectURL(await r.blob());
    img.addEventListener("load", () => URL.revokeObjectURL(url), {once: true});
    img.src = url;
  } catch (e) { img.alt = "thumbnail failed"; }
}

// One image as a card (results and the gallery view alike); a click or Enter searches with it.
function card(gallery, x, head = "", foot = "") {
  const el = document.createElement("div");
  el.className = "card" + (x.match === true ? " match" : x.match === false ? " nomatch" : "");
  el.dataset.id = x.id;
  el.tabIndex = 0;
  el.setAttribute("role", "button");
  el.title = `image ${x.id}${x.filename ? " (" + x.filename + ")" : ""}: click to search with it`;
  el.innerHTML = `<img alt="${esc(who(x))}">${head}<div class="who">${esc(who(x))}</div>` +
    `<div>camera ${esc(camera(x))}</div><div class="when">${esc(fmtTime(x.captured_at) || "time unknown")}</div>` +
    (x.external_id ? `<div class="muted">${esc(x.external_id)}</div>` : "") + foot;
  el.addEventListener("click", () => searchWithImage(gallery, x));
  el.addEventListener("keydown", e => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); searchWithImage(gallery, x); }
  });
  thumb(el.querySelector("img"), gallery, x.id);
  return el;
}

function render(gallery, body) {
  const grid = $("grid");
  grid.innerHTML = "";
  body.results.forEach((x, i) => {
    const badge = x.match === undefined ? "" : `<span class="badge">${x.match ? "match" : "no match"}</span>`;
    grid.appendChild(card(gallery, x, `<div><span class="rank">#${i + 1}</span>${badge}</div>`,
      `<div class="muted">score ${x.score.toFixed(3)} · cosine ${x.cosine.toFixed(3)}</div>`));
  });
  drawTimeline(gallery, body.results);
}

// The top matches on a timeline, one row per camera: where and when this person was seen.
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function drawTimeline(gallery, results) {
  const box = $("timelinebox"), plot = $("timeline");
  plot.replaceChildren();
  const timed = results.map((x, i) => ({x, rank: i + 1, t: Date.parse(x.captured_at)})).filter(p => !isNaN(p.t));
  const untimed = results.length - timed.length;
  $("timelinenote").textContent = untimed ? `${untimed} result(s) without a capture time are not drawn.` : "";
  box.hidden = !results.length;
  if (!timed.length) return;
  const cams = [...new Set(timed.map(p => camera(p.x)))].sort();
  const W = 900, left = 120, right = 30, pad = 16, top = 12, rowH = 40, H = top + cams.length * rowH + 28;
  const t0 = Math.min(...timed.map(p => p.t)), t1 = Math.max(...timed.map(p => p.t));
  const x0 = left + pad, x1 = W - right - pad;  // dots clear of the row labels and the edge
  const xOf = (t) => t1 === t0 ? (x0 + x1) / 2 : x0 + (t - t0) / (t1 - t0) * (x1 - x0);
  const yOf = (c) => top + cams.indexOf(c) * rowH + rowH / 2;
  plot.setAttribute("viewBox", `0 0 ${W} ${H}`);
  cams.forEach(c => {
    plot.appendChild(svg("line", {x1: left, x2: W - right, y1: yOf(c), y2: yOf(c), class: "row"}));
    plot.appendChild(svg("text", {x: left - 10, y: yOf(c) + 4, "text-anchor": "end", class: "cam"}, `camera ${c}`));
  });
  const axisY = top + cams.length * rowH + 18;
  plot.appendChild(svg("text", {x: x0, y: axisY, class: "axis"}, fmtTime(new Date(t0).toISOString())));
  if (t1 !== t0) {
    plot.appendChild(svg("text", {x: x1, y: axisY, "text-anchor": "end", class: "axis"},
                         fmtTime(new Date(t1).toISOString())));
  }
  // best last, so the best answer is drawn on top where dots overlap
  [...timed].reverse().forEach(p => {
    const cls = p.x.match === true ? "dot match" : p.x.match === false ? "dot nomatch" : "dot";
    const g = svg("g", {class: cls, "data-id": p.x.id, tabindex: 0, role: "button"});
    g.appendChild(svg("title", {}, `#${p.rank}: ${describe(p.x)}${p.x.external_id ? " (" + p.x.external_id + ")" : ""}`));
    g.appendChild(svg("circle", {cx: xOf(p.t), cy: yOf(camera(p.x)), r: 11}));
    g.appendChild(svg("text", {x: xOf(p.t), y: yOf(camera(p.x)) + 4, "text-anchor": "middle"}, String(p.rank)));
    g.addEventListener("click", () => searchWithImage(gallery, p.x));
    plot.appendChild(g);
  });
}

function setQuery(f) {
  if (!f) return;
  if (query && query.id !== undefined) $("qcam").value = "";  // that camera was the gallery image's
  query = {file: f};
  $("preview").src = URL.createObjectURL(f);
  $("preview").hidden = false;
  $("querydesc").textContent = f.name;
}

// A gallery image as the query: the server searches with its stored vector and leaves it out of the answer.
function searchWithImage(gallery, x) {
  query = {id: x.id, gallery, image: x};
  $("preview").hidden = false;
  thumb($("preview"), gallery, x.id);
  $("querydesc").textContent = `gallery image: ${describe(x)}`;
  $("qcam").value = x.camera_id ?? "";  // so that "exclude same camera" knows the query's camera
  $("search").scrollIntoView({block: "start"});
  return runSearch();
}

async function runSearch() {
  const gallery = $("gallery").value;
  if (!gallery) return fail($("status"), "pick a gallery first");
  if (!query) return fail($("status"), "drop or choose a query image, or click an image of the gallery");
  if (query.id !== undefined && query.gallery !== gallery) {
    return fail($("status"), `the query is an image of gallery ${query.gallery}: pick that gallery or drop a file`);
  }
  const fd = new FormData();
  fd.append("top_k", $("topk").value || "10");
  if ($("refine").value) fd.append("refine", $("refine").value);
  if ($("qcam").value) fd.append("query_camera_id", $("qcam").value);
  if ($("samecam").checked) fd.append("exclude_same_camera", "true");
  let url = `v1/galleries/${enc(gallery)}/search`;
  if (query.id !== undefined) url = `v1/galleries/${enc(gallery)}/images/${query.id}/search`;
  else fd.append("file", query.file);
  $("status").textContent = "Searching…";
  try {
    const body = await api(url, {method: "POST", body: fd});
    render(gallery, body);
    const th = body.threshold === undefined ? "not calibrated" : `match above cosine ${body.threshold.toFixed(3)}`;
    $("status").textContent = `${body.results.length} result(s), refine ${body.refine_applied}${body.refine === "auto" ? " (auto)" : ""}, ` +
      `${body.timing_ms.total.toFixed(1)} ms, model ${body.model}, ${th}`;
  } catch (e) { fail($("status"), e); $("grid").innerHTML = ""; $("timelinebox").hidden = true; }
}

// The gallery view: its images a page at a time (GET .../images), each one a possible query.
async function browse(offset) {
  const gallery = $("gallery").value, grid = $("browse"), mine = ++browsing;
  grid.innerHTML = "";
  $("prev").disabled = $("next").disabled = true;
  if (!gallery) { $("pageinfo").textContent = ""; return; }
  try {
    const page = await api(`v1/galleries/${enc(gallery)}/images?offset=${offset}&limit=${PAGE_SIZE}`);
    if (mine !== browsing) return;
    page.images.forEach(x => grid.appendChild(card(gallery, x)));
    $("pageinfo").textContent = page.total ?
      `images ${offset + 1}–${offset + page.images.length} of ${page.total}` : "no images";
    $("prev").disabled = offset === 0;
    $("next").disabled = offset + PAGE_SIZE >= page.total;
    $("browse").dataset.offset = offset;
  } catch (e) { fail($("pageinfo"), e); }
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
  const url = `v1/galleries/${enc(gallery)}/${asJob ? "imports" : "images"}`;
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
$("search").addEventListener("submit", (ev) => { ev.preventDefault(); runSearch(); });
$("upload").addEventListener("submit", upload);
$("reload").addEventListener("click", () => loadGalleries());
$("gallery").addEventListener("change", () => browse(0));
$("prev").addEventListener("click", () => browse(Math.max(0, Number($("browse").dataset.offset || 0) - PAGE_SIZE)));
$("next").addEventListener("click", () => browse(Number($("browse").dataset.offset || 0) + PAGE_SIZE));
$("key").value = sessionStorage.getItem("reidKey") || "";
$("key").addEventListener("change", () => loadGalleries());
loadGalleries();
