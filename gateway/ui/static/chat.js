// Chat: POST /v1/chat/completions with stream=true (server-sent events), multi-turn, images and videos,
// a real Stop (aborts the fetch, so the gateway cancels the Triton request), and the request as curl/Python.
import { $, api, el, fillModelSelect, readDataURL, showError } from "./common.js";

const history = []; // OpenAI messages sent so far (with their data URIs)
let attachments = []; // [{file, url, kind}]
let controller = null;
let epoch = 0; // bumped by Clear: a request still finishing must not write into the new conversation
const sentFiles = []; // {name, type} of the files in `history`, in order (for the snippets)

export async function init() {
  await fillModelSelect($("chat-model"), ["chat"], "smolvlm2");
  $("chat-files").addEventListener("change", addFiles);
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      send();
    }
  });
  $("chat-stop").addEventListener("click", () => controller?.abort());
  $("chat-clear").addEventListener("click", clear);
  $("chat-copy-curl").addEventListener("click", () => copySnippet("curl"));
  $("chat-copy-python").addEventListener("click", () => copySnippet("python"));
}

async function addFiles() {
  const input = $("chat-files");
  for (const file of input.files) {
    const kind = file.type.startsWith("video/") ? "video" : file.type.startsWith("image/") ? "image" : null;
    if (!kind) {
      showError($("chat-error"), new Error(`${file.name}: not an image or a video (${file.type || "unknown type"})`));
      continue;
    }
    attachments.push({ file, kind, url: await readDataURL(file) });
  }
  input.value = "";
  renderAttachments();
}

function renderAttachments() {
  $("chat-attachments").replaceChildren(...attachments.map((a, i) => {
    const preview = a.kind === "image"
      ? el("img", { src: a.url, alt: a.file.name })
      : el("video", { src: a.url, muted: true, title: a.file.name });
    const remove = el("button", { type: "button", className: "secondary", text: "Remove" });
    remove.setAttribute("aria-label", `Remove ${a.file.name}`);
    remove.addEventListener("click", () => {
      attachments.splice(i, 1);
      renderAttachments();
    });
    return el("li", {}, preview, el("span", { text: a.file.name }), remove);
  }));
}

function number(id, parse = Number) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : parse(raw);
}

function requestBody(messages) {
  const body = { model: $("chat-model").value || undefined, messages, stream: true };
  body.max_tokens = number("chat-max-tokens", (v) => parseInt(v, 10));
  body.temperature = number("chat-temperature");
  body.top_p = number("chat-top-p");
  body.seed = number("chat-seed", (v) => parseInt(v, 10));
  const stop = $("chat-stop-seq").value;
  if (stop) body.stop = [stop];
  if (messages.some((m) => Array.isArray(m.content) && m.content.some((p) => p.type === "video_url"))) {
    body.video_fps = number("chat-fps");
    body.video_max_frames = number("chat-max-frames", (v) => parseInt(v, 10));
  }
  for (const k of Object.keys(body)) if (body[k] === undefined || Number.isNaN(body[k])) delete body[k];
  return body;
}

function userMessage(text) {
  if (!attachments.length) return { role: "user", content: text };
  const parts = attachments.map((a) => (a.kind === "image"
    ? { type: "image_url", image_url: { url: a.url } }
    : { type: "video_url", video_url: { url: a.url } }));
  if (text) parts.push({ type: "text", text });
  return { role: "user", content: parts };
}

