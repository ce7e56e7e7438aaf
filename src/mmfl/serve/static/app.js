// The search page: pick or drop a photo, optionally drag a box on it, and see the matching
// shop items. With a model that finds garments, the detected boxes are drawn on the photo
// (the server searched the best one); a click on another, or on its button, searches that
// one, and a dragged box is searched as drawn. Everything goes through fetch(); the page never
// reloads. Text from the server is always inserted with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
// box: the box the user chose (drawn or picked; sent as bbox); picked: index of the detection chosen;
// detections: the garments found in the photo; used: the box the last answer searched (null = whole photo)
const state = { file: null, image: null, scale: 1, box: null, picked: null, detections: [], used: null,
                drag: null, inflight: null };
const MAX_PREVIEW = 316; // preview width in CSS pixels (small photos are scaled up to it)
const MAX_PREVIEW_HEIGHT = 420;
const MAX_CHIPS = 5; // most confident attributes shown on a card; the rest in a tooltip
const SCORE_MEANING = "cosine similarity of the embeddings: 1 = same picture, higher is closer; not a probability";
const SOURCE_MEANING = {
  annotated: "attributes from the gallery's annotations",
  predicted: "attributes predicted by the model",
};

async function loadInfo() {
  try {
    const health = await (await fetch("/healthz")).json();
    $("info").textContent = `${health.count} gallery images · ${health.backend}/${health.kind} · ${health.embed_dim}-d`;
    const facets = await (await fetch("/facets")).json();
    fillSelect($("category"), Object.keys(facets.categories || {}));
    fillSelect($("attribute"), Object.keys(facets.attributes || {}));
  } catch (err) {
    setStatus(`service unavailable: ${err}`, true);
  }
}

function fillSelect(select, names) {
  for (const name of names) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    select.appendChild(option);
  }
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function choose(file) {
  if (!file) return;
  state.file = file;
  state.box = null;
  state.picked = null;
  state.detections = [];
  state.used = null;
  showGarments();
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {
    state.image = img;
    state.scale = Math.min(MAX_PREVIEW / img.naturalWidth, MAX_PREVIEW_HEIGHT / img.naturalHeight);
    const canvas = $("preview");
    canvas.width = Math.round(img.naturalWidth * state.scale);
    canvas.height = Math.round(img.naturalHeight * state.scale);
    canvas.style.display = "block";
    draw();
    search();
  };
  img.onerror = () => {
    // The browser cannot show it; the server may still decode it (or explain why not).
    state.image = null;
    $("preview").style.display = "none";
    search();
  };
  img.src = url;
}

function draw() {
  const canvas = $("preview");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (state.image) ctx.drawImage(state.image, 0, 0, canvas.width, canvas.height);
  const shown = state.box || state.used;
  const r = state.drag || (shown && shown.map((v) => v * state.scale));
  if (r && state.image) {
    const [x1, y1, x2, y2] = normalise(r);
    ctx.fillStyle = "rgba(0,0,0,0.35)";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(state.image, x1 / state.scale, y1 / state.scale, (x2 - x1) / state.scale, (y2 - y1) / state.scale,
                  x1, y1, x2 - x1, y2 - y1);
    ctx.strokeStyle = "#c2410c";
    ctx.lineWidth = 2;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
  }
  if (state.image) drawDetections(ctx);
  canvas.dataset.detections = String(state.detections.length);
  $("clear-box").disabled = !state.box;
}

// Each detected garment as a numbered outline: solid for the one searched, dashed for the others.
function drawDetections(ctx) {
  ctx.save();
  ctx.lineWidth = 2;
  ctx.font = "bold 12px system-ui, sans-serif";
  state.detections.forEach((d, i) => {
    const [x1, y1, x2, y2] = d.box.map((v) => v * state.scale);
    const searched = state.used && d.box.every((v, k) => v === state.used[k]);
    ctx.setLineDash(searched ? [] : [5, 3]);
    ctx.strokeStyle = "#2563eb";
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const label = String(i + 1);
    ctx.fillStyle = "#2563eb";
    ctx.fillRect(x1, y1, ctx.measureText(label).width + 8, 16);
    ctx.fillStyle = "#fff";
    ctx.fillText(label, x1 + 4, y1 + 12);
  });
  ctx.restore();
}

// One button per detected garment, so a box can also be chosen without pointing at the photo.
function showGarments() {
  const list = $("garments");
  list.replaceChildren();
  state.detections.forEach((d, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "garment";
    button.textContent = `${i + 1}: ${d.category} ${d.score.toFixed(2)}`;
    button.title = `search inside box ${d.box.join(",")}`;
    button.setAttribute("aria-pressed", String(i === state.picked));
    button.addEventListener("click", () => pick(i));
    list.appendChild(button);
  });
  $("garments-hint").style.display = state.detections.length ? "block" : "none";
}

function pick(index) {
  state.picked = index;
  state.box = state.detections[index].box.slice();
  showGarments();
  draw();
  search();
}

// The smallest detected box under a click (boxes of an outfit nest: a top inside a dress's box).
function detectionAt(x, y) {
  let best = null;
  state.detections.forEach((d, i) => {
    const [x1, y1, x2, y2] = d.box.map((v) => v * state.scale);
    const area = (x2 - x1) * (y2 - y1);
    if (x >= x1 && x <= x2 && y >= y1 && y <= y2 && (best === null || area < best.area)) best = { i, area };
  });
  return best === null ? null : best.i;
}

function normalise([ax, ay, bx, by]) {
  return [Math.min(ax, bx), Math.min(ay, by), Math.max(ax, bx), Math.max(ay, by)];
}

