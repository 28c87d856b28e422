"""Shards: which prompts a process answers, and the files of a dataset it writes a chunk at a time.

`generate --shard I/N` takes the prompts whose hash (sha256 of "shard|" + prompt) is I mod N, on every machine
alike. A dataset's shards live in data/<name>/ (dataset.shard_dir, where dataset.read_dataset finds them):
part-<I>-of-<N>-<chunk>-<digest>.parquet, one per chunk of rows, the digest covering what made the chunk (its
request keys, the student). A chunk with a failed request is written with `-partial` in its name; a rerun
replaces it. Process I of N writes only its own part-I-of-N files and its own summary-I-of-N.json beside them;
data/<stem>_summary.json sums every shard's summary so far. A whole run (shard 0 of 1) merges its parts into
data/<name>.parquet at the end and removes them, so single-file readers keep working.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from distillab.dataset import SHARD_GLOB, shard_dir, write_dataset, write_merged
from distillab.errors import UserError
from distillab.files import lock, read_json, write_json
from distillab.rundir import WHOLE, RunDir


def parse_shard(text: str | None) -> tuple[int, int]:
    """ "I/N" (0 <= I < N) -> (I, N); None -> (0, 1)."""
    if text is None:
        return WHOLE
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: give I/N, e.g. 0/4 (shard I of N, counted from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text!r}: need 0 <= I < N (shard I of N, counted from 0)")
    return i, n


def in_shard(prompt: str, shard: tuple[int, int]) -> bool:
    """Whether the prompt belongs to shard I of N: a stable hash, the same on every machine."""
    i, n = shard
    return n == 1 or int.from_bytes(hashlib.sha256(("shard|" + prompt).encode()).digest()[:8], "big") % n == i


class ShardFiles:
    """The shard files of one dataset (data/<name>/) that one process, shard I of N, writes."""

    def __init__(self, run: RunDir, name: str, shard: tuple[int, int]):
        self.run, self.name = run, name
        self.dataset = run.dataset(name)
        self.dir = shard_dir(self.dataset)
        self.whole = shard == WHOLE
        self.tag = f"{shard[0]:05d}-of-{shard[1]:05d}"
        self.n = shard[1]

    def part(self, chunk: int, digest: str, complete: bool) -> Path:
        return self.dir / f"part-{self.tag}-{chunk:06d}-{digest}{'' if complete else '-partial'}.parquet"

    @property
    def summary(self) -> Path:
        """What this process counted: data/<stem>_summary.json for a whole run, else its own summary-I-of-N.json."""
        return self.run.generate_summary(self.name) if self.whole else self.dir / f"summary-{self.tag}.json"

    def check_layout(self) -> None:
        """Shards of a different split (another N) in the same directory would mix two datasets: refused."""
        if not self.dir.is_dir():
            return
        other = sorted({p.name.split("-")[3] for p in self.dir.glob(SHARD_GLOB)} - {f"{self.n:05d}"})
        if other:
            raise UserError(
                f"{self.dir} holds shards of a {int(other[0])}-way split (--shard I/{int(other[0])}): "
                f"rerun with that N, or move {self.dir} away (cached answers are kept)"
            )

    def remove_stale(self, digests: list[str]) -> None:
        """Drop this process's parts that the current prompts and config no longer make, and (shard runs) a
        merged file of an earlier whole run: it would shadow the shards."""
        if not self.whole:
            self.dataset.unlink(missing_ok=True)
        keep = {self.part(i, digest, complete).name for i, digest in enumerate(digests) for complete in (True, False)}
        for path in self._own_parts():
            if path.name not in keep:
                path.unlink()

    def done(self, chunk: int, digest: str) -> bool:
        return self.part(chunk, digest, True).is_file()

    def write(self, chunk: int, digest: str, rows: list[dict], complete: bool) -> None:
        if rows:  # a chunk whose every request failed is left unwritten: a rerun asks again
            write_dataset(self.part(chunk, digest, complete), rows)
        self.part(chunk, digest, not complete).unlink(missing_ok=True)

    def merge(self) -> None:
        """A whole run's parts -> data/<name>.parquet (a part at a time), then the parts go."""
        files = self._own_parts()
        if not files:
            return
        write_merged(self.dataset, files)
        for path in files:
            path.unlink()
        try:
            self.dir.rmdir()
        except OSError:
            pass  # something else lives there: left alone

    def combine_summaries(self) -> None:
        """data/<stem>_summary.json = the sum of every shard's summary so far (under a lock: shards finish
        together)."""
        with lock(self.dir / ".summary.lock"):
            shards = {
                path.name[len("summary-") : -len(".json")]: read_json(path)
                for path in sorted(self.dir.glob(f"summary-*-of-{self.n:05d}.json"))
            }
            total = {
                "rows": 0,
                "failed": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "usd": 0.0,
                "answer_seconds": 0.0,
                "endpoints": {},
                "failures": [],
            }
            for summary in shards.values():
                for k in ("rows", "failed", "prompt_tokens", "completion_tokens"):
                    total[k] += summary[k]
                total["usd"] = None if total["usd"] is None or summary["usd"] is None else total["usd"] + summary["usd"]
                # shards run side by side: the slowest one's wall time
                total["answer_seconds"] = max(total["answer_seconds"], summary["answer_seconds"])
                for url, stats in summary.get("endpoints", {}).items():
                    into = total["endpoints"].setdefault(url, dict.fromkeys(stats, 0))
                    for k, v in stats.items():
                        into[k] = into.get(k, 0) + v
                total["failures"] = (total["failures"] + summary["failures"])[:20]
                total["reasoning_tokens"] = total.get("reasoning_tokens", 0) + summary.get("reasoning_tokens", 0)
            last = next(iter(shards.values()))
            total.update(
                teacher=last["teacher"],
                priced=total["usd"] is not None,
                pricing=last["pricing"],
                shards={tag: summary["rows"] for tag, summary in shards.items()},
                of=self.n,
            )
            if last.get("decontamination"):  # the whole prompt set's, checked alike by every shard
                total["decontamination"] = last["decontamination"]
            checked = [summary["verification"] for summary in shards.values() if summary.get("verification")]
            if checked:  # [verify]: the shards' counts summed
                from distillab.verify import combine

                total["verification"] = combine(checked)
            write_json(self.run.generate_summary(self.name), total)

    def _own_parts(self) -> list[Path]:
        return sorted(self.dir.glob(f"part-{self.tag}-*.parquet")) if self.dir.is_dir() else []
