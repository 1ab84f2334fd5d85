// sdrt web page: plain JS over the A1111-compatible API of the same server (no CDN, no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { tab: "txt2img", lastSeed: null, busy: false, images: { img2img: null, inpaint: null, outpaint: null }, pnginfo: null };
let counter = 0;

async function api(path, body) {
  const init = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const res = await fetch(path, init);
  const data = await res.json().catch(() => null);
  if (!res.ok) {
    let msg = `HTTP ${res.status}`;
    if (data && Array.isArray(data.detail)) msg += ": " + data.detail.map((d) => d.msg).join("; ");
    else if (data && data.detail) msg += ": " + data.detail;
    if (res.status === 429) msg += ` (retry after ${res.headers.get("Retry-After")} s)`;
    throw new Error(msg);
  }
  return data;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function showTab(tab) {
  state.tab = tab;
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === tab));
  document.querySelectorAll(".panel").forEach((p) => { p.hidden = p.dataset.panel !== tab; });
  $("generate").hidden = tab === "pnginfo";
  $("interrupt").hidden = tab === "pnginfo";
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot read this image"));
    img.src = src;
  });
}

function common() {
  const num = (id) => Number($(id).value);
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative-label").hidden ? "" : $("negative_prompt").value,
    steps: num("steps"),
    sampler_name: $("sampler").value,
    scheduler: $("scheduler").value,
    cfg_scale: num("cfg_scale"),
    seed: num("seed"),
    n_iter: num("n_iter"),
    batch_size: num("batch_size"),
    styles: [...$("styles").selectedOptions].map((o) => o.value),
    ...familyValues(),
  };
}

// The current model's family fields (GET /sdrt/v1/model-form): its steps and CFG defaults, its own options (FLUX.1
// dev's Distilled CFG Scale, SD 3.5's skip-layer guidance), and whether the negative prompt applies.
async function setupFamily() {
  const form = await api("/sdrt/v1/model-form");
  state.form = form;
  $("steps").value = form.defaults.steps;
  $("cfg_scale").value = form.defaults.cfg_scale;
  const box = $("family-fields");
  box.replaceChildren();
  for (const f of form.fields) {
    const label = document.createElement("label");
    label.title = f.help;
    const input = document.createElement("input");
    input.id = `family-${f.name}`;
    Object.assign(input.dataset, { field: f.field, kind: f.kind, label: f.label, initial: String(f.default) });
    input.type = f.kind === "ints" ? "text" : "number";
    if (f.kind === "ints") input.placeholder = "7,8,9";
    else input.step = "any";
    input.value = f.default;
    label.append(`${f.label} `, input);
    box.append(label);
  }
  box.hidden = form.fields.length === 0;
  updateNegative();
}

function updateNegative() {
  const withCfg = state.form && state.form.negative_prompt === "with_cfg";
  $("negative-label").hidden = Boolean(withCfg) && Number($("cfg_scale").value) <= 1;
}

function familyValues() {  // the fields changed from their defaults (the server fills in the rest)
  const body = {};
  for (const input of document.querySelectorAll("#family-fields input")) {
    const text = input.value.trim();
    if (text === "" || text === input.dataset.initial) continue;
    body[input.dataset.field] = input.dataset.kind === "ints" ? text.split(/[\s,]+/).filter(Boolean).map(Number) : Number(text);
  }
  return body;
}

async function setupModels() {
  const [models, options, styles] = await Promise.all([api("/sdapi/v1/sd-models"), api("/sdapi/v1/options"), api("/sdapi/v1/prompt-styles")]);
  for (const m of models) {
    const option = new Option(m.unusable ? `${m.title} (unusable)` : m.title, m.title);
    option.disabled = Boolean(m.unusable);
    if (m.unusable) option.title = m.unusable;
    $("model").add(option);
  }
  $("model").value = options.sd_model_checkpoint;
  $("model").onchange = async () => {
    const title = $("model").value;
    setStatus(`loading ${title}...`);
    $("model").disabled = true;
    try {
      await api("/sdapi/v1/options", { sd_model_checkpoint: title });
      const now = await api("/sdapi/v1/options");
      if (![...$("model").options].some((o) => o.value === now.sd_model_checkpoint)) {
        $("model").add(new Option(now.sd_model_checkpoint, now.sd_model_checkpoint));  // the title gained its hash
      }
      $("model").value = now.sd_model_checkpoint;
      await setupFamily();
      setStatus(`model: ${now.sd_model_checkpoint}`);
    } catch (e) {
      setStatus(e.message, true);
      $("model").value = options.sd_model_checkpoint;
    } finally {
      $("model").disabled = false;
    }
  };
  for (const s of styles) $("styles").add(new Option(s.name, s.name));
  $("styles-label").hidden = styles.length === 0;
}

