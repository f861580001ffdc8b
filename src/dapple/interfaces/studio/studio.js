// Dapple studio: the page's behaviour, on the native job API (/api/v1) only. Read top to bottom:
// state, the model's recommended settings, modes, the source image and mask, ControlNet units, the request,
// running a job, the result, the gallery, the queue, keyboard shortcuts, start-up.
"use strict";

const api = (path, options) => fetch("/api/v1" + path, options);
const $ = (id) => document.getElementById(id);
const MODES = ["txt2img", "img2img", "inpaint", "outpaint"];
const MASK_COLOUR = "#ff3df5";  // how painted mask strokes show over the image

const state = {
  mode: "txt2img",
  models: [],            // GET /api/v1/models entries
  touched: new Set(),    // recommendable fields the user has set; the others follow the model's recommendation
  source: null,          // {dataUrl, width, height} of the source image
  job: null,             // id of the job this page is following
  shown: null,           // gallery entry shown on the stage
  gallery: [],           // newest first
  lastSeed: null,
  controlModels: [],     // GET /api/v1/control/models entries
  controlModules: [],    // preprocessor names, GET /api/v1/control/modules
  controls: [],          // the ControlNet panel's units: {element, image (data URL or null), detecting}
};

// -- the model's recommended settings ---------------------------------------------------------------------
// The fields a model folder may recommend (generation_defaults.json), and the inputs that show them.
const RECOMMENDABLE = {sampler: "sampler", steps: "steps", guidance_scale: "cfg", guidance_min_timestep: "cfg-min-t"};

function selectedModel() {
  return state.models.find((model) => model.name === $("model").value) || state.models[0];
}

function setValue(id, value) {
  // Set an input without it counting as the user's choice; keeps a slider beside it in step.
  $(id).value = value;
  const slider = document.querySelector(`input[type=range][data-for="${id}"]`);
  if (slider) slider.value = value;
}

function applyRecommended(force = false) {
  const model = selectedModel();
  if (!model) return;
  if (force) state.touched.clear();
  for (const [field, id] of Object.entries(RECOMMENDABLE)) {
    if (!state.touched.has(field) && model.recommended[field] !== undefined) setValue(id, model.recommended[field]);
  }
  const r = model.recommended;
  const own = Object.keys(model.model_recommends || {}).length ? "recommends" : "uses the defaults";
  const interval = r.guidance_min_timestep ? `, guidance at t ≥ ${r.guidance_min_timestep}` : "";
  $("model-note").textContent = `${model.name} ${own}: ${r.sampler}, ${r.steps} steps, CFG ${r.guidance_scale}${interval}` +
    (model.native_size ? ` · native ${model.native_size}×${model.native_size}` : "") + (model.error ? ` · ${model.error}` : "");
  const native = model.native_size ? `${model.native_size} (native)` : "native";
  $("width").placeholder = $("height").placeholder = state.mode === "txt2img" ? native : "source";
  updateHiresNote();
}

function watchTouched() {
  for (const [field, id] of Object.entries(RECOMMENDABLE)) {
    for (const kind of ["input", "change"]) $(id).addEventListener(kind, () => state.touched.add(field));
  }
  for (const slider of document.querySelectorAll("input[type=range][data-for]")) {
    const number = $(slider.dataset.for);
    slider.addEventListener("input", () => { number.value = slider.value; number.dispatchEvent(new Event("input")); });
    number.addEventListener("input", () => { slider.value = number.value; });
  }
}

async function loadModelsAndSamplers() {
  const [samplers, models] = await Promise.all([api("/samplers").then((r) => r.json()),
                                                api("/models").then((r) => r.json())]);
  $("sampler").replaceChildren(...samplers.map((name) => new Option(name, name)));
  state.models = models;
  $("model").replaceChildren(...models.map((model) => {
    const option = new Option(model.name + (model.default ? " (default)" : ""), model.name);
    option.selected = model.default;
    return option;
  }));
  applyRecommended();
}

// -- modes ------------------------------------------------------------------------------------------------
function setMode(mode) {
  state.mode = mode;
  $("workspace").dataset.mode = mode;
  for (const tab of document.querySelectorAll("[role=tab]")) {
    const selected = tab.dataset.mode === mode;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
  }
  applyRecommended();
  layoutOutpaintFrame();
}

