"""The browser demo end to end: a real headless Chromium (Debian's, driven by Playwright) against `alignloop up` on the
bundled model, with one adapter version promoted. It uploads an image, asks, receives a streamed answer, gives a
thumbs down, corrects the answer, compares two versions, and then checks what the store holds. Screenshots are
kept in runs/test-artifacts/ (or $ALIGNLOOP_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, free_port
from tests.integration.conftest import random_lora

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("ALIGNLOOP_TEST_ARTIFACTS", REPO / "runs" / "test-artifacts"))
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def service(bundled_model, tmp_path_factory):
    """`alignloop up` (gateway + embedded vLLM + demo at /) with policy-v1 published and promoted."""
    from online_rl.adapters import publish_adapter
    from online_rl.store import open_store

    workdir = tmp_path_factory.mktemp("up")
    port, store_url, adapter_dir = free_port(), f"sqlite:///{workdir / 'store.db'}", workdir / "adapters"
    store = open_store(store_url)
    adapter = publish_adapter(
        store, random_lora(bundled_model, seed=1), str(adapter_dir), str(bundled_model), algorithm="random-test"
    )
    store.promote("llava-rlhf", adapter.version)
    env = dict(
        os.environ,
        ALIGNLOOP_VLLM_PORT=str(free_port()),
        ALIGNLOOP_VLLM_LOG=str(workdir / "vllm.log"),
        ALIGNLOOP_DEMO_EXAMPLES_DIR=str(workdir / "examples"),
    )
    command = [
        str(Path(sys.executable).parent / "alignloop"),
        "up",
        "--port",
        str(port),
        "--model",
        str(bundled_model),
        "--store-url",
        store_url,
        "--adapter-dir",
        str(adapter_dir),
        "--no-trainer",
    ]
    log_path = workdir / "up.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not _ready(url):
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"alignloop up not ready: {log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url, store, adapter.version
    except BaseException:
        print(log_path.read_text()[-4000:])
        raise
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        store.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "Debian's chromium is missing: `make setup` installs it"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def status_text(page) -> str:
    return page.locator("#status").inner_text()


def wait_for_status(page, expected: str) -> str:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "text => (document.querySelector('#status')?.innerText || '').includes(text)",
            arg=expected,
            timeout=TIMEOUT_MS,
        )
    except PlaywrightTimeout:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "demo-failure.png"), full_page=True)
        raise AssertionError(f"status never said {expected!r}; it says {status_text(page)!r}") from None
    return status_text(page)


def unlabeled_buttons(page) -> list[str]:
    """Visible buttons without an accessible name (text, aria-label, aria-labelledby or title)."""
    return page.evaluate("""() => [...document.querySelectorAll('button')]
        .filter(b => b.offsetParent !== null)
        .filter(b => !(b.innerText.trim() || b.getAttribute('aria-label') || b.getAttribute('aria-labelledby')
                       || b.getAttribute('title')))
        .map(b => b.outerHTML.slice(0, 120))""")


def test_a_user_chats_rates_corrects_and_compares_in_the_browser(service, browser, tmp_path):
    from online_rl.schema import FeedbackEvent, PreferenceEvent
    from training.shapes_world import ShapesWorld

    url, store, version = service
    world = ShapesWorld()
    scene = world.scene("test", 7)
    image_path = tmp_path / "scene.png"
    world.render(scene).save(image_path)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(url + "/", timeout=TIMEOUT_MS)
    page.get_by_role("button", name="Send").wait_for(timeout=TIMEOUT_MS)
    assert unlabeled_buttons(page) == []

    # Upload an image and ask; record every state the answer goes through while it streams in.
    page.locator("#image input[type=file]").set_input_files(str(image_path))
    page.wait_for_function("() => document.querySelector('#image img') !== null", timeout=TIMEOUT_MS)
    page.evaluate("""() => {
        window.__answerStates = [];
        new MutationObserver(() => {
            const bot = [...document.querySelectorAll('#chatbot .message.bot, #chatbot [data-testid="bot"]')].pop();
            const text = bot ? bot.innerText.trim() : '';
            const states = window.__answerStates;
            if (text && states[states.length - 1] !== text) states.push(text);
        }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
    }""")
    page.locator("#question textarea").fill("Describe the image in detail.")
    page.get_by_role("button", name="Send").click()
    wait_for_status(page, f"policy-v{version} answered")
    states = page.evaluate("() => window.__answerStates")
    final = states[-1]
    assert f"answered by policy-v{version}" in final
    assert len(states) >= 2 and states[0] != final  # the page showed the answer before it was complete

    # Thumbs down under the answer, then a correction of it.
    page.get_by_role("button", name="Dislike").first.click()
    assert "Thumbs down saved" in wait_for_status(page, "Thumbs down saved")
    answer_text = page.locator("#correction textarea").input_value()
    assert answer_text and answer_text in final
    corrected = world.description(scene, noisy=False)
    page.locator("#correction textarea").fill(corrected)
    page.get_by_role("button", name="Submit correction").click()
    wait_for_status(page, "Correction saved")
    assert page.locator("#changes").inner_text().strip()  # which words changed
    page.screenshot(path=str(ARTIFACTS / "demo-chat-1280x800.png"), full_page=True)

    # Side by side: the alias (policy-vN) against the base model, and the user prefers B.
    page.get_by_role("tab", name="Side by side").click()
    page.get_by_role("button", name="Ask both").click()
    wait_for_status(page, "Both versions answered")
    assert "by base" in page.locator("#answer-b").inner_text()
    page.get_by_role("button", name="B is better").click()
    assert "over policy-v" in wait_for_status(page, "Preference saved")
    page.screenshot(path=str(ARTIFACTS / "demo-compare-1280x800.png"), full_page=True)

    # The versions panel shows the promoted version.
    page.get_by_role("tab", name="Versions").click()
    page.get_by_role("button", name="Refresh versions").click()
    page.wait_for_function(
        f"() => document.querySelector('#version-summary').innerText.includes('policy-v{version}')", timeout=TIMEOUT_MS
    )

    # What the store holds: three demo answers, the rating, the correction and the preference, with their versions.
    records = {r.id: r for r in store.list_generations() if r.client == "demo"}
    chat_record = min(records.values(), key=lambda r: r.created)  # the chat came before the comparison
    assert chat_record.response.strip() == answer_text
    assert chat_record.adapter_version == version and len(chat_record.image_hashes) == 1
    events = [event for _, event in store.list_events()]
    feedback = [e for e in events if isinstance(e, FeedbackEvent)]
    assert [(e.generation_id, e.rating, e.correction, e.adapter_version) for e in feedback] == [
        (chat_record.id, -1, None, version),
        (chat_record.id, None, corrected, version),
    ]
    (preference,) = [e for e in events if isinstance(e, PreferenceEvent)]
    assert preference.adapter_versions == (version, None)
    assert preference.preferred_id == preference.generation_ids[1]
    assert set(preference.generation_ids) <= set(records) and len(records) == 3
    page.close()


def test_the_page_fits_a_phone(service, browser):
    url, _, _ = service
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page.goto(url + "/", timeout=TIMEOUT_MS)
    send = page.get_by_role("button", name="Send")
    send.wait_for(timeout=TIMEOUT_MS)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    box = send.bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390
    assert unlabeled_buttons(page) == []
    page.screenshot(path=str(ARTIFACTS / "demo-phone-390x844.png"), full_page=True)
    page.close()


def test_the_api_keeps_its_error_shape_beside_the_page(service):
    url, _, _ = service
    assert httpx.get(f"{url}/", timeout=10).status_code == 200  # the page
    missing = httpx.get(f"{url}/v1/nothing", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == "llava-rlhf"
