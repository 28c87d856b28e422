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


def _candidates(steps, alphas, task, general) -> list[dict]:
    """Retain's candidates, a checkpoint step and merge weight α each, scored task(step, α), general(step, α)."""
    return [
        {
            "checkpoint": f"checkpoint-{s}",
            "step": s,
            "alpha": a,
            "dev_task": task(s, a),
            "dev_general": general(s, a),
            "label": f"step {s}, α={a:g}",
        }
        for s in steps
        for a in alphas
    ]


def fake_selection() -> dict:
    cands = _candidates((100, 200), (0.5, 0.75, 1.0), lambda s, a: 0.2 + 0.1 * a + s / 1000, lambda s, a: 0.6 - 0.3 * a)
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


def _general_gap_of(evals: dict, points: float) -> dict:
    """fake_evals with the teacher's general score `points` above the base's."""
    teacher = evals["teacher"] | {"general": {"score": evals["base"]["general"]["score"] + points / 100, "ci": None}}
    return evals | {"teacher": teacher}


def _row(page: str, label: str) -> str:
    start = page.index(f"<tr><td>{label}</td>")
    return page[start : page.index("</tr>", start)]


def test_a_gap_too_small_to_divide_by_shows_points_and_says_why(tmp_path):
    from distillab.report.html import render_page

    evals = _general_gap_of(fake_evals(), 0.2)  # the demo's case: a share of it printed -2550%
    page = render_page("demo", evals, fake_ledger(), None, None)
    base, distilled = evals["base"]["general"]["score"], evals["distilled"]["general"]["score"]
    row = _row(page, "distilled")
    assert f"{100 * (distilled - base):+.1f} pts*</td>" in row and row.count("%</td>") == 1  # the task's share
    t, b, d = (evals[m]["task"]["score"] for m in ("teacher", "base", "distilled"))
    assert f">{100 * (d - b) / (t - b):+.0f}%</td>" in row  # the task gap is wide: its share stays
    assert (
        "* general: teacher and base are 0.2 points apart, too close to divide by (distilled, zero_distill): "
        "the change vs base in points instead." in page
    )
    # a gap of 10 points that the students' general scores moved away from: points again, for another reason
    wide = render_page("demo", _general_gap_of(fake_evals(), 10.0), fake_ledger(), None, None)
    assert f"{100 * (distilled - base):+.1f} pts*</td>" in _row(wide, "distilled")
    assert "* general: it moved away from the teacher (distilled, zero_distill): the change vs base" in wide
    assert page.count("gap-note") == wide.count("gap-note") == 1


def test_verdict_gives_points_where_the_task_gap_is_too_small():
    evals = fake_evals()
    evals["teacher"] = evals["teacher"] | {"task": {"score": evals["base"]["task"]["score"] + 0.01, "ci": None}}
    d, b = evals["distilled"]["task"]["score"], evals["base"]["task"]["score"]
    assert verdict(evals, fake_ledger()).startswith(
        f"Distilled student scored {100 * d:.1f}% on the task, {100 * (d - b):+.1f} points vs base (no gap closed: "
        "teacher and base are 1.0 points apart, too close to divide by)"
    )


def test_perplexity_of_a_teacher_with_another_tokenizer_is_left_out_of_the_column():
    from distillab.report.html import render_page

    evals = fake_evals()
    evals["teacher"] = evals["teacher"] | {"world_text_perplexity": 1.87}
    same = render_page("r", evals, fake_ledger(), None, None)
    assert "<td class='num'>1.87</td>" in _row(same, "teacher")  # one tokenizer: every perplexity compares
    assert "per token of each model&#39;s own tokenizer" in same and "Left out" not in same
    crossed = render_page("r", evals, fake_ledger(), None, {"cross_tokenizer": {"rows": 10}})
    assert "1.87" not in _row(crossed, "teacher") and "<td class='num'>3.20</td>" in _row(crossed, "distilled")
    assert "Left out of the column, tokenized differently from the student: teacher 1.87 per token" in crossed


def crowded_selection() -> dict:
    """Candidates a fraction of a point apart (200/α0.5 just above 400/α0.5, as the demo's are), twelve of them."""
    cands = _candidates(
        (200, 400, 600, 800),
        (0.5, 0.75, 1.0),
        lambda s, a: 0.30 + 0.05 * a + s / 100_000,
        lambda s, a: 0.52 - 0.02 * a + s / 200_000,
    )
    return fake_selection() | {"chosen": cands[4], "candidates": cands, "base_dev": {"task": 0.30, "general": 0.53}}


@pytest.fixture
def crowded_report_path(tmp_path) -> Path:
    """base and distilled a fraction of a point apart on both suites, and the crowded candidates."""
    cfg = run_config(tmp_path, "demo")
    evals = fake_evals()
    evals["distilled"] = evals["distilled"] | {k: evals["base"][k] for k in ("task", "general")}
    evals["distilled"]["task"] = {"score": evals["base"]["task"]["score"] + 0.002, "ci": None}
    evals["retain"] = evals["zero_distill"] | {"model": "retain", "label": "retain"}
    return build_report(cfg, evals, fake_ledger(), {"retain_selection": crowded_selection()})


@pytest.mark.slow
def test_no_two_text_labels_overlap_and_the_axes_agree_in_headless_chromium(crowded_report_path):
    """Every text of every plot (point labels, ticks, axis labels, titles, legends) as Chromium lays it out: no two
    boxes overlap; the task-vs-general and trade-off plots put the task on y and general on x."""
    sync_playwright = _playwright()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium"),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(crowded_report_path.as_uri(), wait_until="load")
        plots = page.evaluate("""() => [...document.querySelectorAll('figure.plot svg')].map(svg => {
            const said = g => ([...g.childNodes].find(n => n.nodeType === 8) || {textContent: ''}).textContent.trim();
            const texts = [...svg.querySelectorAll('g[id^="text_"], g[id^="label-"]')].map(g => {
                const r = g.getBoundingClientRect();
                return {id: g.id, text: said(g), x0: r.left, y0: r.top, x1: r.right, y1: r.bottom};
            });
            const axis = n => said([...svg.querySelectorAll(`g[id="matplotlib.axis_${n}"] g[id^="text_"]`)].pop());
            return {plot: svg.closest('figure').id, texts, x: axis(1), y: axis(2)};
        })""")
        browser.close()
    by_plot = {p["plot"]: p for p in plots}
    assert set(by_plot) == {"plot-task-general", "plot-pareto", "plot-skills", "plot-tradeoff"}
    for plot in plots:
        texts = [t for t in plot["texts"] if t["x1"] - t["x0"] > 0]
        for i, a in enumerate(texts):
            for b in texts[i + 1 :]:
                overlap = min(a["x1"], b["x1"]) - max(a["x0"], b["x0"]), min(a["y1"], b["y1"]) - max(a["y0"], b["y0"])
                assert min(overlap) <= 0.5, (plot["plot"], a["text"], b["text"])
    for name in ("plot-task-general", "plot-tradeoff"):
        assert (by_plot[name]["x"], by_plot[name]["y"]) == ("general suite score (%)", "task suite score (%)")
    labels = {t["text"] for t in by_plot["plot-tradeoff"]["texts"] if t["id"].startswith("label-")}
    assert {"teacher", "base", "distilled", "retain", "200/α0.5", "400/α0.5"} <= labels  # the crowded ones placed
    assert {"base", "distilled"} <= {t["text"] for t in by_plot["plot-task-general"]["texts"]}