function bubble(role, text, media = []) {
  const item = el("li", { className: `msg ${role}` },
    el("span", { className: "who", text: role === "user" ? "You" : "Assistant" }),
    ...media,
    el("span", { className: "text", text }));
  $("chat-log").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function note(item, text, kind = "") {
  item.append(el("span", { className: `note ${kind}`, text }));
}

function setStreaming(on) {
  $("chat-send").disabled = on;
  $("chat-stop").disabled = !on;
  if (on) $("chat-state").textContent = "Generating…";
  else if ($("chat-state").textContent === "Generating…") $("chat-state").textContent = "";
}

async function send() {
  if (controller) return;
  const text = $("chat-input").value.trim();
  if (!text && !attachments.length) {
    showError($("chat-error"), new Error("Type a message or attach an image or a video."));
    $("chat-input").focus();
    return;
  }
  showError($("chat-error"), null);
  const message = userMessage(text);
  const media = attachments.map((a) => (a.kind === "image"
    ? el("img", { src: a.url, alt: a.file.name }) : el("video", { src: a.url, controls: true, title: a.file.name })));
  const files = attachments.map((a) => ({ name: a.file.name, type: a.file.type }));
  const body = requestBody([...history, message]);
  const userItem = bubble("user", text, media);
  const mine = epoch;
  const remember = (...messages) => { if (mine === epoch) history.push(...messages); };
  controller = new AbortController();
  setStreaming(true);
  let answer = null;
  let received = "";
  try {
    const response = await api("/v1/chat/completions", { method: "POST", json: body, signal: controller.signal });
    // Accepted: the turn is part of the conversation from here on.
    if (mine !== epoch) return;
    history.push(message);
    sentFiles.push(...files);
    attachments = [];
    renderAttachments();
    $("chat-input").value = "";
    answer = bubble("assistant", "");
    answer.setAttribute("aria-busy", "true");
    const textNode = answer.querySelector(".text");
    const finish = await readStream(response, (delta) => {
      received += delta;
      textNode.textContent = received;
      answer.scrollIntoView({ block: "end" });
    });
    remember({ role: "assistant", content: received });
    note(answer, `finish_reason: ${finish.reason}${finish.usage ? ` · ${finish.usage.completion_tokens} tokens` : ""}`);
    answer.dataset.finish = finish.reason;
  } catch (error) {
    if (error.name === "AbortError") {
      if (answer) {
        remember({ role: "assistant", content: received });
        note(answer, "Stopped: the request was cancelled.", "stopped");
        answer.dataset.finish = "stopped";
      } else if (mine === epoch) {
        userItem.remove();
        $("chat-state").textContent = "Stopped before the answer started.";
      }
    } else {
      if (!answer) userItem.remove(); // refused: the turn is not in the conversation, fix and resend
      else remember({ role: "assistant", content: received });
      if (answer) answer.dataset.finish = "error";
      showError($("chat-error"), error);
    }
  } finally {
    answer?.removeAttribute("aria-busy");
    controller = null;
    setStreaming(false);
  }
}

// Reads OpenAI chat.completion.chunk events; calls onText per content delta; returns {reason, usage}.
// An error event (the gateway sends one if the model fails mid-answer) is thrown.
async function readStream(response, onText) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  const result = { reason: "unknown", usage: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return result;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          const error = new Error(`${chunk.error.code || "error"}: ${chunk.error.message}`);
          throw error;
        }
        if (chunk.usage) result.usage = chunk.usage;
        const choice = chunk.choices?.[0];
        if (choice?.delta?.content) onText(choice.delta.content);
        if (choice?.finish_reason) result.reason = choice.finish_reason;
      }
    }
  }
  return result;
}

function clear() {
  epoch += 1;
  controller?.abort();
  history.length = 0;
  attachments = [];
  sentFiles.length = 0;
  renderAttachments();
  $("chat-log").replaceChildren();
  $("chat-input").value = "";
  showError($("chat-error"), null);
  $("chat-snippet").hidden = true;
  $("chat-state").textContent = "Conversation cleared.";
}

// --- the request as code ----------------------------------------------------------------------------------

// The request being composed (history + the typed message and attachments), with each data URI replaced by a
// reference to the file it came from, so the snippet stays short and runs next to those files.
function currentRequest() {
  const files = new Map();
  const text = $("chat-input").value.trim();
  const pending = (text || attachments.length) ? [userMessage(text)] : [];
  const body = requestBody([...history, ...pending]);
  const names = [...sentFiles, ...attachments.map((a) => ({ name: a.file.name, type: a.file.type }))];
  let n = 0;
  const strip = (value) => {
    if (Array.isArray(value)) return value.map(strip);
    if (value && typeof value === "object") {
      return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, strip(v)]));
    }
    if (typeof value === "string" && value.startsWith("data:")) {
      const file = names[n] || { name: `file${n + 1}`, type: value.slice(5, value.indexOf(";")) };
      n += 1;
      const token = `@@FILE${n}@@`;
      files.set(token, file);
      return token;
    }
    return value;
  };
  return { body: strip(body), files };
}

