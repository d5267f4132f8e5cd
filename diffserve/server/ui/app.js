// The playground's controller: the model's description sets up the form; Generate sends the form to the
// API as any client would (images streamed over SSE for step progress, videos as polled jobs).
import { ApiError, apiKey, call, events, jsonBody } from "./api.js";
import { addImage, addVideo } from "./gallery.js";

const $ = (id) => document.getElementById(id);
const HEALTH_EVERY_MS = 5000;
const POLL_EVERY_MS = 250; // what the server's openai-poll-after-ms header suggests for video jobs

let model = null; // GET ui/model, once the key (if any) is accepted and the model has loaded
let modelError = null; // why `model` is null, in the API's words
let running = null; // { cancel() } while a generation runs

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setProgress(percent, note = "") {
  $("progress").value = percent;
  $("progress-text").textContent = `${percent}%${note ? ` (${note})` : ""}`;
}

// ---- the model: its name, task, defaults and limits shape the form ----------------------------------

function humanize(name) {
  const words = name.replace(/_/g, " ");
  return words[0].toUpperCase() + words.slice(1);
}

function bound(id, attrs) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) $(id).removeAttribute(name);
    else $(id).setAttribute(name, value);
  }
}

function configure(m) {
  const video = m.task === "video";
  const d = m.defaults;
  const lim = m.limits;
  $("model-name").textContent = m.model_id;
  $("model-task").textContent = `(${m.family}, ${m.task})`;
  for (const el of document.querySelectorAll(".video-only")) el.hidden = !video;
  for (const el of document.querySelectorAll(".image-only")) el.hidden = video;
  for (const side of ["width", "height"]) {
    bound(side, { min: lim.multiple, max: lim.max_side, step: lim.multiple, placeholder: d[side] });
  }
  bound("steps", { max: lim.max_steps, placeholder: d.num_inference_steps });
  bound("guidance", { max: lim.max_guidance, placeholder: d.guidance_scale });
  bound("n", { max: lim.max_n });
  bound("frames", { max: lim.max_frames, step: lim.frame_step, placeholder: d.num_frames });
  bound("fps", { max: lim.max_fps, placeholder: d.fps });
  bound("strength", { placeholder: d.strength });
  bound("prompt", { maxlength: lim.max_prompt_chars });
  $("upload").hidden = !m.accepts_image;
  $("mask-field").hidden = !(m.accepts_mask && !video);
  $("image").labels[0].textContent = video ? "Reference image (first frame)" : "Image to edit";
  const box = $("extension-fields");
  for (const name of m.extensions) {
    if ($(`ext-${name}`)) continue;
    // Every extension so far is a number (step_cache_threshold: 0 turns the cache off for the request).
    const field = document.createElement("div");
    field.className = "field";
    const label = document.createElement("label");
    label.htmlFor = `ext-${name}`;
    label.textContent = humanize(name);
    const input = document.createElement("input");
    Object.assign(input, { id: `ext-${name}`, name, type: "number", step: "any", min: "0" });
    field.append(label, input);
    box.append(field);
  }
  $("extensions").hidden = m.extensions.length === 0;
}

let loading = null;

// One request at a time: the health poll and the key form may both ask at once.
function loadModel() {
  loading ||= fetchModel().finally(() => (loading = null));
  return loading;
}

async function fetchModel() {
  try {
    model = await (await call("ui/model")).json();
    modelError = null;
  } catch (err) {
    model = null;
    modelError = err.message;
    $("key-status").textContent = err.status === 401 ? err.message : "";
    return;
  }
  $("key-status").textContent = apiKey.get() ? "Key accepted." : "";
  configure(model);
}

async function pollHealth() {
  const el = $("health");
  try {
    const res = await fetch("health");
    const body = await res.json();
    el.dataset.state = res.ok ? "ok" : body.status || "down";
    el.textContent = res.ok ? `ready (queue ${body.queue_depth})` : body.error?.message || body.status;
    if (res.ok) $("model-name").textContent = body.model;
    // A model that was still loading is described once it is up (not while the key is the problem).
    if (res.ok && !model && !$("key-status").textContent) await loadModel();
  } catch {
    el.dataset.state = "down";
    el.textContent = "unreachable";
  }
  setTimeout(pollHealth, HEALTH_EVERY_MS);
}

// ---- a request from the form: blank fields are left out, so the model's defaults apply --------------

