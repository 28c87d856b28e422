"""The lm-eval bridge, offline: a local multiple-choice task (YAML + JSONL in tmp) on tiny local models; and
lm-eval's own `local-completions` client against `distillab serve`, which matches distillab's log-likelihoods only
with add_bos_token=True."""

from __future__ import annotations

import json
import shutil

import pytest

from distillab import models
from distillab.errors import UserError
from distillab.scoring import choice_loglikelihoods, score_multiple_choice
from distillab.testing import server_thread
from tests.helpers import run_config, save_tiny_llama, write_jsonl

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install lm-eval")

from distillab.lm_eval_bridge import flat_scores, run_lm_eval  # noqa: E402
from distillab.lm_eval_tasks import load_tasks, resolve_task_names, resolve_tasks  # noqa: E402

DOCS = [
    {"question": "upper abc", "choices": ["ABC", "XYZ"], "label": 0},
    {"question": "reverse abc", "choices": ["abc", "cba"], "label": 1},
    {"question": "12+7=", "choices": ["19", "91", "7"], "label": 0},
    {"question": "upper dog", "choices": ["CAT", "DOG"], "label": 1},
    {"question": "sort cab", "choices": ["abc", "cab"], "label": 0},
]

# target_delimiter "" so a choice follows the prompt's newline directly, as distillab's own scorer does.
TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: tiny_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}\\n"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture
def task_yaml(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    write_jsonl(folder / "tiny_mc.jsonl", DOCS)
    (folder / "tiny_mc.yaml").write_text(TASK_YAML)
    return folder / "tiny_mc.yaml"


def our_accuracy(model_name) -> float:
    model, tok = models.load(model_name)
    return sum(score_multiple_choice(model, tok, d["question"] + "\n", d["choices"], d["label"]) for d in DOCS) / len(
        DOCS
    )


@pytest.mark.slow
def test_lm_eval_on_run_models_offline(tmp_path, task_yaml, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    # an untrained 2-layer Llama with the lab tokenizer: a second local model, built in-process
    cfg = run_config(tmp_path, "r", teacher={"model": str(save_tiny_llama(tmp_path / "teacher", hidden=16))})
    shutil.copytree(models.resolve_model_path("lab:base"), cfg.run_dir / "student")  # stands in for the student
    logs = []
    results = run_lm_eval(cfg, str(task_yaml), log=logs.append)  # cwd is not the YAML's directory
    assert set(results) == {"teacher", "base", "distilled"}
    for label, model_name in [("teacher", cfg.teacher.model), ("base", "lab:base")]:
        saved = json.loads((cfg.run_dir / "eval" / f"lm_eval_{label}.json").read_text())
        assert saved["tasks"] == ["tiny_mc"] and saved["n-samples"]["tiny_mc"]["effective"] == len(DOCS)
        acc = saved["scores"]["tiny_mc"]["acc"]
        assert acc == pytest.approx(our_accuracy(model_name))  # lm-eval agrees with distillab's own MC scorer
    assert results["distilled"]["scores"] == results["base"]["scores"]  # same weights, same answers
    # A rerun with nothing changed reads the saved results and evaluates nothing.
    logs.clear()
    again = run_lm_eval(cfg, str(task_yaml), log=logs.append)
    assert logs == [] and again["base"]["scores"] == results["base"]["scores"]
    # The config's eval.lm_eval_tasks is what `distillab run` (pipeline.run_all) and a bare `evaluate` use.
    cfg.eval.lm_eval_tasks = [str(task_yaml)]
    assert run_lm_eval(cfg, "", log=logs.append)["teacher"]["scores"] == results["teacher"]["scores"]


@pytest.mark.slow
def test_local_completions_against_serve_equal_distillabs_loglikelihoods_with_add_bos_token(
    tmp_path, task_yaml, monkeypatch
):
    """lm-eval's `local-completions` model scoring the task through `distillab serve`: with add_bos_token=True (and the
    model's tokenizer, requests sent as token ids) every choice's log-likelihood is distillab's own; without it the
    context loses the <bos> every distillab model is trained and scored with, and the numbers move. lm-eval moves a
    context's trailing whitespace (the prompts' newline) into the continuation, so the pair compared is
    (question, newline + choice); the choice ranking is the same as after the newline."""
    from lm_eval import simple_evaluate

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    path = models.resolve_model_path("lab:base")
    model, tok = models.load("lab:base")
    ours = [choice_loglikelihoods(model, tok, d["question"], ["\n" + c for c in d["choices"]]) for d in DOCS]
    tasks = resolve_tasks(run_config(tmp_path, "r"), str(task_yaml))
    scored = {}
    with server_thread(path, model_name="lab:base") as server:
        for add_bos_token in (True, False):
            client = {
                "model": "lab:base",
                "base_url": server.base_url + "/completions",
                "tokenizer": str(path),
                "tokenizer_backend": "huggingface",
                "add_bos_token": add_bos_token,
                "max_length": 256,
            }
            out = simple_evaluate(
                model="local-completions",
                model_args=client,
                tasks=load_tasks(tasks.manager, tasks.names),
                task_manager=tasks.manager,
                log_samples=True,
            )
            samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
            scored[add_bos_token] = [[ll for ll, _ in s["filtered_resps"]] for s in samples]
    for theirs, mine in zip(scored[True], ours):
        assert theirs == pytest.approx(mine, abs=1e-4)
    for theirs, mine in zip(scored[False], ours):
        assert all(abs(a - b) > 0.1 for a, b in zip(theirs, mine))  # no <bos>: another context


def test_task_names_from_include_path(task_yaml):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_yaml.parent), include_defaults=False)
    assert resolve_task_names(tm, [str(task_yaml)]) == ["tiny_mc"]
    assert resolve_task_names(tm, [str(task_yaml.parent), "tiny_mc"]) == ["tiny_mc"]
    with pytest.raises(UserError, match="unknown lm-eval task 'tiny_mx' \\(did you mean 'tiny_mc'\\?\\)"):
        resolve_task_names(tm, ["tiny_mx"])


def test_bad_specs_are_one_line_errors(tmp_path):
    cfg = run_config(tmp_path, "r")
    with pytest.raises(UserError, match="task file not found"):
        run_lm_eval(cfg, str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError, match="no lm-eval tasks given"):
        run_lm_eval(cfg, "")


def test_a_hub_dataset_not_cached_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    """As hellaswag or arc_easy on a machine that never downloaded them: lm-eval runs offline here."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    (tmp_path / "hub_task.yaml").write_text(
        TASK_YAML.replace("tiny_mc", "hub_mc").replace(
            "dataset_path: json", "dataset_path: distillab-tests/never-cached"
        )
    )
    tasks = resolve_tasks(run_config(tmp_path, "r"), str(tmp_path / "hub_task.yaml"))
    with pytest.raises(
        UserError, match="failed to load \\(offline\\).*not in this machine's `datasets` cache.*local task YAML"
    ):
        load_tasks(tasks.manager, tasks.names)


def test_flat_scores_drop_the_default_filter():
    raw = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact_match,strict": 1.0}}
    assert flat_scores(raw) == {"t": {"acc": 0.5, "exact_match,strict": 1.0}}
