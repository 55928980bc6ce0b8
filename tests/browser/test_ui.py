"""Every panel of the web UI, driven in headless chromium against the real stack on the tiny random models.

The models are random, so answers are garbage text; what is checked is the flow: what the page sends, that it
shows what the gateway answered (streamed token by token for chat), downloads, drawing, ranking and errors.
Each test's page is also checked for requests to any host but the gateway (see conftest.ui).
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from tests.browser.conftest import Traffic, open_ui
from tests.conftest import free_port

pytestmark = pytest.mark.e2e

MODEL_WAIT_MS = 120_000  # a tiny model on 2 busy cores: generous, never asserted as a timing


def open_panel(page, name: str) -> None:
    page.click(f"#tab-{name}")
    expect(page.locator(f"#panel-{name}")).to_have_attribute("data-ready", "true", timeout=30_000)


def choose_model(page, select: str, family: str) -> None:
    value = page.locator(f"{select} option", has_text=f"{family} —").first.get_attribute("value")
    page.select_option(select, value)


def data_uri(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def chat_bodies(page) -> list[dict]:
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    return bodies


# --- shell -----------------------------------------------------------------------------------------------


def test_root_opens_the_ui_with_labelled_keyboard_tabs_and_a_random_weights_banner(ui, stack) -> None:
    page = ui
    assert page.url == f"{stack.gateway}/ui#chat"  # "/" redirected the browser
    expect(page.locator("#random-banner")).to_be_visible()
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.id)""")
    assert unlabelled == []
    page.focus("#tab-chat")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-ocr")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#panel-ocr")).to_be_visible()
    expect(page.locator("#panel-chat")).to_be_hidden()
    assert page.evaluate("document.activeElement.id") == "tab-ocr"
    page.keyboard.press("End")
    expect(page.locator("#panel-status")).to_be_visible()
    assert page.url.endswith("#status")


def test_phone_width_has_no_horizontal_scrolling(browser, stack, screenshots) -> None:
    traffic = Traffic()
    context, page, errors = open_ui(browser, stack.gateway, traffic, width=390, height=844)
    try:
        for name in ("chat", "ocr", "regions", "florence", "embeddings", "status"):
            open_panel(page, name)
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{name} panel is {overflow}px wider than a 390px phone"
            if name == "chat":
                page.screenshot(path=str(screenshots / "ui-phone-chat.png"), full_page=True)
    finally:
        context.close()
    assert not traffic.foreign and not errors


# --- chat ------------------------------------------------------------------------------------------------


def test_chat_streams_a_multi_turn_conversation_with_an_image_and_a_video(ui, sample_png, sample_mp4,
                                                                           screenshots) -> None:
    page = ui
    open_panel(page, "chat")
    bodies = chat_bodies(page)
    choose_model(page, "#chat-model", "smolvlm2")
    page.fill("#chat-max-tokens", "12")
    page.fill("#chat-temperature", "0")
    # Count how often the answer's text changes while it is being written: streaming shows every delta.
    page.evaluate("""() => {
        window.__updates = 0;
        new MutationObserver(records => { window.__updates += records.filter(r =>
            r.target.closest && r.target.closest('.msg.assistant .text')).length; })
          .observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});
    }""")

    page.set_input_files("#chat-files", str(sample_png))
    expect(page.locator("#chat-attachments img")).to_have_count(1)
    page.fill("#chat-input", "What is in this picture?")
    page.click("#chat-send")
    first = page.locator(".msg.assistant").nth(0)
    expect(first).to_have_attribute("data-finish", re.compile("length|stop"), timeout=MODEL_WAIT_MS)
    assert page.evaluate("window.__updates") >= 2, "the answer arrived in one piece, not streamed"
    first_text = first.locator(".text").text_content()
    assert first_text

    page.set_input_files("#chat-files", str(sample_mp4))
    page.fill("#chat-fps", "2")
    page.fill("#chat-max-frames", "4")
    page.fill("#chat-input", "And what happens in this video?")
    page.focus("#chat-input")
    page.keyboard.press("Control+Enter")  # the keyboard way to send
    second = page.locator(".msg.assistant").nth(1)
    expect(second).to_have_attribute("data-finish", re.compile("length|stop"), timeout=MODEL_WAIT_MS)
    expect(page.locator(".msg.user")).to_have_count(2)
    page.screenshot(path=str(screenshots / "ui-chat.png"), full_page=True)

    assert len(bodies) == 2 and all(b["stream"] is True for b in bodies)
    first_body, second_body = bodies
    assert first_body["max_tokens"] == 12 and first_body["temperature"] == 0
    assert first_body["messages"][0]["content"][0]["image_url"]["url"] == data_uri(sample_png)
    assert "video_fps" not in first_body  # video settings only go with a video
    assert [m["role"] for m in second_body["messages"]] == ["user", "assistant", "user"]
    assert second_body["messages"][1]["content"] == first_text  # the history carries the streamed answer
    assert second_body["messages"][2]["content"][0]["video_url"]["url"] == data_uri(sample_mp4, "video/mp4")
    assert second_body["video_fps"] == 2 and second_body["video_max_frames"] == 4

    page.click("#chat-clear")
    expect(page.locator("#chat-log li")).to_have_count(0)
    page.fill("#chat-max-tokens", "3")
    page.fill("#chat-input", "Hi")
    page.click("#chat-send")
    expect(page.locator(".msg.assistant")).to_have_attribute("data-finish", re.compile("."), timeout=MODEL_WAIT_MS)
    assert len(bodies[2]["messages"]) == 1  # a cleared conversation starts over


