// Florence-2: every served task (GET /v1/tasks), POST /infer/upload, the result drawn over the image (boxes,
// polygons, quad boxes, labels) beside its JSON, and the annotated image as a PNG download.
import { $, apiJSON, busy, download, drawImage, drawObjects, el, loadImage, showError } from "./common.js";

let tasks = [];
let image = null; // {file, img}
let lastTask = null;

export async function init() {
  tasks = await apiJSON("/v1/tasks");
  $("florence-task").replaceChildren(...tasks.map((t) => el("option", { value: t.name, text: `${t.name} (${t.token})` })));
  $("florence-task").addEventListener("change", taskChanged);
  taskChanged();
  $("florence-file").addEventListener("change", async () => {
    const file = $("florence-file").files[0];
    showError($("florence-error"), null);
    $("florence-download").disabled = true;
    $("florence-json").textContent = "";
    $("florence-summary").textContent = "";
    image = null;
    if (!file) return;
    try {
      image = { file, img: await loadImage(file) };
      drawImage($("florence-canvas"), image.img);
      $("florence-canvas").dataset.shapes = "0";
    } catch (error) {
      showError($("florence-error"), error);
    }
  });
  $("florence-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  $("florence-download").addEventListener("click", () => {
    $("florence-canvas").toBlob((blob) => {
      const stem = (image?.file.name || "image").replace(/\.[^.]+$/, "");
      download(blob, `${stem}_${lastTask || "florence2"}.png`);
    }, "image/png");
  });
}

function taskChanged() {
  const task = tasks.find((t) => t.name === $("florence-task").value);
  if (!task) return;
  $("florence-task-help").textContent = task.description + (task.text_hint ? ` Text: ${task.text_hint}` : "");
  $("florence-text-row").hidden = !task.needs_text;
  $("florence-text").required = Boolean(task.needs_text);
}

async function run() {
  if (!image) {
    // The file input may hold a file the browser could not decode; send it anyway so the gateway says why.
    const file = $("florence-file").files[0];
    if (!file) {
      showError($("florence-error"), new Error("Choose an image first."));
      return;
    }
    image = { file, img: null };
  }
  const task = tasks.find((t) => t.name === $("florence-task").value);
  const form = new FormData();
  form.append("file", image.file);
  form.append("task", task.name);
  if (task.needs_text) form.append("text", $("florence-text").value);
  form.append("max_new_tokens", $("florence-max-tokens").value || "64");
  form.append("num_beams", $("florence-beams").value || "1");
  $("florence-download").disabled = true;
  $("florence-summary").textContent = `Running ${task.name}…`;
  const result = await busy($("florence-run"), $("florence-error"),
    () => apiJSON("/infer/upload", { method: "POST", form }));
  if (!result) {
    $("florence-summary").textContent = "";
    if (!image.img) image = null;
    return;
  }
  lastTask = result.task;
  const canvas = $("florence-canvas");
  let shapes = 0;
  if (image.img) {
    drawImage(canvas, image.img);
    shapes = drawObjects(canvas, result.objects);
  }
  $("florence-json").textContent = JSON.stringify(result, null, 2);
  const count = (result.objects || []).length;
  $("florence-summary").textContent = `${result.model} · ${result.task} · ${Math.round(result.latency_ms)} ms · `
    + (result.objects ? `${count} object${count === 1 ? "" : "s"}, ${shapes} shape${shapes === 1 ? "" : "s"} drawn`
      : "text result (nothing to draw)");
  if (!image.img) $("florence-summary").textContent += " (this browser cannot display the image to draw on)";
  $("florence-download").disabled = !image.img;
}