function hires() {
  if (!$("enable_hr").checked) return {};
  return {
    enable_hr: true,
    hr_upscaler: $("hr_upscaler").value,
    hr_scale: Number($("hr_scale").value),
    hr_second_pass_steps: Number($("hr_second_pass_steps").value),
    denoising_strength: Number($("hr-strength").value),
  };
}

function maskDataURL() {
  const mask = $("inpaint-mask");
  const out = document.createElement("canvas");
  out.width = mask.width;
  out.height = mask.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(mask, 0, 0); // white strokes on black: white = repaint
  return out.toDataURL("image/png");
}

function request() {
  const body = common();
  const size = { width: Number($("width").value), height: Number($("height").value) };
  if (state.tab === "txt2img") return ["/sdapi/v1/txt2img", { ...body, ...size, ...hires() }];
  if (state.tab === "img2img") {
    if (!state.images.img2img) throw new Error("choose an image first");
    return ["/sdapi/v1/img2img", { ...body, ...size, init_images: [state.images.img2img], denoising_strength: Number($("img2img-strength").value) }];
  }
  if (state.tab === "inpaint") {
    if (!state.images.inpaint) throw new Error("choose an image first");
    return ["/sdapi/v1/img2img", {
      ...body, ...size,
      init_images: [state.images.inpaint],
      mask: maskDataURL(),
      denoising_strength: Number($("inpaint-strength").value),
      mask_blur: Number($("mask-blur").value),
      inpainting_fill: Number($("inpainting-fill").value),
      inpaint_full_res: $("inpaint-full-res").checked,
      inpaint_full_res_padding: Number($("inpaint-padding").value),
      inpainting_mask_invert: $("mask-invert").checked ? 1 : 0,
    }];
  }
  if (!state.images.outpaint) throw new Error("choose an image first");
  const px = Number($("out-pixels").value);
  const side = (id) => ($(id).checked ? px : 0);
  return ["/sdrt/v1/outpaint", {
    ...body, image: state.images.outpaint,
    left: side("out-left"), right: side("out-right"), up: side("out-up"), down: side("out-down"),
  }];
}

async function pollProgress() {
  while (state.busy) {
    try {
      const p = await api("/sdapi/v1/progress");
      if (p.state.job) {
        const pct = Math.round(p.progress * 100);
        $("progress-fill").style.width = pct + "%";
        $("progress").setAttribute("aria-valuenow", pct);
        const eta = p.eta_relative > 0 ? `, ETA ${p.eta_relative.toFixed(1)} s` : "";
        setStatus(`${p.state.job}: batch ${p.state.job_no + 1}/${p.state.job_count}, step ${p.state.sampling_step}/${p.state.sampling_steps}${eta}`);
        if (p.current_image) {
          $("preview").src = "data:image/png;base64," + p.current_image;
          $("preview").hidden = false;
        }
      } else if (state.busy) {
        setStatus("waiting in the queue...");
      }
    } catch (e) { /* the next poll retries */ }
    await new Promise((r) => setTimeout(r, 400));
  }
}

function addToGallery(b64, infotext, seed) {
  const item = document.createElement("div");
  item.className = "item";
  const src = "data:image/png;base64," + b64;
  const img = document.createElement("img");
  img.src = src;
  img.alt = infotext;
  const links = document.createElement("div");
  links.className = "links";
  const download = document.createElement("a");
  download.href = src;
  download.download = `${String(counter++).padStart(5, "0")}-${seed}.png`;
  download.textContent = "download";
  const reuse = document.createElement("a");
  reuse.href = "#";
  reuse.textContent = "use seed";
  reuse.onclick = (e) => { e.preventDefault(); $("seed").value = seed; };
  links.append(download, reuse);
  const pre = document.createElement("pre");
  pre.className = "infotext";
  pre.textContent = infotext;
  item.append(img, links, pre);
  $("gallery").prepend(item);
}

async function generate(event) {
  event.preventDefault();
  if (state.busy) return;
  let path, body;
  try { [path, body] = request(); } catch (e) { setStatus(e.message, true); return; }
  state.busy = true;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress-fill").style.width = "0%";
  setStatus("starting...");
  const polling = pollProgress();
  const started = performance.now();
  try {
    const res = await api(path, body);
    const info = JSON.parse(res.info);
    res.images.forEach((b64, i) => addToGallery(b64, info.infotexts[i] || "", info.all_seeds[i]));
    if (info.all_seeds.length) state.lastSeed = info.all_seeds[0];
    $("progress-fill").style.width = "100%";
    const took = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(`${res.images.length} image(s) in ${took} s` + (res.images.length < info.all_seeds.length ? " (interrupted)" : ""));
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    state.busy = false;
    await polling;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
    $("preview").hidden = true;
  }
}

