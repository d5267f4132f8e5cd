// The page's only way to the server: the public HTTP API, with the key from this tab's sessionStorage.

const KEY = "diffserve.apiKey";

// sessionStorage, not localStorage: the key lives as long as the tab and never reaches a URL or a cookie.
export const apiKey = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (value) => (value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY)),
};

export class ApiError extends Error {
  constructor(message, status = 0, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// The API's own words ({"error": {"message": ...}}); the HTTP status line only when the body has none.
export async function errorOf(res) {
  let message = `${res.status} ${res.statusText}`.trim();
  let code = null;
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) ({ message, code } = body.error);
  } catch {
    // not JSON (a proxy's page): the status line stands
  }
  return new ApiError(message, res.status, code);
}

// fetch a path relative to the page; throws ApiError on any non-2xx answer.
export async function call(path, { method = "GET", json, form, signal } = {}) {
  const headers = {};
  const key = apiKey.get();
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = json;
  } else if (form !== undefined) {
    body = form; // the browser sets the multipart boundary
  }
  const res = await fetch(path, { method, headers, body, signal });
  if (!res.ok) throw await errorOf(res);
  return res;
}

const NUMBER = /^-?\d+(\.\d+)?([eE][+-]?\d+)?$/;

// JSON text for a request. A seed may be above 2^53, which a JS number would round, so a numeric seed goes
// into the text digit for digit; anything else is sent as a string, and the API says what is wrong with it.
export function jsonBody(fields) {
  const { seed, ...rest } = fields;
  const text = JSON.stringify(rest);
  if (seed === undefined) return text;
  const raw = NUMBER.test(seed) ? seed : JSON.stringify(seed);
  return `${text.slice(0, -1)}${text.length > 2 ? "," : ""}"seed":${raw}}`;
}

// Server-sent events from a fetch response. Not EventSource: it can only GET and cannot send the key.
export async function* events(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue; // comments are the server's keep-alives
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}
