// Embeddings: several images (file input or drag and drop) embedded once with POST /v1/embeddings
// (modality "image"), ranked by cosine similarity to a text query (text→image) or to one of them (image→image).
import { $, apiJSON, busy, el, fillModelSelect, loadImage, readDataURL, showError } from "./common.js";

const items = []; // {id, name, url, vector, node}
let nextId = 1;
const BATCH = 8;

export async function init() {
  await fillModelSelect($("embed-model"), ["embed_image"], "siglip");
  $("embed-files").addEventListener("change", () => {
    add([...$("embed-files").files]);
    $("embed-files").value = "";
  });
  const gallery = $("embed-gallery");
  gallery.addEventListener("dragover", (event) => {
    event.preventDefault();
    gallery.classList.add("over");
  });
  gallery.addEventListener("dragleave", () => gallery.classList.remove("over"));
  gallery.addEventListener("drop", (event) => {
    event.preventDefault();
    gallery.classList.remove("over");
    add([...event.dataTransfer.files]);
  });
  $("embed-form").addEventListener("submit", (event) => {
    event.preventDefault();
    rankByText();
  });
  $("embed-model").addEventListener("change", () => items.forEach((item) => { item.vector = null; }));
}

async function add(files) {
  showError($("embed-error"), null);
  const problems = [];
  for (const file of files) {
    try {
      await loadImage(file); // decodable by the browser, or it is refused here with a message
    } catch (error) {
      problems.push(error.message);
      continue;
    }
    const item = { id: nextId++, name: file.name, url: await readDataURL(file), vector: null };
    const similar = el("button", { type: "button", className: "secondary", text: "Find similar" });
    similar.setAttribute("aria-label", `Rank the other images by similarity to ${file.name}`);
    similar.addEventListener("click", () => rankByImage(item, similar));
    item.node = el("li", { "data-name": file.name },
      el("img", { src: item.url, alt: file.name }),
      el("span", { className: "name", text: file.name }),
      el("span", { className: "score", text: "" }),
      similar);
    items.push(item);
    $("embed-gallery").append(item.node);
  }
  if (problems.length) showError($("embed-error"), new Error(problems.join("\n")));
  $("embed-meta").textContent = `${items.length} image${items.length === 1 ? "" : "s"}`;
}

async function embedImages() {
  const missing = items.filter((item) => !item.vector);
  for (let i = 0; i < missing.length; i += BATCH) {
    const chunk = missing.slice(i, i + BATCH);
    const reply = await apiJSON("/v1/embeddings", {
      method: "POST",
      json: { model: $("embed-model").value || undefined, input: chunk.map((c) => c.url), modality: "image" },
    });
    reply.data.forEach((d) => { chunk[d.index].vector = d.embedding; });
  }
}

function cosine(a, b) {
  let dot = 0;
  let na = 0;
  let nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return dot / (Math.sqrt(na * nb) || 1);
}

function show(ranked, queryItem, what) {
  items.forEach((item) => item.node.classList.toggle("query", item === queryItem));
  const gallery = $("embed-gallery");
  const order = queryItem ? [queryItem, ...ranked.map((r) => r.item)] : ranked.map((r) => r.item);
  order.forEach((item) => gallery.append(item.node));
  if (queryItem) {
    queryItem.node.querySelector(".score").textContent = "query";
    queryItem.node.dataset.score = "";
  }
  ranked.forEach(({ item, score }, i) => {
    item.node.querySelector(".score").textContent = `#${i + 1} · ${score.toFixed(4)}`;
    item.node.dataset.score = String(score);
  });
  $("embed-meta").textContent = `Ranked ${ranked.length} image${ranked.length === 1 ? "" : "s"} by cosine similarity to ${what}.`;
}

async function rankByText() {
  const query = $("embed-query").value.trim();
  await busy($("embed-rank"), $("embed-error"), async () => {
    if (!items.length) throw new Error("Add some images first.");
    if (!query) throw new Error("Type a text query.");
    await embedImages();
    const reply = await apiJSON("/v1/embeddings", {
      method: "POST", json: { model: $("embed-model").value || undefined, input: [query] },
    });
    const q = reply.data[0].embedding;
    const ranked = items.map((item) => ({ item, score: cosine(q, item.vector) })).sort((a, b) => b.score - a.score);
    show(ranked, null, `“${query}”`);
  });
}

async function rankByImage(queryItem, button) {
  await busy(button, $("embed-error"), async () => {
    await embedImages();
    const ranked = items.filter((item) => item !== queryItem)
      .map((item) => ({ item, score: cosine(queryItem.vector, item.vector) }))
      .sort((a, b) => b.score - a.score);
    show(ranked, queryItem, queryItem.name);
  });
}