function setupInpaint() {
  const mask = $("inpaint-mask");
  const ctx = mask.getContext("2d");
  let drawing = false, last = null;
  const point = (e) => {
    const r = mask.getBoundingClientRect();
    return { x: (e.clientX - r.left) * (mask.width / r.width), y: (e.clientY - r.top) * (mask.height / r.height) };
  };
  const stroke = (p) => {
    const scale = mask.width / mask.getBoundingClientRect().width;
    ctx.strokeStyle = ctx.fillStyle = "#fff";
    ctx.lineWidth = Number($("brush-size").value) * scale;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo((last || p).x, (last || p).y);
    ctx.lineTo(p.x, p.y);
    ctx.stroke();
    last = p;
  };
  mask.addEventListener("pointerdown", (e) => { drawing = true; last = null; mask.setPointerCapture(e.pointerId); stroke(point(e)); });
  mask.addEventListener("pointermove", (e) => { if (drawing) stroke(point(e)); });
  const stop = () => { drawing = false; last = null; };
  mask.addEventListener("pointerup", stop);
  mask.addEventListener("pointercancel", stop);
  $("mask-clear").onclick = () => ctx.clearRect(0, 0, mask.width, mask.height);
  $("inpaint-file").onchange = async (e) => {
    if (!e.target.files.length) return;
    const src = await readFile(e.target.files[0]);
    const img = await loadImage(src);
    state.images.inpaint = src;
    for (const c of [$("inpaint-image"), mask]) { c.width = img.naturalWidth; c.height = img.naturalHeight; }
    $("inpaint-image").getContext("2d").drawImage(img, 0, 0);
  };
}

function setupImageInput(tab) {
  $(`${tab}-file`).onchange = async (e) => {
    if (!e.target.files.length) return;
    state.images[tab] = await readFile(e.target.files[0]);
    $(`${tab}-view`).src = state.images[tab];
  };
}

async function pngInfo(file) {
  try {
    const res = await api("/sdapi/v1/png-info", { image: await readFile(file) });
    state.pnginfo = res.parameters;
    $("pnginfo-text").textContent = res.info || "(no generation parameters in this image)";
    $("pnginfo-send").disabled = !res.info;
  } catch (e) {
    $("pnginfo-text").textContent = e.message;
    $("pnginfo-send").disabled = true;
  }
}

function sendParameters() {
  const p = state.pnginfo || {};
  const set = (id, key) => { if (p[key] !== undefined) $(id).value = p[key]; };
  set("prompt", "Prompt");
  set("negative_prompt", "Negative prompt");
  set("steps", "Steps");
  set("cfg_scale", "CFG scale");
  set("seed", "Seed");
  set("width", "Size-1");
  set("height", "Size-2");
  if (p.Sampler && [...$("sampler").options].some((o) => o.value === p.Sampler)) $("sampler").value = p.Sampler;
  const schedule = [...$("scheduler").options].find((o) => o.textContent === p["Schedule type"]);
  if (schedule) $("scheduler").value = schedule.value;
  $("enable_hr").checked = p["Hires upscale"] !== undefined || p["Hires resize-1"] !== undefined;
  set("hr_scale", "Hires upscale");
  set("hr_second_pass_steps", "Hires steps");
  set("hr-strength", "Denoising strength");
  if ([...$("hr_upscaler").options].some((o) => o.value === p["Hires upscaler"])) $("hr_upscaler").value = p["Hires upscaler"];
  for (const input of document.querySelectorAll("#family-fields input")) {
    if (p[input.dataset.label] !== undefined) input.value = p[input.dataset.label];
  }
  updateNegative();
  showTab("txt2img");
}

function setupPngInfo() {
  const drop = $("pnginfo-drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) pngInfo(e.dataTransfer.files[0]);
  });
  $("pnginfo-file").onchange = (e) => { if (e.target.files.length) pngInfo(e.target.files[0]); };
  $("pnginfo-send").onclick = sendParameters;
}

async function init() {
  document.querySelectorAll("#tabs button").forEach((b) => { b.onclick = () => showTab(b.dataset.tab); });
  $("form").addEventListener("submit", generate);
  $("interrupt").onclick = () => api("/sdapi/v1/interrupt", {}).catch((e) => setStatus(e.message, true));
  $("seed-random").onclick = () => { $("seed").value = -1; };
  $("seed-reuse").onclick = () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; };
  setupImageInput("img2img");
  setupImageInput("outpaint");
  setupInpaint();
  setupPngInfo();
  try {
    const [samplers, schedulers] = await Promise.all([api("/sdapi/v1/samplers"), api("/sdapi/v1/schedulers")]);
    for (const s of samplers) $("sampler").add(new Option(s.name, s.name));
    $("sampler").value = "Euler a";
    for (const s of schedulers) $("scheduler").add(new Option(s.label, s.name));
    await setupModels();
    await setupFamily();
    $("cfg_scale").addEventListener("input", updateNegative);
    const [modes, upscalers] = await Promise.all([api("/sdapi/v1/latent-upscale-modes"), api("/sdapi/v1/upscalers")]);
    for (const u of [...modes, ...upscalers]) $("hr_upscaler").add(new Option(u.name, u.name));
    document.body.dataset.ready = "1";
  } catch (e) {
    setStatus(e.message, true);
  }
}

init();
