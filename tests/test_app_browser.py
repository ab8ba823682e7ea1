"""`python app.py` (embedded tiny default) in a real headless browser: Debian's chromium driven by selenium.

Loopback only: chromium's background services are off and every host name except 127.0.0.1 fails to resolve.
"""

from __future__ import annotations

import re
import shutil
import time

import pytest

from test_app import QUESTION, launch_app, stop_app

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)")

AUDIO_STATE = """
const audio = document.querySelector('#answer-audio audio');
if (!audio) return null;
return {src: audio.src, readyState: audio.readyState, duration: audio.duration, paused: audio.paused,
        currentTime: audio.currentTime, buffered: audio.buffered.length ? audio.buffered.end(0) : 0};
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app exactly as `python app.py` runs it, building the embedded tiny checkpoint on first run."""
    process, url, log = launch_app(tmp_path_factory.mktemp("browser-app"))
    yield url
    stop_app(process)
    print(log.read_text()[-3000:])


@pytest.fixture(scope="module")
def browser(tmp_path_factory, monkeypatch_module):
    from selenium.webdriver.chrome.service import Service

    monkeypatch_module.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1280,1100",
                 "--autoplay-policy=no-user-gesture-required",  # no real click here, as after a user's click
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",  # a beeping microphone
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def text_of(driver, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return "\n".join(node.text for node in driver.find_elements(By.CSS_SELECTOR, selector))


def wait_for(condition, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(message)


def element(driver, selector: str, timeout: float, message: str):
    """The first element matching `selector`, waiting for it: Gradio loads each component's code on demand,
    so the audio input can appear after the banner does."""
    from selenium.webdriver.common.by import By

    return wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, selector), timeout, message)[0]


def upload(driver, path):
    element(driver, '#question button[aria-label="Upload file"]', 30,
            "the question box has no 'Upload file' button").click()
    element(driver, "#question input[type=file]", 10,
            "the question box has no file input after choosing 'Upload file'").send_keys(str(path))


def open_app(driver, url):
    driver.get(url)
    wait_for(lambda: "RANDOM weights" in text_of(driver, "#banner"), 30, "the tiny-checkpoint banner is missing")


def test_page_answers_an_uploaded_question_with_streaming_text_and_speech(browser, served, tmp_path):
    open_app(browser, served)
    assert re.search(r"Context: 0 of 2048 positions .* about \d+ more turn", text_of(browser, "#context-info"))
    upload(browser, QUESTION)
    during = []  # (conversation text length, seconds of speech in the player) while the answer streams
    while text_of(browser, "#context-info").startswith("Context: 0 "):  # changes when the answer ends
        audio = browser.execute_script(AUDIO_STATE)
        during.append((len(text_of(browser, "#chat")), audio["buffered"] if audio else 0.0))
        assert len(during) < 600, "no complete answer after 60 s"
        time.sleep(0.1)
    chat = text_of(browser, "#chat")
    assert len({length for length, _ in during}) >= 3  # the text grew on screen in several steps
    assert any(buffered > 0 and length < len(chat) for length, buffered in during)  # speech before text ended
    latency = re.search(r"Latency: first text ([0-9.]+) s · first audio ([0-9.]+) s · (\d+) tokens", chat)
    assert latency, chat
    audio = wait_for(lambda: (state := browser.execute_script(AUDIO_STATE)) and state["buffered"] > 0 and state,
                     10, "the speech player received no audio")
    assert audio["src"].startswith("blob:") and audio["readyState"] >= 2 and audio["duration"] > 0
    assert not audio["paused"] or audio["currentTime"] > 0  # it started playing by itself
    browser.save_screenshot(str(tmp_path / "answer.png"))
    assert (tmp_path / "answer.png").stat().st_size > 20_000
    print("screenshot:", tmp_path / "answer.png", "| latencies shown:", latency.group(0), "| audio:", audio)


def test_page_shows_a_readable_message_for_a_corrupt_file(browser, served, tmp_path):
    open_app(browser, served)
    corrupt = tmp_path / "broken.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    upload(browser, corrupt)
    message = "cannot read broken.wav as audio: broken.wav: Invalid data found when processing input"
    wait_for(lambda: f"Cannot answer: {message}" in text_of(browser, "#chat"), 30, "no message in the conversation")
    wait_for(lambda: message in text_of(browser, "[data-testid=toast-body]"), 10, "no toast with the message")
    browser.save_screenshot(str(tmp_path / "error.png"))


def test_page_answers_a_microphone_recording_when_recording_stops(browser, served):
    open_app(browser, served)
    element(browser, "#question button.record-button", 30, "the question box has no record button").click()
    time.sleep(2)  # chromium's fake microphone beeps
    element(browser, "#question button.stop-button", 10, "no stop button while recording").click()
    wait_for(lambda: not text_of(browser, "#context-info").startswith("Context: 0 "), 60, "no answer to the recording")
    assert re.search(r"Latency: first text [0-9.]+ s · first audio [0-9.]+ s", text_of(browser, "#chat"))