def test_chat_stop_aborts_the_streaming_request(ui) -> None:
    page = ui
    # The tiny models write 1024 tokens in 1.5-3 s (the llama.cpp engine the fastest): too short a window to click
    # Stop in reliably. Chromium's network throttling (DevTools protocol) makes the answer arrive slowly, so that
    # the request is still streaming when Stop or Clear is clicked, however fast the host.
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": 4000,
                                                  "uploadThroughput": -1})
    open_panel(page, "chat")
    choose_model(page, "#chat-model", "smolvlm2")
    page.fill("#chat-max-tokens", "1024")  # greedy on the tiny model runs to the cap: ~100 KB of events
    page.fill("#chat-temperature", "0")
    page.fill("#chat-input", "Tell me a long story.")
    page.click("#chat-send")
    answer = page.locator(".msg.assistant")
    expect(answer.locator(".text")).not_to_have_text("", timeout=MODEL_WAIT_MS)
    expect(page.locator("#chat-stop")).to_be_enabled()
    with page.expect_event("requestfailed") as failed:
        page.click("#chat-stop")
    assert failed.value.url.endswith("/v1/chat/completions")
    assert "ABORTED" in (failed.value.failure or "")
    expect(answer).to_have_attribute("data-finish", "stopped")
    expect(answer.locator(".note")).to_contain_text("Stopped")
    expect(page.locator("#chat-send")).to_be_enabled()
    expect(page.locator("#chat-stop")).to_be_disabled()
    # The gateway is fine after the cancellation: the next turn streams to its end.
    page.fill("#chat-max-tokens", "4")
    page.fill("#chat-input", "Shorter, please.")
    page.click("#chat-send")
    expect(page.locator(".msg.assistant").nth(1)).to_have_attribute("data-finish", "length", timeout=MODEL_WAIT_MS)

    # Clear while an answer streams: the request is aborted too, and nothing of it leaks into the new conversation.
    bodies = chat_bodies(page)
    page.fill("#chat-max-tokens", "1024")
    page.fill("#chat-input", "Another long story.")
    page.click("#chat-send")
    expect(page.locator(".msg.assistant").nth(2).locator(".text")).not_to_have_text("", timeout=MODEL_WAIT_MS)
    with page.expect_event("requestfailed") as failed:
        page.click("#chat-clear")
    assert "ABORTED" in (failed.value.failure or "")
    expect(page.locator("#chat-log li")).to_have_count(0)
    expect(page.locator("#chat-state")).to_have_text("Conversation cleared.")
    expect(page.locator("#chat-send")).to_be_enabled()
    page.fill("#chat-max-tokens", "2")
    page.fill("#chat-input", "Hi")
    page.click("#chat-send")
    expect(page.locator(".msg.assistant")).to_have_attribute("data-finish", "length", timeout=MODEL_WAIT_MS)
    assert [m["content"] for m in bodies[-1]["messages"]] == ["Hi"]