function setupTabs() {
  const tabs = [...document.querySelectorAll("[role=tab]")];
  for (const tab of tabs) {
    tab.addEventListener("click", () => setMode(tab.dataset.mode));
    tab.addEventListener("keydown", (event) => {  // arrow keys move along the tab list (the ARIA tabs pattern)
      const step = {ArrowRight: 1, ArrowLeft: -1}[event.key];
      if (!step) return;
      const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
      next.focus();
      setMode(next.dataset.mode);
    });
  }
}

// -- the source image and the inpaint mask ------------------------------------------------------------------
function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function setSource(dataUrl) {
  const img = $("init-preview");
  return new Promise((resolve) => {
    img.onload = () => {
      state.source = {dataUrl, width: img.naturalWidth, height: img.naturalHeight};
      const canvas = $("mask");
      canvas.width = img.naturalWidth;  // the mask has the image's own pixels; CSS stretches it over the image
      canvas.height = img.naturalHeight;
      img.classList.toggle("pixelated", img.naturalWidth < 384);
      $("canvas-wrap").hidden = false;
      $("dropzone").dataset.empty = "false";
      $("source-size").textContent = `${img.naturalWidth}×${img.naturalHeight}`;
      layoutOutpaintFrame();
      resolve();
    };
    img.src = dataUrl;
  });
}

async function takeImageFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError(file ? `${file.name} is not an image` : "");
    return;
  }
  showError("");
  await setSource(await readFile(file));
  if (state.mode === "txt2img") setMode("img2img");  // an image dropped on txt2img means "start from this"
}

function clearSource() {
  state.source = null;
  $("init").value = "";
  $("init-preview").removeAttribute("src");
  $("canvas-wrap").hidden = true;
  $("dropzone").dataset.empty = "true";
  $("source-size").textContent = "";
}

function layoutOutpaintFrame() {
  // Outpaint: show the sides to add as a checkered margin around the image, to scale.
  const wrap = $("canvas-wrap");
  const img = $("init-preview");
  if (state.mode !== "outpaint" || !state.source) { wrap.style.padding = ""; return; }
  const scale = img.clientWidth / state.source.width || 1;
  const side = (id) => Math.min(Number($(id).value) || 0, 1024) * scale;
  wrap.style.padding = `${side("outpaint-top")}px ${side("outpaint-right")}px ${side("outpaint-bottom")}px ${side("outpaint-left")}px`;
}

function setupSourceImage() {
  $("init").addEventListener("change", () => takeImageFile($("init").files[0]));
  $("clear-source").addEventListener("click", clearSource);
  const zone = $("dropzone");
  for (const target of [zone, document.body]) {
    target.addEventListener("dragover", (event) => {
      if (![...event.dataTransfer.types].includes("Files")) return;
      event.preventDefault();
      zone.classList.add("dragging");
    });
    target.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    target.addEventListener("drop", (event) => {
      if (!event.dataTransfer.files.length) return;
      event.preventDefault();
      event.stopPropagation();
      zone.classList.remove("dragging");
      takeImageFile(event.dataTransfer.files[0]);
    });
  }
  document.addEventListener("paste", (event) => {
    const file = [...event.clipboardData.files].find((f) => f.type.startsWith("image/"));
    if (file) { event.preventDefault(); takeImageFile(file); }
  });
  for (const side of ["left", "right", "top", "bottom"]) $(`outpaint-${side}`).addEventListener("input", layoutOutpaintFrame);
  window.addEventListener("resize", layoutOutpaintFrame);
}