function shellQuote(text) {
  return `'${text.replace(/'/g, "'\\''")}'`;
}

function curlSnippet({ body, files }) {
  const auth = $("key-button").hidden ? "" : ' -H "Authorization: Bearer $VLMSERVE_API_KEY"';
  const curl = `curl -fsS -N ${location.origin}/v1/chat/completions${auth} -H "Content-Type: application/json"`;
  const json = JSON.stringify(body);
  if (!files.size) return `${curl} \\\n  -d ${shellQuote(json)}`;
  // Data URIs are too long for a command line: the body is written to a file, each file's base64 in its place.
  const lines = ["# Run next to the attached files; each goes in as a base64 data URI.", "{"];
  let rest = json;
  for (const [token, file] of files) {
    const [before, after] = rest.split(token);
    lines.push(`  printf '%s' ${shellQuote(before)}`);
    lines.push(`  printf 'data:${file.type};base64,'; base64 -w 0 ${shellQuote(file.name)}`);
    rest = after;
  }
  lines.push(`  printf '%s' ${shellQuote(rest)}`, "} > request.json", `${curl} -d @request.json`);
  return lines.join("\n");
}

function py(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") {
    const file = value.match(/^@@FILE\d+@@$/);
    return file ? `data_uri(${JSON.stringify(pyFiles.get(value).name)})` : JSON.stringify(value);
  }
  const inner = `${indent}    `;
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => inner + py(v, inner)).join(",\n")},\n${indent}]`;
  }
  const entries = Object.entries(value);
  if (!entries.length) return "{}";
  return `{\n${entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${py(v, inner)}`).join(",\n")},\n${indent}}`;
}
let pyFiles = new Map();

function pythonSnippet({ body, files }) {
  pyFiles = files;
  const { messages, model, stream, video_fps: fps, video_max_frames: frames, ...rest } = body;
  const extra = {};
  if (fps !== undefined) extra.video_fps = fps;
  if (frames !== undefined) extra.video_max_frames = frames;
  const args = [`model=${py(model ?? null)}`, `messages=${py(messages, "")}`, "stream=True"];
  for (const [k, v] of Object.entries(rest)) args.push(`${k}=${py(v)}`);
  if (Object.keys(extra).length) args.push(`extra_body=${py(extra)}`);
  const key = $("key-button").hidden ? '"unused"' : 'os.environ["VLMSERVE_API_KEY"]';
  const lines = [];
  lines.push(files.size ? "import base64\nimport mimetypes\nimport os" : "import os");
  lines.push("", "from openai import OpenAI", "");
  if (files.size) {
    lines.push("", "def data_uri(path):  # run next to the attached files",
      '    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"',
      '    return f"data:{mime};base64," + base64.b64encode(open(path, "rb").read()).decode()', "", "");
  }
  lines.push(`client = OpenAI(base_url="${location.origin}/v1", api_key=${key})`);
  lines.push(`stream = client.chat.completions.create(\n    ${args.join(",\n    ")},\n)`);
  lines.push("for chunk in stream:", "    if chunk.choices and chunk.choices[0].delta.content:",
    '        print(chunk.choices[0].delta.content, end="", flush=True)', "print()");
  return lines.join("\n");
}

async function copySnippet(kind) {
  const request = currentRequest();
  const text = kind === "curl" ? curlSnippet(request) : pythonSnippet(request);
  const pre = $("chat-snippet");
  pre.textContent = text;
  pre.hidden = false;
  pre.dataset.kind = kind;
  try {
    await navigator.clipboard.writeText(text);
    $("chat-copy-state").textContent = `${kind === "curl" ? "curl" : "Python"} snippet copied.`;
  } catch {
    $("chat-copy-state").textContent = "Select the snippet above and copy it (the clipboard is not available).";
  }
}
