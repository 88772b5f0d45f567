"""Drive the review page in a real headless Chromium: the browser test's machinery and the README screenshot.

Chromium and its driver come from the system's packages (Debian: `apt-get install chromium chromium-driver`);
nothing is downloaded at run time (Selenium Manager is kept offline). As root, Chromium needs --no-sandbox, and a
fresh profile with background networking off, or it keeps calling Google's services.

    python tools/review_browser.py REVIEW OUT.png [--width 1400 --height 860] [--zoom N] [--frame I]

starts `semhinet review serve REVIEW` on a free port, opens the page, zooms N steps and saves a screenshot; it
answers nothing (the page only reads until a key is pressed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")


def find_browser() -> tuple[str | None, str | None, str]:
    """(chromium, chromedriver, reason): the paths found, and when one is missing why, in words."""
    chromium = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return chromium, driver, "the selenium package is not installed (pip install -r requirements.txt)"
    if chromium is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", driver)) if p is None)
        return chromium, driver, f"no {missing} on PATH (Debian: apt-get install chromium chromium-driver)"
    return chromium, driver, ""


@contextmanager
def chromium_driver(width: int = 1400, height: int = 860):
    """A Selenium WebDriver on a headless Chromium with a fresh profile, removed afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver, reason = find_browser()
    if reason:
        raise RuntimeError(reason)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or a driver
    profile = tempfile.mkdtemp(prefix="semhinet-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


@contextmanager
def review_server(review: str | Path, reviewer: str | None = None):
    """`semhinet review serve REVIEW --port 0` as a subprocess; yields (process, url with token)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "semhinet_tf", "review", "serve", str(review), "--port", "0"]
    if reviewer:
        cmd += ["--reviewer", reviewer]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        match = re.search(r"(http://\S+/\?token=\S+)", line)
        if not match:
            proc.kill()
            raise RuntimeError(f"review serve did not start: {line!r} {proc.stderr.read()[-500:]}")
        yield proc, match.group(1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def wait_idle(browser, answered: int | None = None, timeout: float = 20.0) -> None:
    """Until the page has handled every key sent (and shows `answered` answers, when given)."""
    from selenium.webdriver.support.ui import WebDriverWait

    def done(b) -> bool:
        data = b.execute_script("return Object.assign({}, document.body.dataset)")
        return (data.get("ready") == "1" and data.get("pending", "0") == "0"
                and (answered is None or data.get("answered") == str(answered)))

    WebDriverWait(browser, timeout).until(done)


def press(browser, *keys: str) -> None:
    """Type keys on the page, as a person would (Selenium's Keys.* for Enter and the arrows)."""
    from selenium.webdriver.common.action_chains import ActionChains

    chain = ActionChains(browser)
    for key in keys:
        chain.send_keys(key)
    chain.perform()


def screenshot(review: str | Path, out: str | Path, width: int = 1400, height: int = 860, zoom: int = 0,
               frame: int | None = None) -> Path:
    """Open the page on REVIEW (at queue entry `frame`, else where it resumes) and save a PNG of it."""
    with review_server(review) as (_, url), chromium_driver(width, height) as browser:
        browser.get(url)
        wait_idle(browser)
        if frame is not None:
            browser.execute_script("return show(arguments[0])", frame)
        press(browser, *["+"] * zoom)
        wait_idle(browser)
        browser.execute_script("return new Promise(r => { const i = document.getElementById('frame'); "
                               "if (i.complete) r(); else i.onload = () => r(); })")
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("review", help="a review folder made by `semhinet review queue`")
    p.add_argument("out", help="PNG to write")
    p.add_argument("--width", type=int, default=1400, help="window width in pixels")
    p.add_argument("--height", type=int, default=860, help="window height in pixels")
    p.add_argument("--zoom", type=int, default=0, help="zoom steps (the + key) before the picture")
    p.add_argument("--frame", type=int, default=None, help="queue entry to show (default: where the page resumes)")
    args = p.parse_args(argv)
    print(screenshot(args.review, args.out, args.width, args.height, args.zoom, args.frame))
    return 0


if __name__ == "__main__":
    sys.exit(main())
