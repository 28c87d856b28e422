"""One typed config object for a run. TOML in, resolved TOML out (run.toml, with no secrets in it).

Unknown keys are errors with a "did you mean" hint; every field has a default that runs on the lab.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distillab.errors import UserError

# = losses.LOSS_NAMES (tests/test_losses.py holds them equal), written out: importing losses would make config, and
# so `distillab --help`, import torch (1.7 s -> 3+ s here)
LossName = Literal["ce", "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


THINK_TAGS = ("<think>", "</think>")  # a reasoning model's inline trace, as DeepSeek-R1 and Qwen3 write it
TRACE_FORMAT = "<think>\n{reasoning}\n</think>\n{answer}"  # trace + answer for a student without a thinking template


class ConfigError(UserError):
    """A config problem, worded for one line on the terminal."""


def check_hub_id(hub_id: str) -> str:
    """A Hugging Face Hub model id ("name" or "namespace/name"), or a UserError saying why it is not one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(hub_id)
    except HFValidationError as err:
        raise UserError(
            f"student_hub_id {hub_id!r} is not a Hugging Face Hub id ({str(err).splitlines()[0]}); "
            'give one like "HuggingFaceTB/SmolLM2-135M", or leave it unset'
        ) from None
    return hub_id


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherConfig(_Strict):
    model: str = "lab:teacher"  # a local HF directory / lab:NAME, or the model name at base_url
    # set: an OpenAI-compatible endpoint, or a list of them (replicas of one model: requests go to the one with
    # the fewest outstanding, a failing one is backed off); unset: the local HF backend
    base_url: str | list[str] | None = None
    api_key_env: str | None = None  # name of the environment variable holding the key (never the key)
    mode: Literal["completions", "chat"] = "completions"
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k_logprobs: int = Field(20, ge=0, le=20)  # 0: text only
    # a served teacher's tokenizer, which reads the token ids it returns (aligned onto a student of another
    # tokenizer, distillab.crosstok): a directory of its files (or lab:NAME), or "served" to fetch it from the
    # endpoint (GET <base_url>/tokenizer, which `distillab serve` offers); unset: fetched when the endpoint offers it
    tokenizer: str | None = None
    samples_per_prompt: int = Field(1, ge=1)  # > 1 (needs temperature > 0): that many answers a prompt, each a row
    concurrency: int = Field(8, ge=1)  # requests in flight per endpoint
    batch_size: int = Field(64, ge=1)  # local backend: prompts per generate() call
    max_retries: int = Field(6, ge=0)
    timeout_s: float = Field(60.0, gt=0)  # one attempt, whole response included (a body that drips is cut here)
    # the most one request may take, its retries and their waits included; unset: timeout_s x (max_retries + 1)
    request_deadline_s: float | None = Field(None, gt=0)
    max_usd: float | None = None  # stop before projected spend passes this
    usd_per_1m_input: float | None = None  # price override; otherwise genai-prices; local models cost 0
    usd_per_1m_output: float | None = None
    # with the override: prompt tokens the endpoint's prompt cache served (usage.prompt_tokens_details.cached_tokens);
    # unset: the input price. genai-prices' cache-read rate otherwise
    usd_per_1m_cached_input: float | None = None
    # the OpenAI Batch API (distillab.teachers.batch): uncached requests go as JSONL through /v1/files + /v1/batches,
    # answered within the provider's 24 h window at its batch price (genai-prices', else batch_discount x the price)
    batch: bool = False
    batch_max_requests: int = Field(50_000, ge=1)  # requests a batch holds (OpenAI's limit: 50,000 and 200 MB)
    batch_poll_s: float = Field(10.0, gt=0)  # the first wait between polls of a batch; x1.5 a poll, up to ...
    batch_poll_max_s: float = Field(300.0, gt=0)
    # waited for the batches in flight before generate stops (they stay submitted: a rerun collects them); 25 h,
    # past the providers' 24 h window
    batch_wait_s: float = Field(90_000.0, gt=0)
    batch_discount: float = Field(0.5, gt=0, le=1)  # the batch price where genai-prices has none: this x the price
    # a reasoning teacher's inline trace: [opening, closing] tags cut off its answer as answers arrive (a separate
    # reasoning_content / reasoning field needs none); [] keeps the text whole (distillab.reasoning)
    think_tags: list[str] = list(THINK_TAGS)

    @model_validator(mode="after")
    def _check_url(self) -> TeacherConfig:
        urls = self.urls
        if isinstance(self.base_url, list) and not urls:
            raise ValueError("base_url is an empty list: give one endpoint or more, or leave it unset")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"base_url must be an http:// or https:// URL (got {url!r})")
        if len({u.rstrip("/") for u in urls}) < len(urls):
            raise ValueError("base_url lists the same endpoint twice")
        if self.think_tags and (len(self.think_tags) != 2 or not all(t.strip() for t in self.think_tags)):
            raise ValueError(f"think_tags must be [opening, closing] non-empty tags, or [] (got {self.think_tags})")
        if self.batch and not isinstance(self.base_url, str):
            raise ValueError(
                "batch = true needs one endpoint: set base_url to the URL of an API with /v1/batches "
                "(a list of replicas is for requests sent one by one)"
            )
        if self.samples_per_prompt > 1 and self.temperature == 0:
            raise ValueError(
                f"samples_per_prompt = {self.samples_per_prompt} needs temperature > 0 "
                "(greedy decoding gives the same answer every time)"
            )
        return self

    @property
    def urls(self) -> list[str]:
        """The endpoints, as a list (empty for the local backend)."""
        if self.base_url is None:
            return []
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)


