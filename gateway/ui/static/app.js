// The shell: tabs (hash routing, arrow keys), the API-key dialog, the random-weights banner, panel start-up.
import { $, apiKey, models, setApiKey, showError } from "./common.js";
import * as chat from "./chat.js";
import * as embeddings from "./embeddings.js";
import * as florence from "./florence.js";
import * as ocr from "./ocr.js";
import * as regions from "./regions.js";
import * as status from "./status.js";

const PANELS = { chat, ocr, regions, florence, embeddings, status };
const started = new Set();
const tabs = [...document.querySelectorAll('[role="tab"]')];

async function startPanel(name) {
  if (started.has(name)) {
    PANELS[name].shown?.();
    return;
  }
  started.add(name);
  try {
    await PANELS[name].init();
    $(`panel-${name}`).dataset.ready = "true";
    PANELS[name].shown?.();
  } catch (error) {
    started.delete(name);
    showError($("global-error"), error);
  }
}

function select(name, focus = false) {
  if (!PANELS[name]) name = "chat";
  for (const tab of tabs) {
    const on = tab.dataset.panel === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(tab.getAttribute("aria-controls")).hidden = !on;
    if (on && focus) tab.focus();
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  startPanel(name);
}

for (const tab of tabs) {
  tab.addEventListener("click", () => select(tab.dataset.panel));
  tab.addEventListener("keydown", (event) => {
    const i = tabs.indexOf(tab);
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[event.key];
    if (next === undefined) return;
    event.preventDefault();
    select(tabs[(next + tabs.length) % tabs.length].dataset.panel, true);
  });
}
window.addEventListener("hashchange", () => select(location.hash.slice(1)));

// API key: asked for when the gateway answers 401; kept in sessionStorage (this tab) only.
const dialog = $("key-dialog");
document.addEventListener("vlmserve:need-key", (event) => {
  $("key-button").hidden = false;
  showError($("key-error"), event.detail ? new Error(event.detail) : null);
  $("key-input").value = "";
  if (!dialog.open) dialog.showModal();
});
$("key-form").addEventListener("submit", () => setApiKey($("key-input").value.trim()));
dialog.addEventListener("cancel", (event) => event.preventDefault()); // requests wait on it
$("key-button").addEventListener("click", () => {
  $("key-input").value = apiKey();
  showError($("key-error"), null);
  dialog.showModal();
});
if (apiKey()) $("key-button").hidden = false;

// Say loudly when the served weights are random; the page works without this succeeding.
models().then((list) => {
  $("random-banner").hidden = !list.some((m) => m.weights === "random");
}).catch((error) => showError($("global-error"), error));

select(location.hash.slice(1) || "chat");