def test_chat_shows_the_gateway_error_for_a_bad_file_in_place(ui, tmp_path) -> None:
    page = ui
    open_panel(page, "chat")
    bad = tmp_path / "holiday.png"
    bad.write_bytes(b"this is a text file, not a PNG")
    page.set_input_files("#chat-files", str(bad))
    page.fill("#chat-input", "What is this?")
    page.click("#chat-send")
    error = page.locator("#chat-error")
    expect(error).to_be_visible(timeout=MODEL_WAIT_MS)
    expect(error).to_contain_text(re.compile(r"^(400|415)"))
    expect(error).to_contain_text("image")
    expect(page.locator("#chat-log li")).to_have_count(0)  # a refused turn is not part of the conversation
    expect(page.locator("#chat-attachments li")).to_have_count(1)  # kept, to remove or replace


def test_chat_snippets_run_as_copied(ui, sample_png, tmp_path) -> None:
    page = ui
    open_panel(page, "chat")
    choose_model(page, "#chat-model", "smolvlm2")
    page.fill("#chat-max-tokens", "4")
    page.set_input_files("#chat-files", str(sample_png))
    page.fill("#chat-input", "Describe it.")
    page.click("#chat-send")
    expect(page.locator(".msg.assistant")).to_have_attribute("data-finish", re.compile("length|stop"),
                                                              timeout=MODEL_WAIT_MS)
    page.fill("#chat-input", "And the colours?")  # the turn being composed goes into the snippet too
    (tmp_path / sample_png.name).write_bytes(sample_png.read_bytes())

    page.click("#chat-copy-python")
    python = page.locator("#chat-snippet").text_content()
    assert "data_uri(\"sample.png\")" in python and "And the colours?" in python
    (tmp_path / "snippet.py").write_text(python)
    result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{python}\n{result.stderr}"

    page.click("#chat-copy-curl")
    curl = page.locator("#chat-snippet").text_content()
    assert curl.startswith("#") and "base64 -w 0 'sample.png'" in curl
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", curl], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{curl}\n{result.stderr}"
    assert result.stdout.rstrip().endswith("data: [DONE]")
    sent = json.loads((tmp_path / "request.json").read_text())
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][0]["content"][0]["image_url"]["url"] == data_uri(sample_png)


# --- OCR -------------------------------------------------------------------------------------------------


def test_ocr_reads_an_image_and_downloads_the_text(ui, sample_png, screenshots) -> None:
    page = ui
    open_panel(page, "ocr")
    forms: list[str] = []
    page.on("request", lambda r: forms.append(r.post_data or "") if "/v1/ocr" in r.url else None)
    choose_model(page, "#ocr-model", "smolvlm2")
    page.set_input_files("#ocr-file", str(sample_png))
    page.fill("#ocr-language", "english")
    page.fill("#ocr-max-tokens", "16")
    page.click("#ocr-run")
    expect(page.locator("#ocr-meta")).to_contain_text("ms", timeout=MODEL_WAIT_MS)
    text = page.input_value("#ocr-text")
    assert forms and 'name="language"' in forms[0] and "english" in forms[0] and 'filename="sample.png"' in forms[0]
    with page.expect_download() as download:
        page.click("#ocr-download")
    assert re.fullmatch(r"ocr_result_\d{8}_\d{6}\.txt", download.value.suggested_filename)
    assert Path(download.value.path()).read_text() == text
    page.screenshot(path=str(screenshots / "ui-ocr.png"), full_page=True)


def test_ocr_shows_the_gateway_error_for_a_bad_file(ui, tmp_path) -> None:
    page = ui
    open_panel(page, "ocr")
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"%PDF-1.4 not an image at all")
    page.set_input_files("#ocr-file", str(bad))
    page.click("#ocr-run")
    error = page.locator("#ocr-error")
    expect(error).to_be_visible(timeout=MODEL_WAIT_MS)
    expect(error).to_contain_text(re.compile(r"^415 invalid_image: file: "))
    expect(page.locator("#ocr-download")).to_be_disabled()
    assert page.input_value("#ocr-text") == ""


# --- regions ---------------------------------------------------------------------------------------------


