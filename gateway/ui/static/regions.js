// Regions: draw a box with the mouse (or type x1,y1,x2,y2, checked with the gateway's rules), then describe it
// with a chat model (POST /v1/describe_region) or run a Florence-2 region task on it (POST /infer/upload).
import { $, apiJSON, busy, drawImage, drawObjects, fillModelSelect, loadImage, parseBox, showError } from "./common.js";

let image = null; // {file, img}
let box = null; // [x1, y1, x2, y2] in image pixels
let overlay = null; // Florence objects to draw with the box

export async function init() {
  await fillModelSelect($("regions-model"), ["chat"], "smolvlm2");
  const canvas = $("regions-canvas");
  $("regions-file").addEventListener("change", async () => {
    const file = $("regions-file").files[0];
    showError($("regions-error"), null);
    if (!file) return;
    try {
      image = { file, img: await loadImage(file) };
    } catch (error) {
      image = null;
      showError($("regions-error"), error);
      return;
    }
    box = null;
    overlay = null;
    $("regions-box").value = "";
    $("regions-box-help").textContent = `Image is ${image.img.naturalWidth}x${image.img.naturalHeight} pixels.`;
    redraw();
  });
  $("regions-box").addEventListener("input", () => {
    const text = $("regions-box").value;
    const parsed = text.trim() ? parseBox(text, image?.img.naturalWidth, image?.img.naturalHeight) : {};
    $("regions-box").setAttribute("aria-invalid", String(Boolean(parsed.error)));
    showError($("regions-error"), parsed.error ? new Error(parsed.error) : null);
    box = parsed.box || null;
    overlay = null;
    redraw();
  });

  // Mouse (and touch/pen) drawing: canvas pixels are image pixels, scaled by the CSS size.
  let start = null;
  const point = (event) => {
    const rect = canvas.getBoundingClientRect();
    const x = ((event.clientX - rect.left) / rect.width) * canvas.width;
    const y = ((event.clientY - rect.top) / rect.height) * canvas.height;
    return [Math.round(Math.min(Math.max(x, 0), canvas.width)), Math.round(Math.min(Math.max(y, 0), canvas.height))];
  };
  canvas.addEventListener("pointerdown", (event) => {
    if (!image) return;
    start = point(event);
    canvas.setPointerCapture(event.pointerId);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!start) return;
    setBox(start, point(event));
  });
  canvas.addEventListener("pointerup", (event) => {
    if (!start) return;
    setBox(start, point(event));
    start = null;
  });

  $("regions-describe").addEventListener("click", describe);
  $("regions-florence").addEventListener("click", florence);
}

function setBox(a, b) {
  const candidate = [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
  overlay = null;
  if (candidate[0] < candidate[2] && candidate[1] < candidate[3]) {
    box = candidate;
    $("regions-box").value = box.join(",");
    $("regions-box").setAttribute("aria-invalid", "false");
    showError($("regions-error"), null);
  }
  redraw();
}

function redraw() {
  const canvas = $("regions-canvas");
  if (!image) return;
  drawImage(canvas, image.img);
  const objects = [...(overlay || [])];
  if (box) objects.push({ label: "box", bbox: box });
  drawObjects(canvas, objects);
  canvas.dataset.box = box ? box.join(",") : "";
}

function checked() {
  if (!image) throw new Error("Choose an image first.");
  const parsed = parseBox($("regions-box").value, image.img.naturalWidth, image.img.naturalHeight);
  if (parsed.error) throw new Error(parsed.error);
  return $("regions-box").value.trim();
}

function show(text, json) {
  $("regions-result").textContent = text;
  $("regions-json").textContent = JSON.stringify(json, null, 2);
  $("regions-json").hidden = false;
}

async function describe() {
  const ok = await busy($("regions-describe"), $("regions-error"), async () => {
    const form = new FormData();
    form.append("box", checked());
    form.append("file", image.file);
    if ($("regions-model").value) form.append("model", $("regions-model").value);
    const prompt = $("regions-prompt").value.trim();
    if (prompt) form.append("prompt", prompt);
    form.append("max_tokens", "48");
    $("regions-result").textContent = "Describing…";
    const result = await apiJSON("/v1/describe_region", { method: "POST", form });
    show(`${result.model}: ${result.description}`, result);
    return true;
  });
  if (!ok) $("regions-result").textContent = "";
}

async function florence() {
  const ok = await busy($("regions-florence"), $("regions-error"), async () => {
    const form = new FormData();
    form.append("text", checked());
    form.append("file", image.file);
    form.append("task", $("regions-task").value);
    form.append("max_new_tokens", "32");
    form.append("num_beams", "1");
    $("regions-result").textContent = "Running Florence-2…";
    const result = await apiJSON("/infer/upload", { method: "POST", form });
    overlay = result.objects || [];
    redraw();
    const parsed = typeof result.result === "string" ? result.result : JSON.stringify(result.result);
    show(`${result.model} ${result.task}: ${parsed}`, result);
    return true;
  });
  if (!ok) $("regions-result").textContent = "";
}
