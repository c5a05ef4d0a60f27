"""The report page in a real headless browser (Debian's Chromium, driven by Playwright).

Playwright never downloads a browser here: it drives /usr/bin/chromium (`.ci/run` installs
the distribution's package when it is missing)."""
from __future__ import annotations

import json
import os

import pytest

from deeptransfer.cli import main
from deeptransfer.report.synthetic import make_synthetic

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("DEEPTRANSFER_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        msg = (f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (as root; .ci/run "
               f"does it), or set DEEPTRANSFER_CHROMIUM to a Chromium binary")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser")
    syn = make_synthetic(base, classes=6, per_class=30, dim=32, flip=4, hard=8, noise=0.6,
                         epochs=6, class_names=["ant", "bee", "cat", "<dog & co>", "eel", "fox"])
    (base / "s.json").write_text(json.dumps({"results": [
        {"params": {"lr": 0.1 * i, "head": "mlp"}, "score": 0.1 * i} for i in range(7)]}))
    (base / "c.json").write_text(json.dumps({"points": [
        {"per_class": n, "train_mean": 1.0, "train_std": 0.0, "val_mean": n / 40,
         "val_std": 0.05} for n in (5, 10, 20, 30)]}))
    out = base / "report.html"
    assert main(["report", syn.model_dir, syn.store, "--out", str(out), "--workers", "0",
                 "--gallery", "12", "--pairs", "3", "--pair-examples", "2",
                 "--search", str(base / "s.json"), "--curve", str(base / "c.json"),
                 "--json"]) == 0
    return syn, out


def test_the_page_in_chromium(browser, report, tmp_path):
    syn, out = report
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"{m.type}: {m.text}")
            if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(out.as_uri(), wait_until="load")
    assert problems == []
    # nothing but the page itself (thumbnails are data: URIs)
    assert [u for u in requests if not u.startswith("data:")] == [out.as_uri()]

    assert page.locator("#per-class tbody tr").count() == 6
    assert page.locator("#pairs tbody tr").count() == 3
    assert page.locator("#pairs tbody tr").first.locator("figure.thumb").count() == 2
    assert page.locator("#top-losses figure.thumb").count() == 8  # the 8 mistakes
    assert page.locator("#low-margin figure.thumb").count() == 12
    n_err = int(page.locator("#label-error-count").get_attribute("data-count"))
    assert page.locator("#label-errors figure.thumb").count() == min(n_err, 12) >= 4
    assert page.locator("#search tbody tr").count() == 7
    assert page.locator("#curve tbody tr").count() == 4
    assert page.locator("#training-curve svg").count() == 1
    # every thumbnail decoded: a real image, not a broken one
    widths = page.eval_on_selector_all("figure.thumb img", "els => els.map(e => e.naturalWidth)")
    assert widths and all(w > 0 for w in widths)
    # an escaped class name shows as text
    assert "<dog & co>" in page.locator("#per-class").inner_text()

    # sorting: click "support"... then "class" twice (descending)
    names = lambda: page.locator("#per-class tbody tr td:first-child").all_inner_texts()  # noqa: E731
    header = page.locator("#per-class th", has_text="class")
    header.click()
    assert names() == sorted(names())
    header.click()
    assert names() == sorted(names(), reverse=True)
    recall = page.locator("#per-class th", has_text="recall")
    recall.click()
    values = [float(v) for v in page.eval_on_selector_all(
        "#per-class tbody tr td:nth-child(3)", "els => els.map(e => e.dataset.v)")]
    assert values == sorted(values)
    assert recall.get_attribute("aria-sort") == "ascending"

    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert problems == []
    page.close()