function setupMaskPainting() {
  const canvas = $("mask");
  const context = canvas.getContext("2d");
  let last = null;  // the previous point of a stroke, so fast strokes stay continuous
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return {x: (event.clientX - box.left) * canvas.width / box.width,
            y: (event.clientY - box.top) * canvas.height / box.height,
            scale: canvas.width / box.width};
  };
  const paint = (event) => {
    if (!last) return;
    const here = point(event);
    // Strokes are opaque on a transparent canvas (drawn in a colour that shows on most images; the mask sent is
    // their alpha, see maskDataUrl).
    context.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
    context.strokeStyle = MASK_COLOUR;
    context.lineCap = "round";
    context.lineWidth = Number($("brush").value) * here.scale;
    context.beginPath();
    context.moveTo(last.x, last.y);
    context.lineTo(here.x + 0.01, here.y);
    context.stroke();
    last = here;
  };
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    showError("");
    last = point(event);
    paint(event);
  });
  canvas.addEventListener("pointermove", paint);
  canvas.addEventListener("pointerup", () => { last = null; });
  canvas.addEventListener("pointercancel", () => { last = null; });
  $("clear-mask").addEventListener("click", () => context.clearRect(0, 0, canvas.width, canvas.height));
}

function maskDataUrl() {
  // The painted strokes as white on transparent: Dapple reads the alpha as the mask (opaque = repaint), and
  // white also when every pixel is painted (no transparency left to read).
  const canvas = $("mask");
  if (!canvas.width) return null;
  const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = false;
  for (let i = 3; i < pixels.length && !painted; i += 4) painted = pixels[i] > 0;
  if (!painted) return null;
  const white = document.createElement("canvas");
  white.width = canvas.width;
  white.height = canvas.height;
  const context = white.getContext("2d");
  context.drawImage(canvas, 0, 0);
  context.globalCompositeOperation = "source-in";  // keep the strokes' alpha, paint them white
  context.fillStyle = "#fff";
  context.fillRect(0, 0, white.width, white.height);
  return white.toDataURL("image/png");
}

// -- ControlNet units: model, preprocessor, control image and its detected map, weight, start/end, modes ------
// Each unit's inputs are found by their data-part; ids and accessible names carry the unit's number ("Unit 1:
// Control weight"), renumbered when a unit is removed.
const CONTROL_PARTS = ["model", "module", "image", "weight", "start", "end", "control-mode", "resize-mode",
                       "processor-res", "threshold-a", "threshold-b"];
const part = (unit, name) => unit.element.querySelector(`[data-part="${name}"]:not(label)`);

async function loadControlChoices() {
  const [models, modules] = await Promise.all([api("/control/models").then((r) => r.json()),
                                               api("/control/modules").then((r) => r.json())]);
  state.controlModels = Array.isArray(models) ? models : [];
  state.controlModules = Array.isArray(modules) ? modules.map((m) => (typeof m === "string" ? m : m.name))
    : Object.keys(modules || {});
  for (const unit of state.controls) fillControlChoices(unit);
  $("control-note").textContent = state.controlModels.length ? ""
    : "This server has no control models (start it with --control-dir FOLDER).";
}

function fillControlChoices(unit) {
  const keep = (select, values, labels, fallback) => {
    const before = select.value;
    select.replaceChildren(...values.map((value, i) => new Option(labels[i], value)));
    select.value = values.includes(before) ? before : fallback(values);
  };
  keep(part(unit, "model"), state.controlModels.map((m) => m.name), state.controlModels.map((m) => `${m.name} (${m.kind})`),
       (values) => values[0] || "");
  keep(part(unit, "module"), state.controlModules, state.controlModules,
       (values) => (values.includes("canny") ? "canny" : values[0] || "none"));
}

function renumberControls() {
  state.controls.forEach((unit, index) => {
    const n = index + 1;
    unit.element.querySelector("legend").textContent = `Unit ${n}`;
    for (const name of CONTROL_PARTS) {
      const input = part(unit, name);
      const label = unit.element.querySelector(`label[data-part="${name}"]`);
      input.id = `control-${n}-${name}`;
      label.htmlFor = input.id;
      input.setAttribute("aria-label", `Unit ${n}: ${label.textContent.replace("…", "")}`);
    }
    part(unit, "map").alt = `Unit ${n}: detected map`;
    part(unit, "picture").alt = `Unit ${n}: control image`;
    part(unit, "remove").setAttribute("aria-label", `Remove unit ${n}`);
  });
  $("control-badge").hidden = !state.controls.length;
  $("control-badge").textContent = `${state.controls.length} unit${state.controls.length === 1 ? "" : "s"}`;
}

