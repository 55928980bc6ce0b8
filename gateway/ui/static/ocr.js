// OCR: POST /v1/ocr (the SmolVLM2 service, multipart upload) with a language hint; the text downloads as the .txt the
// gateway names (ocr_result_<timestamp>.txt), without running the model again.
import { $, apiJSON, busy, download, fillModelSelect, showError } from "./common.js";

let last = null;

export async function init() {
  await fillModelSelect($("ocr-model"), ["chat"], "qwen2vl");
  $("ocr-file").addEventListener("change", () => {
    const file = $("ocr-file").files[0];
    const img = $("ocr-preview");
    if (img.src) URL.revokeObjectURL(img.src);
    img.hidden = !file;
    if (file) img.src = URL.createObjectURL(file);
  });
  $("ocr-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  $("ocr-download").addEventListener("click", () => {
    if (last) download(new Blob([last.text], { type: "text/plain;charset=utf-8" }), last.filename);
  });
}

async function run() {
  const file = $("ocr-file").files[0];
  if (!file) {
    showError($("ocr-error"), new Error("Choose an image first."));
    return;
  }
  const form = new FormData();
  form.append("file", file);
  if ($("ocr-model").value) form.append("model", $("ocr-model").value);
  const language = $("ocr-language").value.trim();
  if (language) form.append("language", language);
  const maxTokens = $("ocr-max-tokens").value.trim();
  if (maxTokens) form.append("max_tokens", maxTokens);
  last = null;
  $("ocr-download").disabled = true;
  $("ocr-text").value = "";
  $("ocr-meta").textContent = "Reading…";
  const result = await busy($("ocr-run"), $("ocr-error"), () => apiJSON("/v1/ocr", { method: "POST", form }));
  if (!result) {
    $("ocr-meta").textContent = "";
    return;
  }
  last = result;
  $("ocr-text").value = result.text;
  $("ocr-download").disabled = false;
  $("ocr-meta").textContent = `${result.model} · ${Math.round(result.latency_ms)} ms · ${result.text.length} characters`;
}
