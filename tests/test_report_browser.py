"""The HTML report as a browser shows it: headless Chromium renders `igam report` pages of a run and of an
experiment at 1280 x 900, and the test reads back the DOM after a measuring script ran: no raw Markdown,
no broken image, summary cards equal to the headline, radii in numeric order, "best" only among comparable
runs, nothing wider than the window. Skipped (with the reason) where no Chromium is installed; CI installs
Debian's chromium (.ci/run)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from igam import progress
from igam.config import make_config
from igam.evaluate import evaluate_run
from igam.report.html import headline, read_run, write_report
from igam.train import train

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((b for b in map(shutil.which, BROWSERS) if b), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium installed (apt-get install "
                                "chromium); CI installs it in .ci/run")
WIDTH = 1280

MEASURE = """<script>
window.addEventListener("load", () => {
  document.querySelectorAll("details").forEach(d => d.open = true);
  const wide = [];
  document.querySelectorAll("table").forEach(t => {
    const box = t.closest(".wrap") || t.parentElement;
    if (t.scrollWidth > box.clientWidth + 1) wide.push(t.rows[0].textContent.trim().slice(0, 40));
  });
  const broken = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const b = document.body;
  b.setAttribute("data-page-width", document.documentElement.scrollWidth);
  b.setAttribute("data-wide-tables", JSON.stringify(wide));
  b.setAttribute("data-images", document.images.length);
  b.setAttribute("data-broken-images", broken);
  b.setAttribute("data-text", JSON.stringify(b.innerText));
});
</script>"""


def render(page: Path, tmp: Path) -> dict[str, str]:
    """Open `page` in headless Chromium at 1280 px after adding the measuring script; the DOM's body
    attributes it set, and the DOM."""
    probe = tmp / f"probe-{page.stem}.html"
    probe.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    out = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp / 'profile'}", f"--window-size={WIDTH},900", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=180)
    dom = out.stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, f"no DOM from {BROWSER}: {out.stderr[-500:]}"
    attrs = {k: html.unescape(v) for k, v in re.findall(r'(data-[\w-]+)="([^"]*)"', body.group(1))}
    return {**attrs, "dom": dom}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """An experiment folder: a tiny evaluated run (with an eps sweep), a weaker copy of it on the same
    dataset, a copy on another dataset that scores higher, and a results.md with Markdown."""
    root = tmp_path_factory.mktemp("exp")
    run = train(make_config(overrides=dict(
        dataset="synthetic:8x8x3:4", model="small-cnn", width=4, train_subset=128, test_subset=64, epochs=1,
        batch_size=32, eval_n=32, progress=False, tensorboard=False, threads=1, out_dir=str(root),
        name="a")), log=lambda *a: None)
    with progress.enabled(False):
        evaluate_run(run, ["clean", "fgsm", "pgd5"], n=48)
        evaluate_run(run, ["pgd5"], n=48, eps_sweep="1/255,2/255,16/255")
    for name, scale, dataset in (("b", 0.5, None), ("c", 0.0, "synthetic:8x8x3:4:0,1,2,3")):
        other = root / name
        shutil.copytree(run, other)
        ev = json.loads((other / "eval.json").read_text())
        for rec in ev.values():
            if isinstance(rec, dict) and "accuracy" in rec:
                rec["accuracy"] = rec["accuracy"] * scale if scale else 1.0
        (other / "eval.json").write_text(json.dumps(ev))
        if dataset:
            meta = json.loads((other / "meta.json").read_text())
            meta["data"]["dataset"] = dataset
            (other / "meta.json").write_text(json.dumps(meta))
    (root / "results.md").write_text("# Results\n\n| Model | PGD5 |\n|---|---|\n| a | **12.5** |\n\n"
                                     "```\nplain\n```\n")
    return root


def test_run_page_in_a_browser(experiment, tmp_path) -> None:
    run = experiment / "a"
    page = write_report(run, gradients=False)
    seen = render(page, tmp_path)
    text = json.loads(seen["data-text"])
    assert int(seen["data-page-width"]) <= WIDTH and json.loads(seen["data-wide-tables"]) == []
    assert seen["data-broken-images"] == "0" and int(seen["data-images"]) >= 2  # curves, robustness curve
    # the cards: clean accuracy and the headline (worst case at the run's eps over its attacks)
    head = headline(read_run(run))
    ev = json.loads((run / "eval.json").read_text())
    card = r'class="card" data-key="(\w+)"><div class="k">[^<]*</div><div class="v">([^<]*)<'
    cards = dict(re.findall(card, seen["dom"]))
    assert cards["clean"] == f"{100 * ev['clean']['accuracy']:.2f}"
    assert cards["headline"] == f"{100 * head['accuracy']:.2f}" and head["attacks"] == ["fgsm", "pgd5"]
    assert "Robust at eps 8/255" in seen["dom"]
    # radii in numeric order, written one way
    rows = re.findall(r"PGD5 \(eps ([0-9/.]+)\)", text)
    assert rows[:3] == ["1/255", "2/255", "16/255"], rows
    assert "0.0039" not in text and "0.0627" not in text  # 1/255 and 16/255 are not written as decimals


def test_experiment_page_in_a_browser(experiment, tmp_path) -> None:
    page = write_report(experiment, gradients=False)
    seen = render(page, tmp_path)
    text = json.loads(seen["data-text"])
    assert int(seen["data-page-width"]) <= WIDTH and json.loads(seen["data-wide-tables"]) == []
    assert seen["data-broken-images"] == "0"
    # results.md rendered, not shown raw
    assert "|---|" not in text and "**" not in text and "```" not in text
    assert "<strong>12.5</strong>" in seen["dom"]
    # "best" among comparable runs only: a beats b on their dataset; c, alone on its dataset, is never bold
    table = re.search(r"<h2[^>]*>Runs</h2>.*?<tbody>(.*?)</tbody>", seen["dom"], re.S).group(1)
    rows = {re.search(r"<td[^>]*>([abc])</td>", r).group(1): r for r in re.findall(r"<tr>(.*?)</tr>", table)}
    assert 'class="num best"' in rows["a"] and "best" not in rows["c"]
    assert rows["a"].count("best") >= rows["b"].count("best")  # b: half of a's accuracies (ties at 0 aside)
