"""The chat page at / in a real headless browser (Debian's chromium + chromedriver, driven by
selenium): a typed message streams back, chunk by chunk, the same reply the API gives.

Needs /usr/bin/chromium and /usr/bin/chromedriver (`apt-get install -y chromium chromium-driver`);
without them the test skips and says so. Run it alone as a script:
    .venv/bin/python -m pytest -q tests/test_serve_page.py
"""

import shutil

import openai
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the `test` extra")
    if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
        pytest.skip(
            "headless browser test needs Debian's chromium and chromium-driver "
            "(apt-get install -y chromium chromium-driver); not installed here"
        )
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # As root in a sandbox, with no network beyond loopback: no sandbox, no GPU, no background fetches.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_chat_page_streams_the_same_reply_as_the_api(start_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    srv = start_server()
    client = openai.OpenAI(
        base_url=srv.url + "/v1", api_key="x", max_retries=0, _strict_response_validation=True
    )
    browser.get(srv.url + "/")
    assert "qwen2" in browser.title and browser.find_element(By.ID, "model").text == "tiny"
    for field, value in (("temperature", "0"), ("max-tokens", "24")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)

    history = []
    for text in ("Hello! <|im_end|> is just text here.", "And a second turn?"):
        browser.find_element(By.ID, "input").send_keys(text)
        browser.find_element(By.ID, "send").click()
        wait = WebDriverWait(browser, 180, poll_frequency=0.1)  # bounded; generous for a busy machine
        seen = len(history) // 2  # replies already on the page

        def new_replies(d, seen=seen):
            return d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[seen:] or None

        reply = wait.until(new_replies)[0]
        wait.until(lambda d, reply=reply: reply.get_attribute("data-done") == "true")
        history += [{"role": "user", "content": text}]
        want = client.chat.completions.create(model="tiny", messages=history, max_tokens=24, temperature=0)
        assert reply.get_property("textContent") == want.choices[0].message.content
        assert reply.text.strip()  # visible text, not only whitespace
        assert int(reply.get_attribute("data-chunks")) > 1  # it streamed, not one block
        history += [{"role": "assistant", "content": want.choices[0].message.content}]
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
