"""The run directory: every path of a run, named once, and the stamps that say which stage is up to date.

```
runs/<name>/
  run.toml              the resolved config, no secrets
  stages.json           stage name -> fingerprint of what it last finished with
  .locks/<stage>.lock   held by the one process running that stage (<stage>.lock.pid: its pid)
  teacher.sqlite        the teacher request cache (teacher.shard-I-of-N.sqlite for `--shard I/N`)
  teacher.batches/      [teacher] batch = true: the batches in flight, one JSON file each (per shard, as the cache)
  teacher_tokenizer/<model>/  a served teacher's tokenizer, fetched from its endpoint (to read its token ids)
  data/<name>.parquet   datasets: train, replay, dev (or their shards in data/<name>/)
  data/rejected.parquet the task samples [verify] rejected (for inspection, never trained on)
  data/<stem>_summary.json  generate_summary.json, replay_summary.json
  data/decontamination.json what [decontaminate] checked, dropped or flagged in the task prompts
  data/sampled_prompts.json general prompts the base wrote itself (retain)
  checkpoints/          resumable training state (fingerprint.json: the config and data it was made from)
  checkpoints.previous/ the checkpoints of a run whose config or data changed since, set aside
  student/              the trained student (save_pretrained, train_summary.json, lineage, model card)
  retain.json           the retain rule's candidates and choice
  eval/<label>.json     scores per model; eval/lm_eval_<label>.json lm-eval's
  throughput.json       the student's measured serving speed
  ledger.json, report.html, summary.json
  export/<format>/      `distillab export`
  plan/<teacher>/pilot_<share>/  `distillab plan`'s pilots (each a run directory); plan.json its projection
<runs_dir>/registry.sqlite  the leaderboard of every run beside this one
```
Nothing else in distillab joins a run-directory path from strings: it asks a RunDir.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distillab.errors import UserError
from distillab.files import check_creatable, read_json, write_json

WHOLE = (0, 1)  # shard I of N: the whole prompt set


@dataclass(frozen=True)
class RunDir:
    root: Path

    # the run's own record of itself
    @property
    def config(self) -> Path:
        return self.root / "run.toml"

    @property
    def stamps_file(self) -> Path:
        return self.root / "stages.json"

    # generate
    def cache(self, shard: tuple[int, int] = WHOLE) -> Path:
        name = "teacher.sqlite" if shard == WHOLE else f"teacher.shard-{shard[0]}-of-{shard[1]}.sqlite"
        return self.root / name

    def caches(self) -> dict[Path, int]:
        """Every request cache of the run that exists -> the N of the split that wrote it (1: a whole run). A process
        writes only its own (cache(shard)) and reads the other splits' (shards.RunCaches): no answer is paid twice."""
        found = {self.cache(): 1} if self.cache().is_file() else {}
        for path in sorted(self.root.glob("teacher.shard-*-of-*.sqlite")):
            n = path.name[: -len(".sqlite")].rpartition("-of-")[2]
            if n.isdigit():
                found[path] = int(n)
        return found

    def batches(self, shard: tuple[int, int] = WHOLE) -> Path:
        """teacher.batches/ beside the cache (per shard, as it is): the Batch API's batches in flight, one JSON file
        each (distillab.teachers.batch), so a rerun polls them instead of submitting their requests again."""
        return self.cache(shard).with_suffix(".batches")

    def teacher_tokenizer(self, model: str) -> Path:
        """teacher_tokenizer/<model>/: a served teacher's tokenizer files as its endpoint gave them (generate's
        preflight), kept so that a rerun reads its token ids without asking the endpoint again."""
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
        return self.root / "teacher_tokenizer" / ("_" + name if name.startswith(".") else name)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def dataset(self, name: str = "train") -> Path:
        """data/<name>.parquet: train (the teacher's answers), replay (retain's general answers), dev."""
        return self.data / f"{name}.parquet"

    @property
    def rejected(self) -> Path:
        """data/rejected.parquet: the task samples [verify] rejected, kept for inspection, never trained on (its
        shards in data/rejected/ while generate runs, as a dataset's)."""
        return self.dataset("rejected")

    def generate_summary(self, name: str = "train") -> Path:
        return self.data / f"{'generate' if name == 'train' else name}_summary.json"

    @property
    def decontamination(self) -> Path:
        """data/decontamination.json: the task prompts checked against the scored suites, what was dropped or
        flagged, and duplicates collapsed (distillab.decontaminate)."""
        return self.data / "decontamination.json"

    @property
    def sampled_prompts(self) -> Path:
        return self.data / "sampled_prompts.json"

    # train
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def checkpoints_fingerprint(self) -> Path:
        """checkpoints/fingerprint.json: the train stage's fingerprint the checkpoints were made under; a rerun
        resumes them only under the same one."""
        return self.checkpoints / "fingerprint.json"

    @property
    def checkpoints_previous(self) -> Path:
        """checkpoints.previous/: the checkpoints of a train run whose config or data changed since, set aside."""
        return self.root / "checkpoints.previous"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def student_config(self) -> Path:
        """student/config.json: save_pretrained's, there once a student is saved whole."""
        return self.student / "config.json"

    def student_model_files(self) -> list[Path]:
        """The files of student/ a model load reads: all but the records the run keeps beside the model
        (train_summary.json, retain.json, lineage.json and its README.md model card), which change without it."""
        records = {self.train_summary.name, self.student_retain_record.name, "lineage.json", "README.md"}
        if not self.student.is_dir():
            return []
        return sorted(p for p in self.student.iterdir() if p.is_file() and p.name not in records)

    @property
    def train_summary(self) -> Path:
        return self.student / "train_summary.json"

    @property
    def retain_record(self) -> Path:
        return self.root / "retain.json"

    @property
    def student_retain_record(self) -> Path:
        """student/retain.json: the selection record beside the weights it chose (a retrained student/ has none)."""
        return self.student / "retain.json"

    @property
    def student_weights(self) -> Path:
        """student/model.safetensors, or its index when save_pretrained split the weights into shards."""
        index = self.student / "model.safetensors.index.json"
        return index if index.is_file() else self.student / "model.safetensors"

    # evaluate
    @property
    def evals(self) -> Path:
        return self.root / "eval"

    def eval(self, label: str) -> Path:
        return self.evals / f"{label}.json"

    def lm_eval(self, label: str) -> Path:
        return self.evals / f"lm_eval_{label}.json"

    def lm_eval_files(self) -> list[Path]:
        return sorted(self.evals.glob("lm_eval_*.json"))

    def eval_files(self) -> list[Path]:
        """Every eval/<label>.json of the run, lm-eval's own files aside."""
        return sorted(p for p in self.evals.glob("*.json") if not p.name.startswith("lm_eval_"))

    # report
    @property
    def throughput(self) -> Path:
        return self.root / "throughput.json"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def export(self, fmt: str) -> Path:
        return self.root / "export" / fmt

    # plan (distillab.plan): pilots on nested subsets of the train prompts, the projection of the full run
    @property
    def plan(self) -> Path:
        """plan/: the pilots, each a run directory of its own (plan/<teacher>/pilot_<share>/), and what the plan
        scores once for all of them."""
        return self.root / "plan"

    def pilot(self, teacher: str, fraction: float) -> Path:
        """plan/<teacher>/pilot_<share>/: the pilot of one candidate teacher on that share of the train prompts."""
        return self.plan / teacher / f"pilot_{fraction:g}"

    @property
    def dev_eval(self) -> Path:
        """dev_eval.json: a pilot's student scored on the dev split, every item's score kept (for the bootstrap)."""
        return self.root / "dev_eval.json"

    @property
    def plan_base_dev(self) -> Path:
        """plan/base_dev_eval.json: the base student on the dev split, what a pilot's general change is against."""
        return self.plan / "base_dev_eval.json"

    @property
    def plan_teacher_task(self) -> Path:
        """plan/teacher_task.json: the teacher's test task score, the quality floor's share is of (when the run has
        no eval/teacher.json yet)."""
        return self.plan / "teacher_task.json"

    @property
    def plan_throughput(self) -> Path:
        """plan/throughput.json: a pilot student's serving speed, for the projected break-even."""
        return self.plan / "throughput.json"

    @property
    def plan_record(self) -> Path:
        """plan.json: the pilots, the fitted curves and the projection at each size (distillab.plan_curve)."""
        return self.root / "plan.json"

    @property
    def registry(self) -> Path:
        """The leaderboard shared by every run in the same runs directory."""
        return self.root.parent / "registry.sqlite"

    # checks, locks and stamps
    def stage_lock(self, stage: str, shard: tuple[int, int] = WHOLE, rank: int = 0) -> Path:
        """.locks/<stage>.lock, held by the one process running `stage` on this run (stage.run_stage): per shard
        of `generate --shard I/N` (.shard-I-of-N) and per process of a torchrun job (.rank-R, rank 0 as a lone
        process), so the shards and ranks of one job run side by side and a second job is refused."""
        name = stage.replace(":", "-")
        name += "" if shard == WHOLE else f".shard-{shard[0]}-of-{shard[1]}"
        name += f".rank-{rank}" if rank else ""
        return self.root / ".locks" / f"{name}.lock"

    def split_locks(self, stage: str) -> dict[Path, int]:
        """The lock files of `stage` that exist (every shard's, every rank's: stage_lock) -> the N of the split that
        holds them (1: a whole run)."""
        name = stage.replace(":", "-")
        found = {}
        for path in (self.root / ".locks").glob(f"{name}*.lock"):
            rest = path.name[len(name) : -len(".lock")].split(".rank-")[0]
            if rest == "":
                found[path] = 1
            elif rest.startswith(".shard-") and rest.rpartition("-of-")[2].isdigit():
                found[path] = int(rest.rpartition("-of-")[2])
        return found

    def check_creatable(self) -> None:
        """Refuse, before anything is written, a run directory that could not be created or written."""
        check_creatable(self.root, "run directory", "choose another runs_dir")

    def stamps(self) -> dict:
        """stage name -> fingerprint; a corrupt stages.json is a one-line error before a stage does any work."""
        if not self.stamps_file.is_file():
            return {}
        stamps = read_json(
            self.stamps_file,
            "delete it and rerun (the stages run again; cached teacher answers are kept, so no request is paid twice)",
        )
        if not isinstance(stamps, dict):
            raise UserError(
                f"{self.stamps_file} is corrupt: delete it and rerun (the stages run again; cached "
                "teacher answers are kept, so no request is paid twice)"
            )
        return stamps

    def stamp(self, stage: str, fingerprint: str) -> None:
        write_json(self.stamps_file, self.stamps() | {stage: fingerprint})
