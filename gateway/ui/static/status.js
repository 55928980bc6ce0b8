// Status: GET /health, GET /info (runtime/precision per model), GET /metrics (the gateway's Prometheus text),
// GET /ui/api/triton-stats (Triton's inference statistics) and GET /v1/batches (the latest batches), refreshed
// when the panel is shown.
import { $, ApiError, apiJSON, busy, el, models } from "./common.js";

export async function init() {
  $("status-refresh").addEventListener("click", () => busy($("status-refresh"), $("status-error"), refresh));
}

export function shown() {
  busy($("status-refresh"), $("status-error"), refresh);
}

async function refresh() {
  // /health answers 503 with the same body when something is down; that body is what to show.
  const healthResponse = await fetch("/health", { cache: "no-store" });
  const health = await healthResponse.json();
  const [info, list, triton, metricsText, batches] = await Promise.all([
    apiJSON("/info"),
    models(true),
    apiJSON("/ui/api/triton-stats").catch((error) => ({ error })),
    fetch("/metrics", { cache: "no-store" }).then((r) => (r.ok ? r.text() : "")),
    apiJSON("/v1/batches?limit=20").catch((error) => ({ error })),
  ]);
  showHealth(health, list);
  showModels(info.models);
  showTriton(triton);
  showGateway(metricsText);
  showBatches(batches);
  $("status-updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
}

function showHealth(health, list) {
  const random = list.filter((m) => m.weights === "random").map((m) => m.id);
  const pills = [
    el("span", { className: `pill ${health.status === "ok" ? "" : "bad"}`, text: `status: ${health.status}` }),
    el("span", { className: `pill ${health.triton?.reachable ? "" : "bad"}`,
      text: `Triton ${health.triton?.url}: ${health.triton?.reachable ? "reachable" : "NOT reachable"}` }),
    el("span", { className: "pill", text: `device: ${health.device}` }),
    el("span", { className: "pill", text: `weights: ${Array.isArray(health.weights) ? health.weights.join(", ") : health.weights}` }),
  ];
  if (random.length) {
    pills.unshift(el("p", { className: "random", role: "alert",
      text: `RANDOM WEIGHTS: ${random.join(", ")} ${random.length === 1 ? "is" : "are"} randomly initialised test `
        + "models. Every answer is meaningless; only the shapes and flows are real." }));
  }
  $("status-health").replaceChildren(...pills);
}

const cell = (text, cls = "") => el("td", { className: cls, text: text ?? "–" });

function showModels(rows) {
  $("status-models").tBodies[0].replaceChildren(...rows.map((m) => el("tr", { "data-model": m.triton_model },
    cell(m.id), cell(m.triton_model), cell(m.task), cell(m.ready ? "ready" : "NOT READY"),
    cell(m.weights === "random" ? "RANDOM" : m.weights), cell(m.device), cell(m.runtime), cell(m.precision))));
}

function showTriton(stats) {
  const body = $("status-triton").tBodies[0];
  if (stats.error) {
    const message = stats.error instanceof ApiError ? stats.error.message : String(stats.error);
    body.replaceChildren(el("tr", {}, el("td", { colSpan: 6, text: `unavailable: ${message}` })));
    return;
  }
  const avg = (part) => (part.count ? (part.ns / part.count / 1e6).toFixed(1) : "–");
  body.replaceChildren(...stats.models.map((m) => el("tr", { "data-model": m.name },
    cell(m.name), cell(String(m.success.count), "num"), cell(String(m.fail.count), "num"),
    cell(String(m.execution_count), "num"), cell(avg(m.queue), "num"), cell(avg(m.compute_infer), "num"))));
}

// Prometheus text format: name{label="value",...} number
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    const match = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const [, k, v] of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

function showGateway(text) {
  const routes = new Map();
  const route = (name) => {
    if (!routes.has(name)) routes.set(name, { requests: 0, errors: 0, sum: 0, count: 0 });
    return routes.get(name);
  };
  for (const s of parseMetrics(text)) {
    if (s.name === "vlmserve_requests_total") {
      route(s.labels.route).requests += s.value;
      if (Number(s.labels.status) >= 400) route(s.labels.route).errors += s.value;
    } else if (s.name === "vlmserve_request_latency_seconds_sum") route(s.labels.route).sum += s.value;
    else if (s.name === "vlmserve_request_latency_seconds_count") route(s.labels.route).count += s.value;
  }
  const rows = [...routes.entries()].sort((a, b) => b[1].requests - a[1].requests);
  $("status-gateway").tBodies[0].replaceChildren(...rows.map(([name, r]) => el("tr", { "data-route": name },
    cell(name), cell(String(r.requests), "num"), cell(String(r.errors), "num"),
    cell(r.count ? ((r.sum / r.count) * 1000).toFixed(1) : "–", "num"))));
}

function showBatches(page) {
  const body = $("status-batches").tBodies[0];
  if (page.error) {
    const message = page.error instanceof ApiError ? page.error.message : String(page.error);
    body.replaceChildren(el("tr", {}, el("td", { colSpan: 8, text: `unavailable: ${message}` })));
    return;
  }
  if (!page.data.length) {
    body.replaceChildren(el("tr", {}, el("td", { colSpan: 8, className: "muted", text: "no batches yet" })));
    return;
  }
  body.replaceChildren(...page.data.map((b) => el("tr", { "data-batch": b.id },
    cell(b.id), cell(b.endpoint), cell(b.status, ["failed", "expired"].includes(b.status) ? "bad" : ""),
    cell(String(b.request_counts.completed), "num"), cell(String(b.request_counts.failed), "num"),
    cell(String(b.request_counts.total), "num"), cell(new Date(b.created_at * 1000).toLocaleString()),
    cell(b.output_file_id))));
}
