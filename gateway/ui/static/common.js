// Shared helpers: the one fetch wrapper (API key, OpenAI error shape), in-place errors, files, drawing.

export const $ = (id) => document.getElementById(id);

const KEY_STORAGE = "vlmserve.apiKey";
let keyWaiters = [];

export class ApiError extends Error {
  constructor(status, message, code = null, param = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  const waiters = keyWaiters;
  keyWaiters = [];
  waiters.forEach((resolve) => resolve());
}

// Resolves once the user has entered a key (the dialog is opened by app.js on "vlmserve:need-key").
function waitForKey(message) {
  return new Promise((resolve) => {
    keyWaiters.push(resolve);
    document.dispatchEvent(new CustomEvent("vlmserve:need-key", { detail: message }));
  });
}

// The gateway's error body is OpenAI's {"error": {message, type, param, code}}.
async function toError(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
      param = body.error.param || null;
    }
  } catch {
    /* not JSON: keep the status line */
  }
  const retry = response.headers.get("Retry-After");
  if (retry) message += ` (retry after ${retry} s)`;
  return new ApiError(response.status, message, code, param);
}

// fetch() against the gateway (same origin only). Options: method, json, form (FormData), signal, accept.
// Returns the Response (ok) or throws ApiError. A 401 asks for a key once and retries.
export async function api(path, { method = "GET", json, form, signal, accept } = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = {};
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    if (accept) headers.Accept = accept;
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form) {
      body = form;
    }
    const response = await fetch(path, { method, headers, body, signal, cache: "no-store" });
    if (response.ok) return response;
    const error = await toError(response);
    if (response.status === 401 && attempt < 3) {
      await waitForKey(key ? `The key was refused: ${error.message}` : null);
      continue;
    }
    throw error;
  }
}

export async function apiJSON(path, options) {
  return (await api(path, options)).json();
}

export function showError(element, error) {
  if (!error) {
    element.hidden = true;
    element.textContent = "";
    return;
  }
  let text = error.message || String(error);
  if (error instanceof ApiError) {
    text = `${error.status}${error.code ? ` ${error.code}` : ""}: ${error.message}`;
  }
  element.textContent = text;
  element.hidden = false;
}

// Runs fn with the button disabled and errors shown in place.
export async function busy(button, errorElement, fn) {
  showError(errorElement, null);
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    return await fn();
  } catch (error) {
    showError(errorElement, error);
    return undefined;
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

export function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// An <img> for a File; rejects with a readable message when the browser cannot decode it.
export function loadImage(file) {
  return new Promise((resolve, reject) => {
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => {
      URL.revokeObjectURL(url);
      reject(new Error(`${file.name}: the browser cannot decode this file as an image`));
    };
    img.src = url;
  });
}

export function download(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-") || k.startsWith("aria-") || k === "role") node.setAttribute(k, v);
    else node[k] = v;
  }
  node.append(...children);
  return node;
}

// Draws the image onto a canvas at its own pixel size (so overlay coordinates are image pixels).
export function drawImage(canvas, img) {
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  canvas.getContext("2d").drawImage(img, 0, 0);
}

const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"];

function flatPolygons(polygons) {
  // Florence returns a list of polygons, each a flat [x1, y1, x2, y2, ...] list (or nested one level more).
  const out = [];
  const visit = (p) => {
    if (!Array.isArray(p) || !p.length) return;
    if (typeof p[0] === "number") {
      if (p.length >= 6) out.push(p);
    } else p.forEach(visit);
  };
  visit(polygons);
  return out;
}

