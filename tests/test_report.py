"""report.html: built from synthetic evals and ledger, then opened in headless Chromium (offline).

The browser test needs `pip install playwright` and Debian's chromium (`apt-get install -y chromium`);
it never runs `playwright install`. It is skipped, saying why, when either is missing.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from distillab.report import build_report, terminal_summary, verdict
from distillab.report.html import pareto_frontier
from tests.helpers import fake_eval, fake_evals, fake_ledger, run_config

CHROMIUM = "/usr/bin/chromium"


def fake_lineage() -> dict:
    return {
        "format": "distillab-lineage/1",
        "model": "student",
        "base_model": "lab:base",
        "teachers": ["lab:teacher"],
        "generations": [
            {
                "generation": 1,
                "token_fractions": {"teacher:lab:teacher": 1.0},
                "train": {"loss_history": [{"loss": 1.0 / (i + 1), "step": i} for i in range(60)]},
            }
        ],
        "effective_fractions": {"teacher:lab:teacher": 1.0},
        "eval": None,
        "cost": None,
    }


@pytest.fixture
def report_path(tmp_path) -> Path:
    cfg = run_config(tmp_path, "demo")
    (cfg.run_dir / "student").mkdir(parents=True)
    (cfg.run_dir / "student" / "lineage.json").write_text(json.dumps(fake_lineage()))
    return build_report(cfg, fake_evals(), fake_ledger(), {"stages": {"generate": "done"}})


def test_page_is_self_contained(report_path):
    page = report_path.read_text()
    assert page.count("<svg") == 3
    for external in ("http://", "https://", "<script", "<link", "src="):
        # matplotlib's SVG carries namespace URIs (xmlns="http://www.w3.org/...") which load nothing.
        rest = page.replace('"http://www.w3.org/2000/svg"', "").replace('"http://www.w3.org/1999/xlink"', "")
        rest = rest.replace("http://purl.org/dc", "").replace("http://creativecommons.org/ns#", "")
        rest = rest.replace("http://www.w3.org/1999/02/22-rdf-syntax-ns#", "").replace("https://matplotlib.org/", "")
        assert external not in rest, external
    for label in fake_evals():
        assert f"<td>{label}</td>" in page  # every model in the scores table
    assert "pays off after 41k queries" in page and "NOTIONAL" in page and "about 1 day" in page
    assert "loss_history" in page  # the lineage, shown generically


def test_verdict_sentence():
    evals, ledger = fake_evals(), fake_ledger()
    text = verdict(evals, ledger)
    t, b, d = (evals[m]["task"]["score"] for m in ("teacher", "base", "distilled"))
    gb, gd = evals["base"]["general"]["score"], evals["distilled"]["general"]["score"]
    assert text.startswith(f"Distilled student closed {100 * (d - b) / (t - b):.0f}% of the task gap")
    assert f"lost {100 * (gb - gd):.0f} points of general skill" in text
    assert "it pays off after 41k queries" in text and "notional" in text
    never = verdict(evals, ledger | {"break_even": {"status": "never", "price_basis": "priced"}})
    assert "never pays off" in never
    unknown = verdict(evals, ledger | {"break_even": {"status": "unknown", "reason": "no teacher API price"}})
    assert "unknown (no teacher API price)" in unknown


def test_terminal_summary_renders():
    console = Console(file=io.StringIO(), width=140)
    console.print(terminal_summary(fake_evals(), fake_ledger()))
    out = console.file.getvalue()
    assert "Distilled student closed" in out and "zero_distill" in out and "break-even" in out


def test_pareto_frontier():
    points = [(1.0, 50.0, "a"), (2.0, 40.0, "b"), (3.0, 80.0, "c"), (0.5, 10.0, "d"), (3.0, 70.0, "e")]
    assert [p[2] for p in pareto_frontier(points)] == ["d", "a", "c"]


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install playwright (no `playwright install` needed)")
    if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install -y chromium")
    return sync_playwright


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report_path, tmp_path):
    sync_playwright = _playwright()
    from PIL import Image, ImageStat

    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium"),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("request", lambda req: requests.append(req.url))
        page.goto(report_path.as_uri(), wait_until="load")
        plots = page.evaluate("""() => [...document.querySelectorAll('figure.plot')].map(f => {
            const svg = f.querySelector('svg');
            if (!svg) return {id: f.id, width: 0, height: 0, drawn: 0};
            const r = svg.getBoundingClientRect();
            const drawn = [...svg.querySelectorAll('path')].filter(p => (p.getAttribute('d') || '').length > 10
                && p.getBBox().width + p.getBBox().height > 0).length;
            return {id: f.id, width: r.width, height: r.height, drawn};
        })""")
        shot = page.screenshot(full_page=True)
        verdict_text = page.inner_text("#verdict")
        browser.close()
    assert errors == []
    assert [r for r in requests if not r.startswith("file://")] == []  # nothing fetched: works offline
    assert {p["id"] for p in plots} == {"plot-task-general", "plot-pareto", "plot-skills"}
    for plot in plots:
        assert plot["width"] > 200 and plot["height"] > 100, plot
        assert plot["drawn"] > 10, plot  # axes, ticks, markers, bars: real drawn paths
    image = Image.open(io.BytesIO(shot)).convert("L")
    assert max(ImageStat.Stat(image).var) > 0  # not a blank page
    assert verdict_text.startswith("Distilled student closed")


def fake_selection() -> dict:
    cands = [
        {
            "checkpoint": f"checkpoint-{s}",
            "step": s,
            "alpha": a,
            "dev_task": 0.2 + 0.1 * a + s / 1000,
            "dev_general": 0.6 - 0.3 * a,
            "label": f"step {s}, α={a:g}",
        }
        for s in (100, 200)
        for a in (0.5, 0.75, 1.0)
    ]
    chosen = cands[1]
    return {
        "rule": "highest dev task score (0.375) among the 2 of 6 candidates whose dev general score stayed >= "
        "base 0.550 - 0.02",
        "base_dev": {"task": 0.0, "general": 0.55},
        "chosen": chosen,
        "candidates": cands,
        "split": "dev",
        "recipe": {
            "replay_source": "base",
            "replay_fraction": 0.25,
            "merge_alphas": [0.5, 0.75, 1.0],
            "select_checkpoints": True,
            "alpha": 0.75,
            "step": 100,
        },
    }


@pytest.fixture
def retain_report_path(tmp_path) -> Path:
    cfg = run_config(tmp_path, "demo")
    evals = fake_evals()
    evals["retain"] = fake_eval("retain", {"add": 0.7, "reverse": 0.7, "upper": 0.8, "recall": 0.3}, 5)
    return build_report(cfg, evals, fake_ledger(), {"retain_selection": fake_selection()})


def test_retain_section_says_which_rule_chose_what(retain_report_path):
    page = retain_report_path.read_text()
    assert page.count("<svg") == 4 and "id='plot-tradeoff'" in page
    assert "The <b>retain</b> student is step 100, α=0.75" in page and "dev split only" in page
    assert page.count("<tr class='chosen'>") == 1 and "retain_selection" not in page


@pytest.mark.slow
def test_tradeoff_plot_renders_every_candidate_in_headless_chromium(retain_report_path):
    sync_playwright = _playwright()
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium"),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(retain_report_path.as_uri(), wait_until="load")
        boxes = page.evaluate("""() => [...document.querySelectorAll('#plot-tradeoff svg g[id^="candidate-"], '
            + '#plot-tradeoff svg g#chosen')].map(g => { const b = g.getBBox(); return {id: g.id, w: b.width, h: b.height}; })""")
        browser.close()
    assert errors == []
    ids = {b["id"] for b in boxes}
    assert ids == {f"candidate-{i}" for i in range(6)} | {"chosen"}  # every candidate drawn, and the choice
    assert all(b["w"] > 0 and b["h"] > 0 for b in boxes)