def test_regions_box_drawn_with_the_mouse_is_described_and_sent_to_florence(ui, stack, sample_png,
                                                                           screenshots) -> None:
    page = ui
    open_panel(page, "regions")
    forms: list[tuple[str, str]] = []
    page.on("request", lambda r: forms.append((r.url, r.post_data or "")) if r.method == "POST" else None)
    width, height = Image.open(sample_png).size
    page.set_input_files("#regions-file", str(sample_png))
    expect(page.locator("#regions-box-help")).to_contain_text(f"{width}x{height}")
    canvas = page.locator("#regions-canvas")
    rect = canvas.bounding_box()
    start, end = (0.2, 0.25), (0.7, 0.8)
    page.mouse.move(rect["x"] + rect["width"] * start[0], rect["y"] + rect["height"] * start[1])
    page.mouse.down()
    page.mouse.move(rect["x"] + rect["width"] * 0.5, rect["y"] + rect["height"] * 0.5)
    page.mouse.move(rect["x"] + rect["width"] * end[0], rect["y"] + rect["height"] * end[1])
    page.mouse.up()
    box = [int(v) for v in page.input_value("#regions-box").split(",")]
    expected = [start[0] * width, start[1] * height, end[0] * width, end[1] * height]
    assert all(abs(b - e) <= 2 for b, e in zip(box, expected, strict=True)), (box, expected)
    assert canvas.get_attribute("data-box") == ",".join(map(str, box))

    choose_model(page, "#regions-model", "smolvlm2")
    page.click("#regions-describe")
    expect(page.locator("#regions-result")).to_contain_text("tiny-smolvlm2:", timeout=MODEL_WAIT_MS)
    url, form = forms[-1]
    assert url.endswith("/v1/describe_region") and ",".join(map(str, box)) in form
    assert json.loads(page.locator("#regions-json").text_content())["box"] == box

    page.select_option("#regions-task", "region_to_segmentation")
    page.click("#regions-florence")
    expect(page.locator("#regions-result")).to_contain_text("region_to_segmentation", timeout=MODEL_WAIT_MS)
    url, form = forms[-1]
    assert url.endswith("/infer/upload") and "region_to_segmentation" in form and ",".join(map(str, box)) in form
    page.screenshot(path=str(screenshots / "ui-regions.png"), full_page=True)

    # Typed boxes are checked with the gateway's own rules (same messages), before any request is sent.
    posts = len(forms)
    for bad in ("50,10,20,40", f"0,0,{width + 10},10", "1,2,3"):
        page.fill("#regions-box", bad)
        shown = page.locator("#regions-error").text_content()
        api = httpx.post(f"{stack.gateway}/v1/describe_region", data={"box": bad},
                         files={"file": ("sample.png", sample_png.read_bytes(), "image/png")}, timeout=60)
        assert api.status_code == 422 and shown == api.json()["error"]["message"], (bad, shown, api.text)
        expect(page.locator("#regions-box")).to_have_attribute("aria-invalid", "true")
        page.click("#regions-describe")
        expect(page.locator("#regions-error")).to_have_text(shown)
    assert len(forms) == posts


# --- Florence-2 ------------------------------------------------------------------------------------------


def test_florence_runs_tasks_with_and_without_text_and_downloads_the_annotated_image(ui, stack,
                                                                                      sample_png) -> None:
    page = ui
    open_panel(page, "florence")
    served = httpx.get(f"{stack.gateway}/v1/tasks").json()
    options = page.locator("#florence-task option").evaluate_all("os => os.map(o => o.value)")
    assert options == [t["name"] for t in served] and len(options) == 14
    page.set_input_files("#florence-file", str(sample_png))
    page.fill("#florence-max-tokens", "16")

    page.select_option("#florence-task", "caption")
    expect(page.locator("#florence-text-row")).to_be_hidden()
    page.click("#florence-run")
    expect(page.locator("#florence-summary")).to_contain_text(re.compile(r"caption · \d+ ms"), timeout=MODEL_WAIT_MS)
    result = json.loads(page.locator("#florence-json").text_content())
    assert result["task"] == "caption" and result["task_token"] == "<CAPTION>"

    page.select_option("#florence-task", "phrase_grounding")
    expect(page.locator("#florence-text-row")).to_be_visible()
    page.fill("#florence-text", "an orange ball")
    page.click("#florence-run")
    expect(page.locator("#florence-summary")).to_contain_text(re.compile(r"phrase_grounding · \d+ ms"),
                                                             timeout=MODEL_WAIT_MS)
    result = json.loads(page.locator("#florence-json").text_content())
    assert result["task"] == "phrase_grounding" and "objects" in result
    # The tiny random model finds nothing, so nothing is drawn; the overlay test below draws real shapes.
    assert page.locator("#florence-canvas").get_attribute("data-shapes") == str(len(result["objects"]))
    with page.expect_download() as download:
        page.click("#florence-download")
    assert download.value.suggested_filename == "sample_phrase_grounding.png"
    assert Image.open(download.value.path()).size == Image.open(sample_png).size