function addControlUnit() {
  const element = $("control-unit").content.firstElementChild.cloneNode(true);
  const unit = {element, image: null, detecting: 0};
  state.controls.push(unit);
  $("control-units").appendChild(element);
  fillControlChoices(unit);
  renumberControls();
  part(unit, "image").addEventListener("change", async () => {
    const file = part(unit, "image").files[0];
    if (!file || !file.type.startsWith("image/")) { showError(file ? `${file.name} is not an image` : ""); return; }
    unit.image = await readFile(file);
    part(unit, "picture").src = unit.image;
    part(unit, "picture").hidden = false;
    detectControl(unit);
  });
  for (const name of ["module", "resize-mode", "processor-res", "threshold-a", "threshold-b"]) {
    part(unit, name).addEventListener("change", () => detectControl(unit));
  }
  part(unit, "remove").addEventListener("click", () => {
    state.controls.splice(state.controls.indexOf(unit), 1);
    element.remove();
    renumberControls();
  });
  return unit;
}

function outputSize() {
  // The size the job will draw at, when the page knows it: the fields, else the source image, else the native size.
  const model = selectedModel();
  const native = (model && model.native_size) || null;
  const source = state.mode !== "txt2img" && state.source;
  const width = number("width") || (source ? source.width : native);
  const height = number("height") || (source ? source.height : native);
  return width && height ? {width: Math.round(width / 8) * 8, height: Math.round(height / 8) * 8} : {};
}

const optionalNumber = (input) => (input.value === "" ? null : Number(input.value));

async function detectControl(unit) {
  // Show the unit's detected map: what the control model will see for this image, preprocessor and size.
  const image = unit.image || (state.mode !== "txt2img" && state.source ? state.source.dataUrl : null);
  const note = part(unit, "map-note");
  if (!image) { note.textContent = "add a control image to see its detected map"; return; }
  const ticket = ++unit.detecting;  // only the newest answer is shown
  note.textContent = "detecting…";
  const size = outputSize();
  const body = {image, module: part(unit, "module").value, resize_mode: part(unit, "resize-mode").value,
                processor_res: optionalNumber(part(unit, "processor-res")),
                threshold_a: optionalNumber(part(unit, "threshold-a")),
                threshold_b: optionalNumber(part(unit, "threshold-b"))};
  if (size.width >= 64 && size.height >= 64 && size.width <= 2048 && size.height <= 2048) Object.assign(body, size);
  const answer = await api("/control/detect", {method: "POST", headers: {"content-type": "application/json"},
                                                body: JSON.stringify(body)});
  const data = await answer.json();
  if (ticket !== unit.detecting) return;
  if (answer.status !== 200) { note.textContent = data.detail || answer.statusText; return; }
  part(unit, "map").src = data.image;
  part(unit, "map").classList.toggle("pixelated", data.width < 384);
  note.textContent = `${data.module} · ${data.width}×${data.height}`;
}

function controlRequest() {
  // The units as the job API's `controls`; a txt2img unit needs its own image.
  return state.controls.map((unit, index) => {
    if (!unit.image && state.mode === "txt2img") {
      throw new Error(`ControlNet unit ${index + 1} needs a control image (or remove the unit)`);
    }
    const control = {model: part(unit, "model").value, module: part(unit, "module").value, image: unit.image,
                     weight: Number(part(unit, "weight").value), guidance_start: Number(part(unit, "start").value),
                     guidance_end: Number(part(unit, "end").value), control_mode: part(unit, "control-mode").value,
                     resize_mode: part(unit, "resize-mode").value};
    for (const [field, name] of [["processor_res", "processor-res"], ["threshold_a", "threshold-a"], ["threshold_b", "threshold-b"]]) {
      const value = optionalNumber(part(unit, name));
      if (value !== null) control[field] = value;
    }
    return control;
  });
}

