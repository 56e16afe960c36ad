"""The Gradio demo, launched in-process on 127.0.0.1 with the built-in world-tiny model and driven by gradio_client
and (when Debian's chromium is installed) by headless Chromium through selenium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import vlmkit
from vlmkit.demo.app import CLIP_NOTE, build_app, grid_shape, kept_overlay, launch, world_examples
from vlmkit.demo.objects import ClipPresence, find_mentions, highlight, judge
from vlmkit.world.catalog import CATEGORIES

gradio_client = pytest.importorskip("gradio_client")

PROMPT = "Describe the image in detail."
COLUMNS = ("none", "none", "fastv:keep=64", "none", "uniform:keep=0.25", "vista")


#: a tiny open_clip architecture with random weights: it exercises the presence-check plumbing offline (its
#: verdicts are meaningless; the demo itself only ever uses a CLIP model its operator names)
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                             "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def world_tiny():
    return vlmkit.load("builtin:world-tiny", device="cpu")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip")
    (folder / "vlmkit-test-tiny.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    return "vlmkit-test-tiny"


@pytest.fixture(scope="module")
def server(world_tiny, tiny_clip):
    app = build_app(world_tiny, clip_model=tiny_clip, max_new_tokens=24, examples=4)
    url = launch(app, host="127.0.0.1", port=None, block=False)
    yield app, url
    app.close()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[1], verbose=False)


def run(client, upload=None, example=None, prompt=PROMPT, tokens=16, columns=COLUMNS):
    status, summary, *html = client.predict(upload, example, prompt, tokens, *columns, api_name="/run")
    return status, summary, html[:3], html[3:]


def test_binds_localhost_and_exposes_only_run(server, client):
    assert server[1].startswith("http://127.0.0.1:")
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/run"]


def test_world_example_runs_three_columns(client):
    example = world_examples(1)[0]
    status, summary, heats, texts = run(client, example=example.label)
    assert run(client, example=example.label)[3] == texts  # greedy: the same answers again
    assert status == "Done."
    rows = summary["data"]
    assert [row[:3] for row in rows] == [["A", "none", "none"], ["B", "fastv:keep=64", "none"],
                                         ["C", "uniform:keep=0.25", "vista"]]
    assert [row[3] for row in rows] == ["576 / 576", "64 / 576", "144 / 576"]
    assert all(row[6] >= 1 and row[4] > 0 for row in rows)  # new tokens, prefill seconds
    for heat, text in zip(heats, texts):
        assert heat.startswith('<div class="vk-heat"><img src="data:image/jpeg;base64,')
        assert 'class="vk-text"' in text and "/tmp" not in heat + text
    # every highlighted object is judged against the scene's ground truth
    truth = set(example.scene.categories)
    for text, row in zip(texts, rows):
        assert "obj-unchecked" not in text
        hallucinated = {c for c in row[8].split(", ") if c}
        assert not hallucinated & truth
        assert ("obj-hallucinated" in text) == bool(hallucinated)


def test_bad_image_shows_a_message(client, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    status, summary, heats, texts = run(client, upload=gradio_client.handle_file(str(bad)))
    assert status.startswith("**Error:**") and "cannot be decoded" in status
    assert str(tmp_path) not in status and summary["data"] == [] and heats == texts == ["", "", ""]
    # the server is still up and answers the next request
    assert run(client, example=world_examples(1)[0].label, tokens=8)[0] == "Done."


def test_missing_input_and_bad_spec(client):
    assert "upload an image or pick a world example" in run(client)[0]
    status, summary, _, texts = run(client, example=world_examples(1)[0].label, tokens=8,
                                    columns=("nope", "none", "none", "none", "none", "none"))
    assert status == "Done." and "unknown pruner" in texts[0] and summary["data"][0][3] == "error"
    assert summary["data"][1][3] == "576 / 576"


def test_upload_is_checked_by_clip(client, tmp_path):
    path = tmp_path / "photo.png"
    world_examples(1)[0].image.save(path)
    status, summary, _, texts = run(client, upload=gradio_client.handle_file(str(path)), tokens=16)
    assert status == "Done." and "obj-unchecked" not in "".join(texts)
    for text, row in zip(texts, summary["data"]):
        assert row[7] == 0 or "obj-present" in text or "obj-hallucinated" in text
        assert ("obj-hallucinated" in text) == bool(row[8])


def test_clip_presence_ranks_the_categories(tiny_clip):
    image = world_examples(1)[0].image
    checker = ClipPresence(tiny_clip, top_k=3)
    assert len(checker.present(image)) == 3 and checker.present(image) == checker.present(image)
    assert ClipPresence(tiny_clip, top_k=100).present(image) == set(CATEGORIES)
    with pytest.raises(vlmkit.errors.ConfigError, match="cannot load CLIP model"):
        ClipPresence("no-such-arch:none")


def test_without_clip_uploads_are_not_judged(world_tiny):
    app = build_app(world_tiny, columns=2, examples=1, clip_model=None)
    config = json.dumps(app.config)
    assert CLIP_NOTE in config and "Column C" not in config and "/work" not in config


def test_mentions_and_highlight():
    text = "There is an orange cat, two oranges and an orange on a sofa. A woman and a man."
    mentions = find_mentions(text)
    assert [(text[m.start:m.end], m.category) for m in mentions] == [
        ("cat", "cat"), ("oranges", "orange"), ("orange", "orange"), ("sofa", "couch"), ("woman", "person"),
        ("man", "person")]
    judged = judge(mentions, {"cat", "person"})
    assert [m.present for m in judged] == [True, False, False, False, True, True]
    marked = highlight("a <b> dog", judge(find_mentions("a <b> dog"), set()))
    assert marked.startswith("a &lt;b&gt; <span class=\"obj-hallucinated\"")


def test_kept_overlay_marks_the_kept_cells():
    assert grid_shape(576, 336, 336) == (24, 24) and grid_shape(12, 400, 300) == (3, 4)
    image = Image.new("RGB", (336, 336), (200, 200, 200))
    overlay = kept_overlay(image, [0, 575], 576)
    kept, dropped, last = overlay.getpixel((7, 7)), overlay.getpixel((21, 7)), overlay.getpixel((330, 330))
    assert kept[0] > 200 and dropped[0] < 80 and last == kept


def _chromium() -> str | None:
    return next(filter(None, (shutil.which(name) for name in ("chromium", "chromium-browser"))), None)


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary found (apt-get install chromium chromium-driver)")
def test_browser_pick_example_and_run(server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1700"):
        options.add_argument(flag)
    driver_path = shutil.which("chromedriver")
    service = webdriver.ChromeService(executable_path=driver_path) if driver_path else None
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(server[1])
        wait = WebDriverWait(browser, 90)
        wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#examples button"))).click()
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#preview img")))
        browser.find_element(By.CSS_SELECTOR, "#run").click()
        wait.until(ready.text_to_be_present_in_element((By.CSS_SELECTOR, "#status"), "Done."))
        for index in range(3):
            heat = browser.find_element(By.CSS_SELECTOR, f"#heat-{index} .vk-heat")
            assert heat.find_element(By.TAG_NAME, "img").get_attribute("src").startswith("data:image/jpeg")
            assert "visual tokens kept" in heat.text
            assert browser.find_element(By.CSS_SELECTOR, f"#text-{index} .vk-text").text.strip()
        assert "576 / 576" in browser.find_element(By.CSS_SELECTOR, "#summary").text
        screenshot = Path(os.environ.get("VLMKIT_DEMO_SCREENSHOT", tmp_path / "demo.png"))
        assert browser.save_screenshot(str(screenshot))
        assert Image.open(screenshot).size[0] >= 1000
    finally:
        browser.quit()