def test_florence_draws_boxes_polygons_and_quad_boxes_over_the_image(ui, stack, sample_png, screenshots) -> None:
    """The tiny random Florence-2 answers with no objects. Here the gateway's real answer to the same upload
    (asked for by the test: Chromium does not hand an intercepted request's file bytes to Playwright) gets one
    object of each kind added before the page sees it, which checks the drawing."""
    page = ui
    open_panel(page, "florence")
    objects = [
        {"label": "box", "bbox": [5, 5, 40, 40]},
        {"label": "polygon", "polygons": [[50, 5, 90, 5, 90, 40, 50, 40]], "bbox": [50, 5, 90, 40]},
        {"label": "quad", "quad_box": [5, 55, 40, 55, 40, 90, 5, 90], "bbox": [5, 55, 40, 90]},
    ]

    def add_objects(route) -> None:
        real = httpx.post(f"{stack.gateway}/infer/upload", data={"task": "object_detection", "max_new_tokens": "8"},
                          files={"file": ("sample.png", sample_png.read_bytes(), "image/png")}, timeout=120)
        body = real.raise_for_status().json()
        assert body["task"] == "object_detection"
        route.fulfill(status=200, json={**body, "objects": objects})

    page.route("**/infer/upload", add_objects)
    page.set_input_files("#florence-file", str(sample_png))
    page.select_option("#florence-task", "object_detection")
    page.fill("#florence-max-tokens", "8")
    page.click("#florence-run")
    expect(page.locator("#florence-summary")).to_contain_text("3 shapes drawn", timeout=MODEL_WAIT_MS)
    pixel = "([x, y]) => Array.from(document.getElementById('florence-canvas').getContext('2d')" \
            ".getImageData(x, y, 1, 1).data.slice(0, 3))"
    edges = {"box": (5, 20), "polygon": (90, 20), "quad": (20, 90)}  # on each outline (sample.png is 96x96)
    colors = {"box": (0xE6, 0x19, 0x4B), "polygon": (0x3C, 0xB4, 0x4B), "quad": (0x43, 0x63, 0xD8)}
    with page.expect_download() as download:
        page.click("#florence-download")
    annotated = np.asarray(Image.open(download.value.path()).convert("RGB"))
    for name, (x, y) in edges.items():
        assert tuple(page.evaluate(pixel, [x, y])) == colors[name], name
        assert tuple(annotated[y, x]) == colors[name], name
    page.screenshot(path=str(screenshots / "ui-florence.png"), full_page=True)


# --- embeddings ------------------------------------------------------------------------------------------


