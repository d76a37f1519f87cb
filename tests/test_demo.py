"""Browser test of the Gradio demo: headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by
Selenium. It starts the demo on 127.0.0.1 and checks the result it opens on, clicks a bundled example, picks two
methods, runs them, and checks that both overlays and answers appear; the screenshots are saved under
``$VLPRUNE_ARTIFACTS`` (default: pytest's temporary folder).

Without Chromium, Selenium or Gradio the test is skipped, unless ``VLPRUNE_REQUIRE_BROWSER=1`` (set by ``.ci/run``,
which installs them), where a missing piece is a failure.
"""

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from vlprune.app import embedded

REQUIRED = os.environ.get("VLPRUNE_REQUIRE_BROWSER") == "1"


def need(condition: bool, what: str):
    if not condition:
        if REQUIRED:
            pytest.fail(f"{what} is missing and VLPRUNE_REQUIRE_BROWSER=1")
        pytest.skip(f"{what} is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser_for(tmp_path):
    """A headless Chromium driven by Selenium, or a skip (a failure under ``VLPRUNE_REQUIRE_BROWSER=1``)."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    need(chromium is not None and driver_path is not None, "Debian's chromium / chromium-driver")
    try:
        import gradio  # noqa: F401
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as error:
        need(False, f"the demo's Python packages ({error.name})")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1100",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def table_rows(browser) -> list[list[str]]:
    """The results table's rows (one cell per header of ``demo.HEADERS``), the unpruned one first."""
    from selenium.webdriver.common.by import By

    from vlprune.app import demo

    cells = browser.find_element(By.ID, "results").text.split("\n")  # the label, the headers, then each row's cells
    start, width = cells.index("unpruned"), len(demo.HEADERS)
    return [cells[i : i + width] for i in range(start, len(cells), width)]


def run_methods(browser, wait, names: tuple[str, str]) -> tuple[list[list[str]], str]:
    """Tick exactly the two methods ``names``, press Run, and return the results table's three rows (the unpruned
    one first) and the gallery's captions once both methods' overlays are there."""
    from selenium.webdriver.common.by import By

    for box in browser.find_elements(By.CSS_SELECTOR, "#methods input[type=checkbox]"):
        if box.is_selected() != (box.get_attribute("name") in names):
            box.find_element(By.XPATH, "..").click()
    browser.find_element(By.ID, "run").click()
    wait.until(lambda b: all(name in b.find_element(By.ID, "results").text for name in names))
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 3)
    time.sleep(0.5)
    return table_rows(browser), browser.find_element(By.ID, "gallery").text


def artifact(browser, tmp_path, name: str) -> Path:
    artifacts = Path(os.environ.get("VLPRUNE_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(artifacts / name))
    return artifacts / name


def test_demo_in_headless_chromium(tmp_path):
    """With no input at all, the page opens on the first bundled example answered by the unpruned model and the
    default methods, each with its overlay and FLOP ratios (a method that prunes saves FLOPs); then a bundled example
    clicked and two other methods run give their answers and overlays."""
    browser = browser_for(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    from vlprune.app import demo

    example = json.loads((embedded.default_path().parent / "examples" / "examples.json").read_text())[0]
    port = free_port()
    app = demo.launch(port=port, block=False)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "unpruned" in b.find_element(By.ID, "results").text)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 3)
        time.sleep(0.5)
        opening, opening_captions = table_rows(browser), browser.find_element(By.ID, "gallery").text
        asked = browser.find_element(By.CSS_SELECTOR, "#question textarea").get_attribute("value")
        artifact(browser, tmp_path, "demo-first.png")
        wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#examples td"))).click()
        question = browser.find_element(By.CSS_SELECTOR, "#question textarea")
        wait.until(lambda _: question.get_attribute("value") == example["question"])
        rows, captions = run_methods(browser, wait, ("fastv", "fastervlm"))
        shot = artifact(browser, tmp_path, "demo.png")
    finally:
        browser.quit()
        app.close()
    assert asked == example["question"]
    assert [r[0] for r in opening] == ["unpruned", *demo.DEFAULT], opening
    assert opening[0][1] == example["answer"] and opening[0][4:] == ["1.00x", "1.00x", "1.00x"], opening
    assert [r[2] for r in opening] == ["144/144", "36/144", "36/144"], opening
    assert all(float(r[5].rstrip("x")) > 1 and float(r[6].rstrip("x")) > 1 for r in opening[1:]), opening
    assert all(f"{m}:" in opening_captions for m in ("unpruned", *demo.DEFAULT)), opening_captions
    assert [r[0] for r in rows] == ["unpruned", "fastv", "fastervlm"], rows
    assert rows[0][1] == example["answer"], rows  # the unpruned answer is right
    assert [r[2] for r in rows] == ["144/144", "36/144", "36/144"], rows
    assert all(r[1] in embedded.build_tokenizer().get_vocab() for r in rows), rows  # an answer in each row
    assert all(f"{m}:" in captions for m in ("unpruned", "fastv", "fastervlm")), captions  # one overlay each
    assert shot.stat().st_size > 10_000


def test_demo_takes_a_video_in_headless_chromium(tmp_path):
    """On a model that takes videos (a tiny random LLaVA-OneVision saved with its processor), a video uploaded in the
    browser is answered by the unpruned model and two temporal and image methods, each with its frames' overlay."""
    browser = browser_for(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_video import moving_square, write_video

    from vlprune.app import demo

    from tiny import save_tiny_onevision

    checkpoint = save_tiny_onevision(tmp_path / "model")
    clip = write_video(tmp_path / "clip.webm", moving_square(20), codec="libvpx-vp9")  # Chromium plays VP9
    port = free_port()
    app = demo.launch(model=checkpoint, port=port, block=False)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#video input[type=file]"))
        browser.find_element(By.CSS_SELECTOR, "#video input[type=file]").send_keys(clip)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#video video"))
        browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys("what moves ?")
        rows, captions = run_methods(browser, wait, ("dycoke", "uniform"))
        artifact(browser, tmp_path, "demo-video.png")
    finally:
        browser.quit()
        app.close()
    assert [r[0] for r in rows] == ["unpruned", "uniform", "dycoke"], rows  # in the list's order
    assert [r[2] for r in rows] == ["65/65", "36/64", "36/64"], rows  # 16 frames x 4 tokens (+ the newline)
    assert all(f"{m}:" in captions for m in ("unpruned", "dycoke", "uniform")), captions


def test_the_demo_bounds_uploads_and_fits_its_keep_slider():
    pytest.importorskip("gradio")
    from vlprune.app import demo

    app = demo.launch(port=free_port(), block=False)
    try:
        assert app.max_file_size == 20 * 1024 * 1024  # the documented default, 20mb
        sliders = [c for c in app.blocks.values() if getattr(c, "elem_id", None) == "keep"]
        assert [s.maximum for s in sliders] == [144]  # the embedded model's 12 x 12 tokens
    finally:
        app.close()
    llava15 = type(
        "C", (), {"model_type": "llava", "vision_config": type("V", (), {"image_size": 336, "patch_size": 14})}
    )
    assert demo.keep_limit(llava15) == 576
    assert demo.keep_limit(type("C", (), {"model_type": "qwen2_vl"})) == demo.DYNAMIC_LIMIT