function pointer(event) {
  const rect = $("preview").getBoundingClientRect();
  const sx = $("preview").width / rect.width;
  const sy = $("preview").height / rect.height;
  const x = Math.max(0, Math.min($("preview").width, (event.clientX - rect.left) * sx));
  const y = Math.max(0, Math.min($("preview").height, (event.clientY - rect.top) * sy));
  return [x, y];
}

function bindCanvas() {
  const canvas = $("preview");
  canvas.addEventListener("pointerdown", (event) => {
    if (!state.image) return;
    canvas.setPointerCapture(event.pointerId);
    const [x, y] = pointer(event);
    state.drag = [x, y, x, y];
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!state.drag) return;
    const [x, y] = pointer(event);
    state.drag = [state.drag[0], state.drag[1], x, y];
    draw();
  });
  canvas.addEventListener("pointerup", () => {
    if (!state.drag) return;
    const [x1, y1, x2, y2] = normalise(state.drag);
    state.drag = null;
    if (x2 - x1 >= 4 && y2 - y1 >= 4) {
      state.box = [x1, y1, x2, y2].map((v) => Math.round(v / state.scale));
      state.picked = null;
      showGarments();
      draw();
      search();
    } else {
      const hit = detectionAt(x2, y2); // a click, not a drag: choose the garment under it
      if (hit !== null) pick(hit);
      else draw();
    }
  });
}

async function search() {
  if (!state.file) return;
  if (state.inflight) state.inflight.abort();
  const controller = new AbortController();
  state.inflight = controller;
  const form = new FormData();
  form.append("image", state.file, state.file.name || "photo");
  form.append("k", $("k").value);
  if (state.box) form.append("bbox", state.box.join(","));
  if ($("whole-image").checked) form.append("whole_image", "true");
  if ($("category").value) form.append("filter", `category=${$("category").value}`);
  if ($("attribute").value) form.append("filter", `attribute=${$("attribute").value}`);
  setStatus("searching…");
  try {
    const response = await fetch("/search", { method: "POST", body: form, signal: controller.signal });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      showError(answer.error || `the server answered ${response.status} ${response.statusText}`);
      return;
    }
    if (!state.box) { // a search without a box says what was found; keep it while a garment is chosen
      state.detections = answer.query.detections || [];
      showGarments();
    }
    state.used = answer.query.bbox;
    draw();
    render(answer.results);
    describeQuery(answer.query);
    setStatus(`${answer.results.length} items in ${answer.query.took_ms} ms`);
  } catch (err) {
    if (err.name !== "AbortError") showError(`search failed: ${err.message || err}`);
  } finally {
    if (state.inflight === controller) state.inflight = null;
  }
}

// A refused search is not an empty result: the reason replaces the results, as an alert.
function showError(text) {
  setStatus("search failed", true);
  $("query").textContent = "";
  const p = document.createElement("p");
  p.className = "error";
  p.setAttribute("role", "alert");
  p.textContent = text;
  $("results").replaceChildren(p);
}

function describeQuery(query) {
  const parts = [];
  if (query.category) parts.push(`looks like: ${query.category}`);
  if (query.attributes && query.attributes.length) parts.push(`attributes: ${query.attributes.slice(0, MAX_CHIPS).join(", ")}`);
  if (state.picked !== null) parts.push(`garment ${state.picked + 1}, box: ${query.bbox.join(",")}`);
  else if (query.bbox) parts.push(`box: ${query.bbox.join(",")} (${query.box_reason})`);
  else if (query.box_reason) parts.push(`whole photo (${query.box_reason})`);
  $("query").textContent = parts.join(" · ");
}

function render(results) {
  const grid = $("results");
  grid.replaceChildren();
  if (!results.length) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = "No matching items.";
    grid.appendChild(p);
    return;
  }
  for (const r of results) {
    const card = document.createElement("article");
    card.className = "card";
    card.dataset.itemId = r.item_id;
    const img = document.createElement("img");
    img.src = r.image_url;
    img.alt = `item ${r.item_id}`;
    img.loading = "lazy";
    const body = document.createElement("div");
    body.className = "body";
    const score = line("score", `score ${r.score.toFixed(3)}`);
    score.title = SCORE_MEANING;
    body.append(line("item", r.item_id), score);
    if (r.category) body.append(line("category", r.category));
    if (r.attribute_source && r.attributes.length) {
      const source = document.createElement("span");
      source.className = "source";
      source.textContent = r.attribute_source;
      source.title = SOURCE_MEANING[r.attribute_source] || "";
      body.appendChild(source);
    }
    for (const name of r.attributes.slice(0, MAX_CHIPS)) {
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.textContent = name;
      chip.title = "filter by this attribute";
      chip.addEventListener("click", () => { $("attribute").value = name; search(); });
      body.appendChild(chip);
    }
    if (r.attributes.length > MAX_CHIPS) {
      const more = document.createElement("span");
      more.className = "more";
      more.textContent = `+${r.attributes.length - MAX_CHIPS}`;
      more.title = r.attributes.slice(MAX_CHIPS).join(", ");
      body.appendChild(more);
    }
    card.append(img, body);
    grid.appendChild(card);
  }
}

function line(cls, text) {
  const div = document.createElement("div");
  div.className = cls;
  div.textContent = text;
  return div;
}

function bindInputs() {
  $("file").addEventListener("change", (event) => choose(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    choose(event.dataTransfer.files[0]);
  });
  $("clear-box").addEventListener("click", () => { state.box = null; state.picked = null; showGarments(); draw(); search(); });
  $("whole-image").addEventListener("change", () => { if (!state.box) search(); });
  for (const id of ["k", "category", "attribute"]) $(id).addEventListener("change", search);
}

bindInputs();
bindCanvas();
loadInfo();
