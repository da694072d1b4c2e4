"""Drives the operator's page (GET / on the admin listener) in headless Chromium: waits for
its data, checks that the models, a usage figure and a backend state appear, switches
maintenance on for one cluster through the page (with its confirmation) and sees requests to
that cluster get 503, switches it off again, and saves a screenshot.

Run by scripts/admin-page.sh with Debian's python3 (python3-selenium, chromium-driver)."""

import json
import sys
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

ADMIN, API, SHOT = sys.argv[1], sys.argv[2], sys.argv[3]
CLUSTER, MODEL, TOKEN = "sophia", "meta-llama/Meta-Llama-3.1-8B-Instruct", "demo-alice"
DEADLINE = 30


def chat():
    """A chat request to CLUSTER's FIRST-layout route: (status, body)."""
    body = json.dumps({"model": MODEL, "max_tokens": 8,
                       "messages": [{"role": "user", "content": "hello from the page check"}]})
    req = urllib.request.Request(
        f"{API}/resource_server/{CLUSTER}/vllm/v1/chat/completions", data=body.encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def text(driver, selector):
    """An element's text, read in one step (the page redraws itself every few seconds, so a
    found element may be replaced before it is read)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
        selector) or ""


def click(driver, selector):
    driver.execute_script("document.querySelector(arguments[0]).click();", selector)


def check(what, ok):
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        sys.exit(1)


for _ in range(3):
    status, _ = chat()
    check("a chat request before the page opens answers 200", status == 200)

options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1100"):
    options.add_argument(arg)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
wait = WebDriverWait(driver, DEADLINE)
try:
    driver.get(f"{ADMIN}/")
    wait.until(lambda d: d.execute_script("return document.body.dataset.loaded") == "1")
    clusters = text(driver, "#clusters")
    check(f"the page lists the model {MODEL}", MODEL in clusters)
    check("the page shows a backend state (hot)", "hot" in clusters)
    wait.until(lambda d: text(d, "#usage-figures"))
    figures = text(driver, "#usage-figures").split("\n")
    requests = int(figures[0].replace(",", ""))
    check(f"the page shows the last hour's requests ({requests}, at least 3)", requests >= 3)
    check("the page shows the configuration's version",
          "gateway" in text(driver, "#config"))

    # Maintenance for one cluster, through the page's button and its confirmation.
    button, title = f"button[data-maintenance='{CLUSTER}']", f"h3[data-cluster='{CLUSTER}']"
    click(driver, button)
    prompt = wait.until(EC.alert_is_present())
    prompt.send_keys("Page check: back in a minute")
    prompt.accept()
    wait.until(lambda d: "maintenance" in text(d, title))
    status, body = chat()
    check(f"with maintenance on for {CLUSTER}, its requests get 503 ({status})", status == 503)
    check("and the message typed on the page",
          "Page check" in body.get("error", {}).get("message", ""))
    driver.save_screenshot(SHOT)
    print(f"screenshot: {SHOT}")

    click(driver, button)
    wait.until(EC.alert_is_present()).accept()
    wait.until(lambda d: "maintenance" not in text(d, title))
    status, _ = chat()
    check(f"with maintenance off again, {CLUSTER} answers 200 ({status})", status == 200)
finally:
    driver.quit()
print("the operator's page passed in headless Chromium")