def _cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_embeddings_rank_images_by_text_and_by_image(ui, stack, sample_png, tmp_path, screenshots) -> None:
    page = ui
    open_panel(page, "embeddings")
    paths = [tmp_path / "red.png", tmp_path / "blue.png", sample_png]
    Image.new("RGB", (64, 48), (220, 30, 30)).save(paths[0])
    Image.new("RGB", (40, 40), (30, 30, 220)).save(paths[1])
    page.set_input_files("#embed-files", [str(p) for p in paths])
    # A fourth image arrives by drag and drop onto the gallery.
    green = tmp_path / "green.png"
    Image.new("RGB", (30, 50), (30, 200, 60)).save(green)
    transfer = page.evaluate_handle("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'green.png', {type: 'image/png'}));
        return dt;
    }""", base64.b64encode(green.read_bytes()).decode())
    page.dispatch_event("#embed-gallery", "drop", {"dataTransfer": transfer})
    paths.append(green)
    expect(page.locator("#embed-gallery li")).to_have_count(4)

    # The same vectors, asked for directly.
    api = f"{stack.gateway}/v1/embeddings"
    images = httpx.post(api, json={"input": [data_uri(p) for p in paths], "modality": "image"}, timeout=120).json()
    vectors = {p.name: d["embedding"] for p, d in zip(paths, images["data"], strict=True)}
    query = httpx.post(api, json={"input": ["a red square"]}, timeout=120).json()["data"][0]["embedding"]

    page.fill("#embed-query", "a red square")
    page.click("#embed-rank")
    expect(page.locator("#embed-meta")).to_contain_text("Ranked 4 images", timeout=MODEL_WAIT_MS)
    shown = page.locator("#embed-gallery li").evaluate_all(
        "ls => ls.map(l => [l.dataset.name, Number(l.dataset.score)])")
    expected = sorted(((n, _cosine(query, v)) for n, v in vectors.items()), key=lambda x: -x[1])
    assert [n for n, _ in shown] == [n for n, _ in expected]
    assert all(abs(s - e) < 1e-4 for (_, s), (_, e) in zip(shown, expected, strict=True))

    page.locator("#embed-gallery li[data-name='red.png'] button").click()
    expect(page.locator("#embed-meta")).to_contain_text("Ranked 3 images by cosine similarity to red.png")
    shown = page.locator("#embed-gallery li").evaluate_all(
        "ls => ls.map(l => [l.dataset.name, l.classList.contains('query'), Number(l.dataset.score)])")
    assert shown[0][:2] == ["red.png", True]
    expected = sorted(((n, _cosine(vectors["red.png"], v)) for n, v in vectors.items() if n != "red.png"),
                      key=lambda x: -x[1])
    assert [n for n, _, _ in shown[1:]] == [n for n, _ in expected]
    assert all(abs(s - e) < 1e-4 for (_, _, s), (_, e) in zip(shown[1:], expected, strict=True))
    page.screenshot(path=str(screenshots / "ui-embeddings.png"), full_page=True)


# --- status ----------------------------------------------------------------------------------------------


def test_status_shows_models_runtimes_random_weights_metrics_and_batches(ui, stack, screenshots) -> None:
    page = ui
    line = {"custom_id": "ui", "method": "POST", "url": "/v1/embeddings", "body": {"input": "a cat"}}
    upload = httpx.post(f"{stack.gateway}/v1/files", data={"purpose": "batch"},
                        files={"file": ("ui.jsonl", json.dumps(line).encode())}).raise_for_status().json()
    batch = httpx.post(f"{stack.gateway}/v1/batches", json={"input_file_id": upload["id"],
                       "endpoint": "/v1/embeddings", "completion_window": "24h"}).raise_for_status().json()
    open_panel(page, "status")
    info = httpx.get(f"{stack.gateway}/info").json()
    rows = page.locator("#status-models tbody tr")
    expect(rows).to_have_count(len(info["models"]), timeout=30_000)
    for model in info["models"]:
        row = page.locator(f"#status-models tr[data-model='{model['triton_model']}']")
        expect(row).to_contain_text(model["runtime"] or "–")
        expect(row).to_contain_text("RANDOM")
    expect(page.locator("#status-health .random")).to_contain_text("RANDOM WEIGHTS")
    expect(page.locator("#status-triton tr[data-model='florence2']")).to_have_count(1)
    expect(page.locator("#status-gateway tr[data-route='/v1/models']")).to_have_count(1)
    expect(page.locator(f"#status-batches tr[data-batch='{batch['id']}']")).to_contain_text("/v1/embeddings")
    page.screenshot(path=str(screenshots / "ui-status.png"), full_page=True)


# --- API keys --------------------------------------------------------------------------------------------


@pytest.fixture
def keyed_gateway(stack):
    """A second gateway in front of the same Triton, with an API key configured."""
    import uvicorn

    from vlmserve.gateway.app import create_app
    from vlmserve.gateway.settings import GatewaySettings

    port = free_port()
    settings = GatewaySettings(port=port, triton_url=stack.triton_http.removeprefix("http://"),
                               triton_grpc_url=stack.triton_grpc, api_keys=["ui-test-key"])
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the keyed gateway did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_api_key_is_asked_for_and_kept_in_the_session_only(browser, keyed_gateway, screenshots) -> None:
    traffic = Traffic()
    context, page, errors = open_ui(browser, keyed_gateway, traffic)
    try:
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        page.screenshot(path=str(screenshots / "ui-api-key.png"))
        page.fill("#key-input", "wrong-key")
        page.click("#key-save")
        expect(page.locator("#key-error")).to_contain_text("refused")
        expect(dialog).to_be_visible()
        page.fill("#key-input", "ui-test-key")
        page.click("#key-save")
        expect(dialog).to_be_hidden()
        expect(page.locator("#panel-chat")).to_have_attribute("data-ready", "true")
        expect(page.locator("#chat-model option", has_text="smolvlm2")).to_have_count(1)
        assert page.evaluate("sessionStorage.getItem('vlmserve.apiKey')") == "ui-test-key"
        assert page.evaluate("localStorage.length") == 0
    finally:
        context.close()
    assert not traffic.foreign and not errors