function useControlSettings(controls) {
  // An image's units ("ControlNet 0: ..." in its infotext) back into the panel; their images stay as they are.
  if (!controls || !controls.length) return;
  while (state.controls.length < controls.length) addControlUnit();
  while (state.controls.length > controls.length) part(state.controls[state.controls.length - 1], "remove").click();
  controls.forEach((control, index) => {
    const unit = state.controls[index];
    const set = (name, value) => { if (value !== undefined && value !== null) part(unit, name).value = value; };
    const model = String(control.model || "").replace(/ \[[0-9a-f]+\]$/i, "");
    if (state.controlModels.some((m) => m.name === model)) set("model", model);
    if (state.controlModules.includes(control.module)) set("module", control.module);
    set("weight", control.weight);
    set("start", control.guidance_start);
    set("end", control.guidance_end);
    set("control-mode", control.control_mode);
    set("resize-mode", control.resize_mode);
    part(unit, "processor-res").value = control.processor_res ?? "";
    part(unit, "threshold-a").value = control.threshold_a ?? "";
    part(unit, "threshold-b").value = control.threshold_b ?? "";
  });
  $("control").open = true;
}

function setupControls() {
  $("control-add").addEventListener("click", () => { addControlUnit(); $("control").open = true; });
  loadControlChoices().catch((error) => { $("control-note").textContent = `could not load control models: ${error}`; });
}

// -- the request: every field of the native job API, from the inputs of the current mode -------------------
const number = (id) => Number($(id).value);

function buildRequest() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, model: $("model").value || null,
    sampler: $("sampler").value, steps: number("steps"), guidance_scale: number("cfg"),
    guidance_min_timestep: number("cfg-min-t"), seed: number("seed"), batch_size: number("batch"),
  };
  if ($("speed").value) body.speed = $("speed").value;  // a preset; the two fields below, when filled in, win over it
  if ($("deep-cache").value) body.deep_cache_interval = number("deep-cache");
  if ($("token-merging").value) body.token_merging_ratio = number("token-merging");
  if ($("width").value) body.width = number("width");
  if ($("height").value) body.height = number("height");
  if (state.controls.length) body.controls = controlRequest();
  if (state.mode === "txt2img") {
    if ($("hires-enable").checked) {
      Object.assign(body, {hires_scale: number("hires-scale"), hires_upscaler: $("hires-upscaler").value,
                           hires_steps: number("hires-steps"), hires_strength: number("hires-strength")});
      if ($("token-merging-hr").value) body.token_merging_ratio_hr = number("token-merging-hr");
    }
    return body;
  }
  if (!state.source) throw new Error(`${state.mode} needs a source image: drop one on the page or choose a file`);
  Object.assign(body, {init_image: state.source.dataUrl, strength: number("strength"), resize_mode: $("resize-mode").value});
  if (state.mode === "inpaint") {
    const mask = maskDataUrl();
    if (!mask) throw new Error("inpaint needs a mask: paint over the area to repaint");
    Object.assign(body, {mask, mask_blur: number("mask-blur"), invert_mask: $("invert-mask").checked,
                         inpainting_fill: $("inpainting-fill").value, paste_back: $("paste-back").checked});
  } else if (state.mode === "outpaint") {
    const sides = {outpaint_left: number("outpaint-left"), outpaint_right: number("outpaint-right"),
                   outpaint_top: number("outpaint-top"), outpaint_bottom: number("outpaint-bottom")};
    if (!Object.values(sides).some((value) => value > 0)) throw new Error("outpaint needs pixels to add on at least one side");
    Object.assign(body, sides, {mask_blur: number("outpaint-mask-blur"), inpainting_fill: $("outpaint-fill").value});
  }
  return body;
}

// -- running a job ----------------------------------------------------------------------------------------
function showError(message) { $("error").textContent = message || ""; }
function setStatus(text) { $("status").textContent = text; }

async function generate() {
  showError("");
  let body;
  try { body = buildRequest(); } catch (error) { showError(error.message); return; }
  const answer = await api("/jobs", {method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(body)});
  const data = await answer.json();
  if (answer.status !== 202) { showError(data.detail || answer.statusText); return; }
  follow(data.id);
  refreshQueue();
}

async function cancel() {
  if (!state.job) return;
  await api(`/jobs/${state.job}`, {method: "DELETE"});
  refreshQueue();
}