// Draws Florence-2 objects ({label, bbox, quad_box?, polygons?}) over the canvas; returns the shapes drawn.
export function drawObjects(canvas, objects) {
  const ctx = canvas.getContext("2d");
  const line = Math.max(2, Math.round(Math.max(canvas.width, canvas.height) / 300));
  ctx.lineWidth = line;
  ctx.font = `${Math.max(12, line * 6)}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  let shapes = 0;
  (objects || []).forEach((obj, i) => {
    const color = COLORS[i % COLORS.length];
    ctx.strokeStyle = color;
    ctx.fillStyle = `${color}33`;
    let anchor = null;
    const polys = obj.quad_box ? [obj.quad_box] : flatPolygons(obj.polygons);
    if (polys.length) {
      for (const p of polys) {
        ctx.beginPath();
        ctx.moveTo(p[0], p[1]);
        for (let j = 2; j + 1 < p.length; j += 2) ctx.lineTo(p[j], p[j + 1]);
        ctx.closePath();
        ctx.fill();
        ctx.stroke();
        shapes++;
        anchor = anchor || [p[0], p[1]];
      }
    } else if (Array.isArray(obj.bbox) && obj.bbox.length === 4) {
      const [x1, y1, x2, y2] = obj.bbox;
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      shapes++;
      anchor = [x1, y1];
    }
    if (anchor && obj.label) {
      const text = String(obj.label).slice(0, 40);
      const w = ctx.measureText(text).width + 6;
      const h = Math.max(12, line * 6) + 4;
      const x = Math.max(0, Math.min(anchor[0], canvas.width - w)); // keep the label inside the image
      const y = Math.max(0, anchor[1] - h);
      ctx.fillStyle = color;
      ctx.fillRect(x, y, w, h);
      ctx.fillStyle = "#fff";
      ctx.fillText(text, x + 3, y + 2);
    }
  });
  canvas.dataset.shapes = String(shapes);
  return shapes;
}

// The same rules as the gateway's parse_box: four numbers, x1 < x2, y1 < y2, inside the image.
export function parseBox(text, width, height) {
  const raw = text.split(",").map((v) => v.trim());
  const hint = "expected four numbers separated by commas: x1,y1,x2,y2 (pixels)";
  if (raw.length !== 4) {
    return { error: `box must have exactly four values, got ${text.trim() ? raw.length : 0}; ${hint}` };
  }
  const names = ["x1", "y1", "x2", "y2"];
  const values = [];
  for (let i = 0; i < 4; i++) {
    if (!/^[+-]?(\d+(\.\d*)?|\.\d+)$/.test(raw[i])) {
      return { error: `box value ${names[i]}='${raw[i]}' is not a number; ${hint}` };
    }
    values.push(Number(raw[i]));
  }
  const [x1, y1, x2, y2] = values;
  if (!(x1 < x2)) return { error: `box x1 must be less than x2 (got x1=${x1}, x2=${x2})` };
  if (!(y1 < y2)) return { error: `box y1 must be less than y2 (got y1=${y1}, y2=${y2})` };
  if (width && height) {
    for (let i = 0; i < 4; i++) {
      const high = i % 2 === 0 ? width : height;
      if (values[i] < 0 || values[i] > high) {
        const axis = i % 2 === 0 ? "width" : "height";
        return {
          error: `box must lie inside the ${width}x${height} image: ${names[i]}=${values[i]} is outside 0..${high} `
            + `(the image ${axis})`,
        };
      }
    }
  }
  return { box: values };
}

// Models from /v1/models (cached for the page's life; refresh=true reloads).
let modelsPromise = null;
export function models(refresh = false) {
  if (refresh || !modelsPromise) {
    modelsPromise = apiJSON("/v1/models").then((r) => r.data);
    modelsPromise.catch(() => { modelsPromise = null; });
  }
  return modelsPromise;
}

// Fills a <select> with the models serving one of `tasks`.
export async function fillModelSelect(select, tasks, preferFamily) {
  const list = (await models()).filter((m) => m.tasks.some((t) => tasks.includes(t)));
  select.replaceChildren(...list.map((m) => el("option", {
    value: m.id, text: `${m.family || m.id} — ${m.id}${m.ready ? "" : " (not ready)"}`,
  })));
  const preferred = list.find((m) => m.family === preferFamily);
  if (preferred) select.value = preferred.id;
  select.disabled = list.length === 0;
  if (!list.length) select.append(el("option", { value: "", text: "no model for this panel is loaded" }));
  return list;
}
