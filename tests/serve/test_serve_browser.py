"""The playground page end to end in headless Chromium: type a message, watch streamed text, take a screenshot."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llmkit.serve.app import BackgroundServer, create_app

pytestmark = pytest.mark.browser
OUT = Path(__file__).resolve().parents[2] / "test-output"


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
    if not browser or not Path(driver).exists():
        pytest.skip("chromium + chromedriver are not installed (make browser-deps installs them as root on Debian)")
    return browser, driver


def test_playground_streams_a_chat_reply(tiny_ckpt):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra: pip install -e '.[test]'")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1100,800"):
        opts.add_argument(flag)
    app = create_app(str(tiny_ckpt), api_key="browser-key", max_batch=2)
    with BackgroundServer(app) as server:
        drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_path))
        try:
            drv.set_page_load_timeout(60)
            drv.get(server.url + "/")
            wait = WebDriverWait(drv, 60)
            key = drv.find_element(By.ID, "key")
            key.send_keys("browser-key")
            drv.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
            wait.until(lambda d: "gpt2-tiny" in d.find_element(By.ID, "model").text)
            # greedy, so the reply of the random model is the same every run (sampling at the page's 0.7 could
            # draw the stop token or a lone partial UTF-8 byte first, a reply of one piece)
            drv.execute_script("for (const [id, v] of [['max_tokens', 40], ['temperature', 0]]) {"
                               "  const m = document.getElementById(id); m.value = v;"
                               "  m.dispatchEvent(new Event('input')); }")
            # record every text the reply shows, to prove it grew in several steps (streamed, not all at once)
            drv.execute_script("""
                window.seen = [];
                new MutationObserver(() => {
                  const t = document.querySelector('.msg.assistant .text');
                  if (t && window.seen[window.seen.length - 1] !== t.textContent) window.seen.push(t.textContent);
                }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
            """)
            box = drv.find_element(By.ID, "input")
            box.send_keys("Who created the heavens?")
            drv.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']"))
            reply = drv.execute_script("return document.querySelector('.msg.assistant .text').textContent")
            seen = drv.execute_script("return window.seen")
            stats = drv.find_element(By.ID, "stats").text
            OUT.mkdir(exist_ok=True)
            shot = OUT / "serve_playground.png"
            drv.save_screenshot(str(shot))
        finally:
            drv.quit()
    assert reply and not reply.startswith("error"), reply
    assert len(seen) >= 3, seen  # the text appeared piece by piece
    assert seen[-1] == reply and reply.startswith(seen[1])
    assert "tokens/s:" in stats and ("40 tokens" in stats or "finish: stop" in stats), stats
    assert shot.stat().st_size > 5_000