function follow(id) {
  // The page follows its newest job: an older one that is still running only refreshes the gallery when it ends.
  state.job = id;
  const current = () => state.job === id;
  const started = performance.now();
  $("cancel").disabled = false;
  $("progress").value = 0;
  setStatus("Queued");
  const events = new EventSource(`/api/v1/jobs/${id}/events?previews=true`);
  events.addEventListener("queued", (message) => {
    const event = JSON.parse(message.data);
    if (current()) setStatus(event.position ? `Queued: ${event.position} ahead` : "Queued: next");
  });
  events.addEventListener("started", () => { if (current()) setStatus("Starting…"); });
  events.addEventListener("progress", (message) => {
    if (!current()) return;
    const event = JSON.parse(message.data);
    $("progress").value = event.step / event.steps;
    setStatus(`${event.phase === "hires" ? "Hires. fix " : ""}Step ${event.step}/${event.steps}`);
    if (event.preview) showPreview("data:image/png;base64," + event.preview);
  });
  const end = async (kind, message) => {
    events.close();
    const event = JSON.parse(message.data);
    const mine = current();
    if (mine) { state.job = null; $("cancel").disabled = true; }
    await refreshGallery();
    refreshQueue();
    if (!mine) return;
    if (kind === "finished") {
      $("progress").value = 1;
      setStatus(`Done in ${((performance.now() - started) / 1000).toFixed(1)} s`);
      showResults(event.images);  // the final image takes the preview's place
    } else {
      $("progress").value = 0;
      setStatus(kind === "failed" ? "Failed" : "Cancelled");
      if (kind === "failed") showError(event.error);
      if ($("stage").dataset.state === "preview") showEntry(state.shown);  // the preview never stays behind
    }
  };
  for (const kind of ["finished", "failed", "cancelled"]) events.addEventListener(kind, (message) => end(kind, message));
}

// -- the result stage: the live preview, then the final images --------------------------------------------
function showPreview(src) {
  $("stage").dataset.state = "preview";
  $("result").src = src;
}

function showEntry(entry) {
  state.shown = entry || null;
  const stage = $("stage");
  for (const id of ["result-reuse", "result-to-img2img", "result-to-inpaint"]) $(id).disabled = !entry;
  $("result-open").setAttribute("aria-disabled", String(!entry));
  if (!entry) {
    stage.dataset.state = "empty";
    $("result").removeAttribute("src");
    $("result-info").textContent = "";
    $("result-open").removeAttribute("href");
    return;
  }
  stage.dataset.state = "final";
  $("result").src = `/api/v1/images/${entry.id}`;
  $("result").classList.toggle("pixelated", entry.width < 384);
  $("result").dataset.imageId = entry.id;
  $("result-info").textContent = entry.infotext;
  $("result-open").href = `/api/v1/images/${entry.id}`;
  for (const thumb of $("result-strip").children) thumb.setAttribute("aria-current", String(thumb.dataset.id === entry.id));
}

function showResults(imageIds) {
  const entries = imageIds.map((id) => state.gallery.find((entry) => entry.id === id)).filter(Boolean);
  $("result-strip").replaceChildren(...(entries.length > 1 ? entries.map((entry) => {
    const thumb = new Image();
    thumb.src = `/api/v1/images/${entry.id}/thumbnail?size=128`;
    thumb.alt = `seed ${entry.seed}`;
    thumb.dataset.id = entry.id;
    thumb.addEventListener("click", () => showEntry(entry));
    return thumb;
  }) : []));
  showEntry(entries[0]);
}

async function sendToMode(entry, mode) {
  const blob = await (await api(`/images/${entry.id}`)).blob();
  await setSource(await readFile(blob));
  setMode(mode);
  $("source").scrollIntoView({behavior: "smooth", block: "start"});
}