class DataConfig(_Strict):
    skills: list[str] = ["add"]  # lab skills whose train prompts the teacher answers (the task)
    # JSONL, Parquet or a `datasets` save_to_disk directory with "prompt" or "messages" (and optional "answer");
    # replaces skills
    prompts_file: str | None = None
    prompt_column: str = "prompt"  # the prompts file's column (JSON key) holding a plain prompt
    messages_column: str = "messages"  # ...holding an OpenAI conversation; used over the prompt when both are set
    answer_column: str = "answer"  # ...holding the reference answer (a final assistant turn also is one)
    source: Literal["teacher", "human", "lab"] = "teacher"  # who writes the completions
    declared_teacher: str | None = None  # a brought dataset's answers were written by this model: provenance says so
    n_prompts: int = Field(1000, ge=1)  # per lab skill
    truncate: Literal["none", "left"] = "none"  # prompts past a local teacher's context: refuse, or keep their end
    seed: int = 0

    @model_validator(mode="after")
    def _check_columns(self) -> DataConfig:
        columns = {
            "prompt_column": self.prompt_column,
            "messages_column": self.messages_column,
            "answer_column": self.answer_column,
        }
        for key, name in columns.items():
            if not name.strip():
                raise ValueError(f"{key} is empty: name the prompts file's column")
        if len(set(columns.values())) < len(columns):
            raise ValueError(
                f"prompt_column, messages_column and answer_column must name different columns "
                f"(got {', '.join(columns.values())})"
            )
        return self


