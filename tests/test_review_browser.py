"""Issue 24.2 in a real browser: label ten frames by keyboard in headless Chromium, with an undo and a page reload
half-way, then read labels.jsonl.

Skipped (with the reason) when no Chromium + chromedriver is installed here; CI installs them and sets
SEMHINET_REQUIRE_BROWSER=1, which turns the skip into a failure, so the test cannot silently stop running there.
"""

from __future__ import annotations

import json
import os

import pytest
from test_review_server import make_review

from semhinet_tf.review.labels import replay
from tools.review_browser import chromium_driver, find_browser, press, review_server, wait_idle

_, _, MISSING = find_browser()
if MISSING and os.environ.get("SEMHINET_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"SEMHINET_REQUIRE_BROWSER=1 but {MISSING}")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"no browser to drive: {MISSING}")


def _index(browser) -> int:
    return int(browser.execute_script("return document.body.dataset.index"))


def test_label_ten_frames_by_keyboard_with_undo_and_reload(tmp_path):
    from selenium.webdriver.common.keys import Keys

    review = make_review(tmp_path, n=12)
    queue = [json.loads(s) for s in (review / "queue.jsonl").read_text().splitlines()]
    keys = {leaf: str(i + 1) for i, leaf in enumerate(queue[0]["leaf_probabilities"])}  # 1..8 in leaf order
    with review_server(review, reviewer="carla") as (_, url), chromium_driver() as browser:
        browser.get(url)
        wait_idle(browser, answered=0)
        assert _index(browser) == 0 and "0 / 12 answered" in browser.find_element("id", "counter").text
        # frames 0..4: a leaf key, Enter (the model's verdict), a leaf key, a wrong key undone and typed again
        press(browser, keys["crack"], Keys.ENTER, keys["open"], keys["normal"])
        wait_idle(browser, answered=4)
        press(browser, "u")                      # withdraws frame 3's "normal" and goes back to it
        wait_idle(browser, answered=3)
        assert _index(browser) == 3
        press(browser, keys["ler"], keys["bogus"])
        wait_idle(browser, answered=5)
        assert _index(browser) == 5
        browser.refresh()                        # mid-way reload: resumes at the first frame without an answer
        wait_idle(browser, answered=5)
        assert _index(browser) == 5 and "5 / 12 answered" in browser.find_element("id", "counter").text
        # the arrows move without answering: back to frame 4, shown with its answer, and forward again
        press(browser, Keys.ARROW_LEFT)
        wait_idle(browser, answered=5)
        assert _index(browser) == 4 and "bogus" in browser.find_element("id", "answer").text
        press(browser, Keys.ARROW_RIGHT)
        wait_idle(browser)
        assert _index(browser) == 5
        press(browser, keys["inc_etch"], keys["bridge"], Keys.ENTER, keys["cmp"], keys["crack"])
        wait_idle(browser, answered=10)
        assert _index(browser) == 10 and "10 / 12 answered" in browser.find_element("id", "counter").text
        shot = browser.get_screenshot_as_png()
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"
        img_width = browser.execute_script("return document.getElementById('frame').naturalWidth")
        assert img_width == 64  # the frame at full resolution
    expected = ["crack", queue[1]["verdict"], "open", "ler", "bogus", "inc_etch", "bridge", queue[7]["verdict"],
                "cmp", "crack"]
    r = replay(review / "labels.jsonl")
    assert not r.bad_lines and not r.skipped
    assert {e["path"]: label for e, label in zip(queue, expected, strict=False)} == \
        {p: a.label for p, a in r.labels.items()}
    assert all(a.reviewer == "carla" and a.sha256 == queue[[e["path"] for e in queue].index(p)]["sha256"]
               for p, a in r.labels.items())
    lines = [json.loads(s) for s in (review / "labels.jsonl").read_text().splitlines()]
    assert [ln["action"] for ln in lines].count("undo") == 1 and len(lines) == 12  # 11 labels typed, one undone