// -- reuse settings: the infotext's parameters back into the fields ----------------------------------------
function useSettings(p, controls) {
  const set = (id, value) => { if (value !== undefined && value !== null && value !== "") setValue(id, value); };
  $("prompt").value = p["Prompt"] || "";
  $("negative").value = p["Negative prompt"] || "";
  set("steps", p["Steps"]);
  set("cfg", p["CFG scale"]);
  setValue("cfg-min-t", p["CFG min timestep"] || 0);
  set("seed", p["Seed"]);
  if (p.width) { setValue("width", p.width); setValue("height", p.height); }
  const sampler = p["Sampler"] + (p["Schedule type"] ? " " + p["Schedule type"] : "");
  if ([...$("sampler").options].some((o) => o.value === sampler)) setValue("sampler", sampler);
  for (const field of Object.keys(RECOMMENDABLE)) state.touched.add(field);  // the image's settings, kept on a model switch
  if ([...$("model").options].some((o) => o.value === p["Model"])) $("model").value = p["Model"];
  const hires = p["Hires upscale"] !== undefined;
  $("hires-enable").checked = hires;
  if (hires) {
    // The infotext's Size is the first pass's (A1111's convention), as width and height are.
    set("hires-scale", p["Hires upscale"]);
    set("hires-steps", p["Hires steps"] || 0);
    set("hires-upscaler", p["Hires upscaler"]);
    set("hires-strength", p["Denoising strength"]);
  } else {
    set("strength", p["Denoising strength"]);
  }
  set("mask-blur", p["Mask blur"]);
  set("outpaint-mask-blur", p["Mask blur"]);
  set("inpainting-fill", p["Masked content"]);
  set("outpaint-fill", p["Masked content"]);
  if (typeof p["Outpaint"] === "string") {
    for (const side of ["left", "right", "top", "bottom"]) setValue(`outpaint-${side}`, 0);
    for (const pair of p["Outpaint"].split(" ")) {
      const [side, value] = pair.split("=");
      if ($(`outpaint-${side}`)) setValue(`outpaint-${side}`, value);
    }
  }
  useControlSettings(controls);
  updateHiresNote();
  applyRecommended();  // the note and placeholders; touched fields keep the image's values
}

// -- hires fix ------------------------------------------------------------------------------------------
function updateHiresNote() {
  const on = $("hires-enable").checked;
  $("hires-badge").hidden = !on;
  const model = selectedModel();
  const native = (model && model.native_size) || null;
  const width = number("width") || native;
  const height = number("height") || native;
  const scale = number("hires-scale");
  $("hires-note").textContent = !on ? "Off: jobs are drawn in one pass."
    : width && height ? `Upscale from ${width}×${height} to ${Math.floor(width * scale)}×${Math.floor(height * scale)}`
    : `Upscale by ${scale}`;
}

function setupHires() {
  for (const id of ["hires-scale", "hires-steps", "hires-strength", "hires-upscaler"]) {
    $(id).addEventListener("input", () => { $("hires-enable").checked = true; updateHiresNote(); });
  }
  for (const id of ["hires-enable", "width", "height"]) $(id).addEventListener("input", updateHiresNote);
  $("hires-enable").addEventListener("change", updateHiresNote);
}

// -- the gallery ------------------------------------------------------------------------------------------
async function refreshGallery() {
  state.gallery = await (await api("/images?limit=500")).json();
  if (state.gallery.length) state.lastSeed = state.gallery[0].seed;
  renderGallery();
}

function matches(entry, words) {
  const text = entry.infotext.toLowerCase();
  return words.every((word) => text.includes(word));
}

function renderGallery() {
  const words = $("search").value.toLowerCase().split(/\s+/).filter(Boolean);
  const shown = state.gallery.filter((entry) => matches(entry, words));
  $("gallery").classList.toggle("filtered", words.length > 0);
  $("gallery-count").textContent = words.length ? `${shown.length} of ${state.gallery.length}` : `${state.gallery.length} image${state.gallery.length === 1 ? "" : "s"}`;
  $("gallery").replaceChildren(...shown.map(card));
}