function collect(video) {
  const fields = { prompt: $("prompt").value };
  const text = (id) => $(id).value.trim();
  const number = (id, name) => {
    if (text(id) !== "") fields[name] = Number(text(id));
  };
  if (text("negative-prompt")) fields.negative_prompt = $("negative-prompt").value;
  if (text("width") || text("height")) fields.size = `${text("width")}x${text("height")}`;
  number("steps", "num_inference_steps");
  number("guidance", "guidance_scale");
  if (text("seed")) fields.seed = text("seed");
  if (video) {
    number("frames", "num_frames");
    number("fps", "fps");
  } else {
    number("n", "n");
    fields.output_format = $("output-format").value;
  }
  for (const input of $("extension-fields").querySelectorAll("input")) {
    if (input.value.trim() !== "") fields[input.name] = Number(input.value);
  }
  const files = { image: $("image").files[0], mask: $("mask").files[0] };
  if (!model.accepts_image) files.image = undefined;
  if (files.image && !video) number("strength", "strength");
  return { fields, files };
}

function formOf(fields, files) {
  const form = new FormData();
  for (const [name, value] of Object.entries(fields)) form.append(name, String(value));
  for (const [name, file] of Object.entries(files)) if (file) form.append(name, file);
  return form;
}

async function runImage(fields, files) {
  const abort = new AbortController();
  running = { cancel: () => abort.abort() }; // the server cancels a request whose client went away
  const body = { ...fields, stream: true };
  const edit = Boolean(files.image);
  const res = edit
    ? await call("v1/images/edits", { method: "POST", form: formOf(body, { image: files.image, mask: files.mask }), signal: abort.signal })
    : await call("v1/images/generations", { method: "POST", json: jsonBody(body), signal: abort.signal });
  let images = 0;
  for await (const { event, data } of events(res)) {
    if (event.endsWith(".progress")) {
      setProgress(data.progress, `step ${data.step} of ${data.total_steps}`);
    } else if (event.endsWith(".completed")) {
      images += 1;
      setProgress(100, "done");
      addImage(data, { ...fields, ...(edit ? { edited: files.image.name } : {}) });
    } else if (event === "error") {
      throw new ApiError(data.error.message, 0, data.error.code);
    }
  }
  if (!images) throw new ApiError("The stream ended without an image.");
}

async function runVideo(fields, files) {
  const res = files.image
    ? await call("v1/videos", { method: "POST", form: formOf(fields, { input_reference: files.image }) })
    : await call("v1/videos", { method: "POST", json: jsonBody(fields) });
  let job = await res.json();
  let cancelled = false;
  running = {
    cancel: () => {
      cancelled = true;
      call(`v1/videos/${job.id}`, { method: "DELETE" }).catch((err) => showError(err.message));
    },
  };
  while (job.status === "queued" || job.status === "in_progress") {
    setProgress(job.progress, job.status.replace("_", " "));
    await new Promise((resolve) => setTimeout(resolve, POLL_EVERY_MS));
    job = await (await call(`v1/videos/${job.id}`)).json();
  }
  if (job.status !== "completed") {
    throw new ApiError(job.error?.message || (cancelled ? "Cancelled." : `The job ended: ${job.status}.`));
  }
  setProgress(100, "done");
  // Fetched with the key, then shown from a blob: a <video src> cannot send an Authorization header.
  const blob = await (await call(`v1/videos/${job.id}/content`)).blob();
  addVideo(job, blob, fields);
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  showError("");
  if (!model) await loadModel();
  if (!model) return showError(modelError || "The model is not loaded yet.");
  const video = model.task === "video";
  const { fields, files } = collect(video);
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("generate-form").setAttribute("aria-busy", "true");
  setProgress(0, video ? "queued" : "starting");
  try {
    await (video ? runVideo(fields, files) : runImage(fields, files));
  } catch (err) {
    showError(err.name === "AbortError" ? "Cancelled." : err.message);
  } finally {
    running = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
    $("generate-form").removeAttribute("aria-busy");
  }
}

function init() {
  $("api-key").value = apiKey.get();
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    apiKey.set($("api-key").value.trim());
    await loadModel();
  });
  $("generate-form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", () => running && running.cancel());
  // Ctrl+Enter (Cmd+Enter) in a text box generates, as in chat boxes; plain Enter keeps its newline.
  for (const id of ["prompt", "negative-prompt"]) {
    $(id).addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("generate-form").requestSubmit();
    });
  }
  loadModel();
  pollHealth();
}

init();
