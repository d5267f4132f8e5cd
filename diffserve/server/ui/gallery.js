// This tab's outputs, newest first, each with the settings that made it and a download link. Outputs are
// blob: URLs (not data: URLs) so that large images and videos cost the page one copy, not a base64 string.

const $ = (id) => document.getElementById(id);
let count = 0;

function blobOf(b64, type) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

function settingsList(settings) {
  const dl = document.createElement("dl");
  for (const [name, value] of Object.entries(settings)) {
    if (value === undefined || value === null || value === "") continue;
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    dl.append(dt, dd);
  }
  return dl;
}

function addCard(media, blob, filename, settings) {
  count += 1;
  const li = document.createElement("li");
  li.className = "output";
  const link = document.createElement("a");
  link.href = media.src;
  link.download = filename;
  link.textContent = `Download ${filename}`;
  li.append(media, settingsList(settings), link);
  $("outputs").prepend(li);
  $("gallery-empty").hidden = true;
  return li;
}

// `event` is an image_generation.completed (or image_edit.completed) SSE event.
export function addImage(event, settings) {
  const blob = blobOf(event.b64_json, `image/${event.output_format}`);
  const img = document.createElement("img");
  img.src = URL.createObjectURL(blob);
  img.alt = `Generated image: ${settings.prompt}`;
  img.dataset.size = event.size;
  const ext = event.output_format === "jpeg" ? "jpg" : event.output_format;
  return addCard(img, blob, `diffserve-${count + 1}.${ext}`, { size: event.size, ...settings });
}

// `job` is the completed video object; `blob` its /content (video/mp4).
export function addVideo(job, blob, settings) {
  const video = document.createElement("video");
  video.controls = true;
  video.loop = true;
  video.muted = true; // muted so that autoplay is allowed; Wan videos have no sound anyway
  video.autoplay = true;
  video.src = URL.createObjectURL(blob);
  video.dataset.videoId = job.id;
  video.dataset.contentType = blob.type;
  video.setAttribute("aria-label", `Generated video: ${settings.prompt}`);
  return addCard(video, blob, `${job.id}.mp4`, { id: job.id, size: job.size, seconds: job.seconds, ...settings });
}