function card(entry) {
  const element = document.createElement("article");
  element.className = "card";
  element.dataset.id = entry.id;
  const thumb = new Image();
  thumb.src = `/api/v1/images/${entry.id}/thumbnail?size=256`;
  thumb.alt = `${entry.parameters["Prompt"] || "image"} (seed ${entry.seed})`;
  thumb.title = "Show it on the stage";
  thumb.addEventListener("click", () => { showEntry(entry); $("stage").scrollIntoView({behavior: "smooth", block: "nearest"}); });
  const info = document.createElement("div");
  info.className = "info";
  info.title = entry.infotext;
  const [prompt, ...rest] = entry.infotext.split("\n");
  const strong = document.createElement("b");
  strong.textContent = prompt;
  info.append(strong, document.createElement("br"), rest.join(" · "));
  const buttons = document.createElement("div");
  buttons.className = "buttons";
  const button = (text, onClick, className = "") => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.className = className;
    b.addEventListener("click", onClick);
    buttons.appendChild(b);
    return b;
  };
  button("Reuse settings", () => useSettings(entry.parameters, entry.controls), "reuse");
  button("To img2img", () => sendToMode(entry, "img2img"), "to-img2img").title = "Send to img2img";
  const remove = button("Delete", async () => {
    if (!remove.classList.contains("confirm")) {  // two clicks: the first asks
      remove.classList.add("confirm");
      remove.textContent = "Delete?";
      setTimeout(() => { remove.classList.remove("confirm"); remove.textContent = "Delete"; }, 4000);
      return;
    }
    const answer = await api(`/images/${entry.id}`, {method: "DELETE"});
    if (answer.status !== 204) { showError(`could not delete: ${answer.statusText}`); return; }
    if (state.shown && state.shown.id === entry.id) showEntry(null);
    await refreshGallery();
  }, "delete");
  remove.setAttribute("aria-label", `Delete image ${entry.id}`);
  element.append(thumb, info, buttons);
  return element;
}

// -- the queue --------------------------------------------------------------------------------------------
async function refreshQueue() {
  const [running, queued] = await Promise.all(["running", "queued"].map((s) => api(`/jobs?status=${s}`).then((r) => r.json())));
  const jobs = [...running, ...queued];
  $("queue").replaceChildren(...(jobs.length ? jobs.map((job) => {
    const row = document.createElement("div");
    row.className = "job";
    const text = document.createElement("span");
    text.textContent = `${job.status} ${job.step}/${job.steps || job.request.steps || "?"} · ${job.request.prompt}`;
    const stop = document.createElement("button");
    stop.type = "button";
    stop.className = "ghost small";
    stop.textContent = "Cancel";
    stop.addEventListener("click", async () => { await api(`/jobs/${job.id}`, {method: "DELETE"}); refreshQueue(); });
    row.append(text, stop);
    return row;
  }) : [Object.assign(document.createElement("em"), {textContent: "empty"})]));
}

// -- keyboard shortcuts (listed in the page's footer) -------------------------------------------------------
function typing(target) {
  return target.closest("input, textarea, select, [contenteditable]") !== null;
}

function setupShortcuts() {
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); generate(); }
    else if (event.key === "Escape" && state.job) { event.preventDefault(); cancel(); }
    else if (event.altKey && /^[1-4]$/.test(event.key)) { event.preventDefault(); setMode(MODES[Number(event.key) - 1]); }
    else if (event.key === "/" && !typing(event.target)) { event.preventDefault(); $("search").focus(); }
  });
}

// -- start-up ---------------------------------------------------------------------------------------------
function setup() {
  watchTouched();
  setupTabs();
  setupSourceImage();
  setupMaskPainting();
  setupHires();
  setupControls();
  setupShortcuts();
  $("generate").addEventListener("click", generate);
  $("cancel").addEventListener("click", cancel);
  $("model").addEventListener("change", () => applyRecommended());
  $("use-recommended").addEventListener("click", () => applyRecommended(true));
  $("dice").addEventListener("click", () => setValue("seed", -1));
  $("reuse-seed").addEventListener("click", () => { if (state.lastSeed !== null) setValue("seed", state.lastSeed); });
  $("swap-size").addEventListener("click", () => {
    const [w, h] = [$("width").value, $("height").value];
    setValue("width", h); setValue("height", w); updateHiresNote();
  });
  $("search").addEventListener("input", renderGallery);
  $("result-reuse").addEventListener("click", () => state.shown && useSettings(state.shown.parameters, state.shown.controls));
  $("result-to-img2img").addEventListener("click", () => state.shown && sendToMode(state.shown, "img2img"));
  $("result-to-inpaint").addEventListener("click", () => state.shown && sendToMode(state.shown, "inpaint"));
  loadModelsAndSamplers().catch((error) => showError(`could not load models: ${error}`));
  refreshGallery();
  refreshQueue();
  setInterval(() => refreshQueue().catch(() => {}), 2000);  // a server restart must not flood the console
}

setup();