class TrainConfig(_Strict):
    student: str = "lab:base"
    student_hub_id: str | None = None  # the student's Hugging Face Hub id, for the model card's base_model
    loss: LossName = "forward_kl"
    kd_weight: float = Field(1.0, ge=0.0)  # weight of the KD term on teacher logprobs
    sft_weight: float = Field(0.0, ge=0.0)  # weight of cross-entropy on the teacher's text
    kd_temperature: float = Field(1.0, gt=0.0)
    beta: float = Field(0.5, ge=0.0, le=1.0)  # jsd
    alpha: float = Field(0.1, ge=0.0, le=1.0)  # skew KL
    on_policy_fraction: float = Field(0.0, ge=0.0, le=1.0)  # λ of GKD: share of steps on student samples
    epochs: float = Field(3.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    # rows each process takes per micro-batch, as transformers and TRL name it: a step takes per_device_batch_size x
    # processes x grad_accum rows (the global batch, printed at start); `batch_size` is its old name, still read
    per_device_batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    lora: bool = False
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    chunk_size: int = Field(0, ge=0)  # > 0: chunked full-vocab KD from hidden states, this many tokens a chunk
    save_steps: int = Field(200, ge=1)
    seed: int = 0
    group_by_length: bool = False  # batches of similar-length rows (less padding); deterministic with the seed
    packing: bool = False  # a batch's short examples share rows (position ids restart per example)
    # Long sequences. max_length: prompt + completion tokens a row may hold (None: any); a longer row has its
    # completion cut at the end ("truncate") or is left out ("drop"); a row whose prompt alone leaves no room for
    # one completion token is left out either way. Counted in train_summary.json.
    max_length: int | None = Field(None, ge=2)
    overflow: Literal["truncate", "drop"] = "truncate"
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward: memory for time
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: autocast over fp32 weights (mixed precision)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None  # None: the model's default
    # Reasoning traces (distillab.reasoning): train on the teacher's trace + answer (true) or the answers alone;
    # trace_format: how trace and answer are written for a student whose chat template has no thinking format
    traces: bool = True
    trace_format: str = TRACE_FORMAT
    # the config gave the batch size under its old name, batch_size (train notes the new one); not a field, so a
    # config read from the old key equals one read from the new
    old_batch_size_key: ClassVar[bool] = False

    @model_validator(mode="wrap")
    @classmethod
    def _read_old_batch_size(cls, data, handler) -> TrainConfig:
        old = isinstance(data, dict) and "batch_size" in data
        if old:
            if "per_device_batch_size" in data:
                raise ValueError("batch_size is per_device_batch_size's old name: give one of them, not both")
            data = {("per_device_batch_size" if k == "batch_size" else k): v for k, v in data.items()}
        config = handler(data)
        if old:
            object.__setattr__(config, "old_batch_size_key", True)
        return config

    @property
    def batch_size(self) -> int:
        """per_device_batch_size under its old name (code and configs written before the rename)."""
        return self.per_device_batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.per_device_batch_size = value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.loss == "ce" and self.kd_weight > 0:  # the weight of a term that does not exist
            raise ValueError(
                'loss = "ce" is SFT only (cross-entropy on the text, at sft_weight): set kd_weight = 0, '
                "or choose a KD loss"
            )
        if self.kd_weight == 0 and self.sft_weight == 0:
            raise ValueError("kd_weight and sft_weight are both 0: nothing to train")
        if self.student_hub_id is not None:
            check_hub_id(self.student_hub_id)
        if self.on_policy_fraction > 0 and (self.loss == "ce" or self.kd_weight == 0):
            raise ValueError(
                "on-policy steps train the KD term alone (no cross-entropy on the student's own samples): "
                "they need a KD loss and kd_weight > 0"
            )
        _check_trace_format(self.trace_format)
        if self.packing and self.on_policy_fraction > 0:  # on_policy_batch reads one prompt per row
            raise ValueError(
                "packing = true with on_policy_fraction > 0: an on-policy step rebuilds each row's prompt "
                "and samples a new completion of unknown length, so rows cannot be packed ahead; "
                "set packing = false"
            )
        return self


def _check_trace_format(trace_format: str) -> None:
    """{reasoning} then {answer}, and nothing else in braces."""
    reasoning_at, answer_at = trace_format.find("{reasoning}"), trace_format.find("{answer}")
    if reasoning_at < 0 or answer_at < reasoning_at:
        raise ValueError(f"trace_format must hold {{reasoning}} and then {{answer}} (got {trace_format!r})")
    try:
        trace_format.format(reasoning="", answer="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"trace_format {trace_format!r}: {err!r}: only {{reasoning}} and {{answer}} may be in "
            "braces (write a literal brace twice)"
        ) from None


class EvalConfig(_Strict):
    n_per_skill: int = Field(100, ge=1)
    task_file: str | None = None  # JSONL of prompt/answer(/scorer/choices/skill): the task suite, beside lab skills
    general: list[str] | None = None  # general-suite lab skills; None: every skill not in the task
    bootstrap: int = Field(1000, ge=0)
    lm_eval_tasks: list[str] = []
    # score the teacher too; an API teacher (base_url) through its endpoint, cached, its spend a ledger line.
    # false: the report shows the teacher as not scored, and says why gap closed is missing
    score_teacher: bool = True
    # What "good enough to replace the teacher" means; a student below it is never said to pay off. The task floor
    # is min_task_score when set, else min_task_share of the teacher's task score; the general suite may drop at
    # most max_general_drop (absolute score points, e.g. 0.05) below the base student.
    min_task_score: float | None = Field(None, ge=0.0, le=1.0)
    min_task_share: float = Field(0.9, ge=0.0, le=1.0)
    max_general_drop: float | None = Field(0.05, ge=0.0)


class RetainConfig(_Strict):
    """Keep the model while distilling the task (distillab.retain). Off until one of the three methods is set."""

    replay_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # share of every batch that is general replay
    replay_source: Literal["base", "teacher", "dataset"] = "base"  # who answers the general prompts
    general_prompts_file: str | None = None  # JSONL "prompt" (+ "answer" for source dataset); else lab/sampled
    sample_general_prompts: bool = True  # no file and no lab general skills: the base model writes prompts
    n_general_prompts: int = Field(1000, ge=1)  # replay prompts to answer
    merge_alphas: list[float] = []  # θ = (1-α)·θ_base + α·θ_distilled for each α, scored on dev
    select_checkpoints: bool = False  # every saved checkpoint is a candidate, scored on dev
    max_general_drop: float = Field(0.02, ge=0.0)  # the selection rule's allowance (see retain.select)
    general_dev_file: str | None = None  # task-suite JSONL: the general checks candidates are chosen on
    dev_n_per_skill: int = Field(50, ge=1)  # dev examples per lab skill for scoring candidates
    dev_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # of a user's prompts file, held out as the dev task split

    @model_validator(mode="after")
    def _check(self) -> RetainConfig:
        bad = [a for a in self.merge_alphas if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"merge_alphas must lie in [0, 1] (got {bad[0]})")
        return self

    @property
    def enabled(self) -> bool:
        return self.replay_fraction > 0 or bool(self.merge_alphas) or self.select_checkpoints

    @property
    def selects(self) -> bool:
        """Whether candidates are scored on dev and one is chosen (merge or checkpoint selection)."""
        return bool(self.merge_alphas) or self.select_checkpoints


class CostConfig(_Strict):
    train_usd_per_hour: float = Field(0.10, ge=0)  # the device the student trained on
    serve_usd_per_hour: float = Field(0.10, ge=0)  # the device the student is served on
    queries_per_month: float = Field(1_000_000, ge=0)


class DecontaminateConfig(_Strict):
    """[decontaminate]: the training prompts checked against every suite the run scores, and duplicate prompts
    collapsed, before the teacher is asked (distillab.decontaminate). On by default: the lab's train, dev and test
    splits are disjoint, so a lab run loses no prompt to it."""

    enabled: bool = True
    ngram: int = Field(8, ge=1)  # a prompt sharing this many consecutive words with a suite item is contaminated
    # which scored suites to check against: the task and general suites, retain's dev split (when retain selects),
    # the local lm-eval tasks of eval.lm_eval_tasks
    suites: list[Literal["task", "general", "dev", "lm_eval"]] = ["task", "general", "dev", "lm_eval"]
    # duplicate training prompts: kept ("off": the lab draws its prompts with replacement), collapsed when their
    # normalised text is equal ("exact"), or also when their word shingles are near_duplicate_threshold alike
    deduplicate: Literal["off", "exact", "near"] = "off"
    near_duplicate_threshold: float = Field(0.8, gt=0.0, le=1.0)  # Jaccard similarity of the word shingles
    shingle: int = Field(3, ge=1)  # words a shingle holds (a shorter prompt is one shingle)
    action: Literal["drop", "flag"] = "drop"  # flag: kept, marked in the dataset's "decontamination" column

    @model_validator(mode="after")
    def _check(self) -> DecontaminateConfig:
        if len(set(self.suites)) < len(self.suites):
            raise ValueError(f"suites names one twice ({', '.join(self.suites)})")
        return self


VERIFIERS = ("lab", "exact", "normalized", "regex", "math")  # besides a user's "module:function" (distillab.verify)


class VerifyConfig(_Strict):
    """[verify]: check every teacher sample of the task dataset against the prompt's reference answer and train only
    on those that pass (distillab.verify). Absent: nothing is checked, every sample is kept."""

    method: str = "lab"  # lab | exact | normalized | regex | math | "module:function" (prompt, completion, reference)
    by_skill: dict[str, str] = {}  # a verifier per skill (lab skill, or a prompts file's "skill"), over `method`
    pattern: str | None = None  # regex: extracts the answer from the completion (group 1, else the whole match)
    keep: Literal["all", "first"] = "all"  # of a prompt's verified samples, in sample order
    max_per_prompt: int | None = Field(None, ge=1)  # keep = "all": at most this many verified samples a prompt
    # draws a prompt may have in all: one with none verified is drawn again, samples_per_prompt more at a time, up to
    # this; None: samples_per_prompt (no re-draws)
    max_draws: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> VerifyConfig:
        import re

        for where, method in [("method", self.method), *((f"by_skill.{k}", v) for k, v in self.by_skill.items())]:
            if method not in VERIFIERS and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", method):
                raise ValueError(
                    f'{where} = {method!r}: choose {", ".join(VERIFIERS)}, or "module:function" '
                    "(a Python function (prompt, completion, reference) -> bool)"
                )
        if "regex" in self.methods and not self.pattern:
            raise ValueError(
                'method "regex" needs a pattern: the regular expression that extracts the answer '
                "from the completion (group 1, else the whole match)"
            )
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {err}") from None
        if self.keep == "first" and (self.max_per_prompt or 1) > 1:
            raise ValueError('keep = "first" keeps one sample a prompt: max_per_prompt applies to keep = "all"')
        return self

    @property
    def methods(self) -> set[str]:
        return {self.method, *self.by_skill.values()}


class PlanTeacher(TeacherConfig):
    """A candidate teacher of `distillab plan` ([[plan.teachers]]): settings over [teacher]'s (what it does not set is
    [teacher]'s), and the name its pilots go by."""

    label: str | None = None  # its pilots' directory and its row; None: the model name and temperature


class PlanConfig(_Strict):
    """[plan]: `distillab plan` trains pilots on nested subsets of the train prompts, scores them on the dev split
    and projects the full run from their learning curve, before the bill (distillab.plan)."""

    # shares of the train prompts a pilot trains on; each smaller pilot's prompts are inside every larger one's
    fractions: list[float] = [0.02, 0.05, 0.10]
    # what the pilots may spend on teacher tokens, every candidate teacher together: the largest fractions are left
    # out until the projected spend fits (refused when even the smallest does not); None: no limit
    max_usd: float | None = Field(None, ge=0)
    sizes: list[float] = [0.1, 0.25, 0.5, 1.0]  # shares of the train prompts to project a full run at
    seed: int = 0  # which prompts a pilot holds (a seeded hash of each prompt)
    # a pilot trains max_steps x its share of the prompts (the full run's epochs), so its cost follows its data
    scale_steps: bool = True
    bootstrap: int = Field(300, ge=0)  # resamples of the dev items for the projection's interval
    teachers: list[PlanTeacher] = []  # more candidate teachers beside [teacher], a pilot each on the same prompts

    @model_validator(mode="after")
    def _check(self) -> PlanConfig:
        for key, shares in (("fractions", self.fractions), ("sizes", self.sizes)):
            if not shares:
                raise ValueError(f"plan.{key} is empty: give one share of the train prompts or more")
            bad = [f for f in shares if not 0.0 < f <= 1.0]
            if bad:
                raise ValueError(f"plan.{key} are shares of the train prompts, in (0, 1] (got {bad[0]})")
            if len(set(shares)) < len(shares):
                raise ValueError(f"plan.{key} names one share twice")
        if len(self.fractions) < 2:
            raise ValueError("plan.fractions needs two pilots or more: a curve is not fitted to one point")
        labels = [t.label for t in self.teachers if t.label]
        if len(set(labels)) < len(labels):
            raise ValueError("plan.teachers: two teachers have the same label")
        return self


class RunConfig(_Strict):
    name: str = "run"
    runs_dir: str = "runs"
    teacher: TeacherConfig = TeacherConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    retain: RetainConfig = RetainConfig()
    costs: CostConfig = CostConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()
    verify: VerifyConfig | None = None  # absent: the teacher's samples are kept unchecked
    plan: PlanConfig = PlanConfig()  # `distillab plan`: pilots and the projection of the full run

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"run name {self.name!r} must be a plain directory name")
        if self.verify is not None:
            self._check_verify(self.verify)
        if any(t.model_fields_set - {"label"} != set(TeacherConfig.model_fields) for t in self.plan.teachers):
            # a candidate teacher is the settings it gives over [teacher]'s, written out whole (run.toml says it all)
            base = self.teacher.model_dump()
            self.plan.teachers = [
                PlanTeacher.model_validate(base | t.model_dump(include=t.model_fields_set)) for t in self.plan.teachers
            ]
        return self

    def _check_verify(self, v: VerifyConfig) -> None:
        if self.data.source != "teacher":
            raise ValueError(
                f"[verify] checks the teacher's samples; data.source = {self.data.source!r} asks no "
                'teacher: remove [verify] or set data.source = "teacher"'
            )
        samples = self.teacher.samples_per_prompt
        if v.max_draws is not None and v.max_draws < samples:
            raise ValueError(
                f"verify.max_draws = {v.max_draws} is below teacher.samples_per_prompt = {samples}: "
                "max_draws counts every draw of a prompt, the first samples_per_prompt included"
            )
        if (v.max_draws or samples) > samples and self.teacher.temperature == 0:
            raise ValueError(
                "verify.max_draws > samples_per_prompt draws a prompt again, which needs "
                "teacher.temperature > 0 (greedy decoding gives the same answer every time)"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        section = next(
            (
                t
                for t in (field.annotation, *get_args(field.annotation))  # a section, or an optional one
                if isinstance(t, type) and issubclass(t, BaseModel)
            ),
            None,
        )
        if section is not None:
            keys += _known_keys(section, prefix + name + ".")
    return keys


def _edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: a swapped pair of letters ("modle") costs one edit, as typos do.
    Only a tie-break among difflib's candidates: difflib alone ranks "mode" above "model" for "modle"."""
    distance = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            distance[i][j] = min(
                distance[i - 1][j] + 1, distance[i][j - 1] + 1, distance[i - 1][j - 1] + (a[i - 1] != b[j - 1])
            )
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                distance[i][j] = min(distance[i][j], distance[i - 2][j - 2] + 1)
    return distance[-1][-1]


def did_you_mean(key: str, known: list[str]) -> str | None:
    close = difflib.get_close_matches(key, known, n=5, cutoff=0.6)
    return min(close, key=lambda k: (_edit_distance(key, k), abs(len(k) - len(key)), close.index(k))) if close else None


OLD_KEYS = {"train.batch_size": "train.per_device_batch_size"}  # old names still read: a typo of one hints the new


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        hint = did_you_mean(where, _known_keys(RunConfig) + list(OLD_KEYS))
        hint = OLD_KEYS.get(hint, hint)
        return f"unknown config key {where!r}" + (f" (did you mean {hint!r}?)" if hint else "")
    return f"config {where or 'value'}: {first['msg'].removeprefix('Value error, ')}"


def from_dict(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}): save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    return from_dict(data)


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML (None values left out: TOML has no null). It holds the *name* of the key's
    environment variable, never a key."""
    import tomli_w

    return tomli_w.dumps(cfg.model_dump(exclude_none=True))
