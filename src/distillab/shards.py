"""Shards: which prompts a process answers, and the files of a dataset it writes a chunk at a time.

`generate --shard I/N` takes the prompts whose hash (sha256 of "shard|" + prompt) is I mod N, on every machine
alike. A dataset's shards live in data/<name>/ (dataset.shard_dir, where dataset.read_dataset finds them):
part-<I>-of-<N>-<chunk>-<digest>.parquet, one per chunk of rows, the digest covering what made the chunk (its
request keys, the student). A chunk with a failed request is written with `-partial` in its name; a rerun
replaces it. Process I of N writes only its own part-I-of-N files and its own summary-I-of-N.json beside them;
data/<stem>_summary.json sums every shard's summary so far. A whole run (shard 0 of 1) merges its parts into
data/<name>.parquet at the end and removes them, so single-file readers keep working.

Runs of one dataset share what they hold, whatever their split:
- answers: each process writes its own request cache (RunDir.cache(shard): SQLite's WAL is not shared over a
  network file system) and reads the caches of the run's other splits (RunCaches), so a shard run after a whole run,
  a whole run after shards, or a split after another asks the teacher only for what no cache holds;
- rows: no run removes another's. A whole run's data/<name>.parquet is read by a shard run (generate.py), never
  deleted; a directory of another split's parts is refused (check_layout);
- time: one split at a time runs a stage (refuse_other_splits): a whole run and a shard run side by side would
  both pay for the shard's prompts; the shards of one split run side by side (their prompts are disjoint).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from distillab.cache import RequestCache
from distillab.dataset import SHARD_GLOB, merged_parts, shard_dir, write_dataset, write_merged
from distillab.errors import UserError
from distillab.files import hold, lock, read_json, set_aside_if_corrupt, write_json
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
        self.merged_current = False  # a whole run: data/<name>.parquet holds exactly the parts it would write

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
        """Drop this process's parts that the current prompts and config no longer make (only its own: another
        process's rows are never removed). A whole run whose merged file holds exactly the parts the `digests` make,
        all complete, writes nothing (done): a rerun after a lost summary or stamp keeps the file as it is."""
        expected = [self.part(i, digest, True).name for i, digest in enumerate(digests)]
        self.merged_current = self.whole and merged_parts(self.dataset) == expected
        keep = {self.part(i, digest, complete).name for i, digest in enumerate(digests) for complete in (True, False)}
        for path in self._own_parts():
            if path.name not in keep:
                path.unlink()

    def done(self, chunk: int, digest: str) -> bool:
        return self.merged_current or self.part(chunk, digest, True).is_file()

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

    def combine_summaries(self, log=print) -> None:
        """data/<stem>_summary.json = the sum of every shard's summary so far (under a lock: shards finish
        together). Another shard's corrupt summary is set aside and left out, saying so: that shard's rerun writes
        it again."""
        with lock(self.dir / ".summary.lock"):
            paths = sorted(self.dir.glob(f"summary-*-of-{self.n:05d}.json"))
            for path in paths:
                if set_aside_if_corrupt(path):
                    log(f"generate: {path} was corrupt: set aside and left out of the sum (rerun that shard)")
            shards = {path.name[len("summary-") : -len(".json")]: read_json(path) for path in paths if path.is_file()}
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


def refuse_other_splits(run: RunDir, stage: str, shard: tuple[int, int]) -> None:
    """One split of a stage at a time: while a process of another split (a whole run beside `--shard I/N`, or
    another N) holds the stage, a one-line error naming its pid. The caller holds its own lock (stage.run_stage)
    before it looks, so of two that start together at least one sees the other."""
    for path, n in run.split_locks(stage).items():
        if n == shard[1]:
            continue
        kind = "a whole run" if n == 1 else f"a {n}-way split (--shard I/{n})"

        def busy(pid: str, kind: str = kind) -> str:
            return (
                f"{kind} of {stage} is running in {run.root} (pid {pid}): wait for it to finish, then rerun "
                "(what it asked is then read from its cache)"
            )

        with hold(path, busy):  # free: released at once
            pass


class RunCaches:
    """The request cache this process writes (RunDir.cache(shard)), read together with the caches of the run's other
    splits (RunDir.caches: a whole run's, another N's shards): an answer any of them holds is never asked again.
    Those are idle (refuse_other_splits), so reading them is safe even over a network file system; the caches of this
    split's other shards, written side by side, are not opened (their prompts are not this shard's anyway). Only the
    own cache is written (put, put_failure) and its failures are this process's. create=False (planning): an own
    cache that does not exist is not made."""

    def __init__(self, run: RunDir, shard: tuple[int, int], create: bool = True):
        own = run.cache(shard)
        self.own = RequestCache(own) if create or own.exists() else None
        self.others = [RequestCache(path) for path, n in run.caches().items() if n != shard[1]]
        self.all = [c for c in (self.own, *self.others) if c is not None]

    def get(self, key: str, raw_topk: bool = False) -> dict | None:
        for cache in self.all:
            found = cache.get(key, raw_topk=raw_topk)
            if found is not None:
                return found
        return None

    def cached_keys(self, keys: list[str]) -> set[str]:
        held: set[str] = set()
        for cache in self.all:
            held |= cache.cached_keys([k for k in keys if k not in held])
        return held

    def usage(self, keys: list[str]) -> dict:
        return self._summed("usage", keys)

    def billing(self, keys: list[str]) -> dict:
        return self._summed("billing", keys)

    def _summed(self, method: str, keys: list[str]) -> dict:
        """A cache method that sums over keys (usage, billing), each key counted once, in the first cache that
        holds it (there is at least one cache)."""
        left, parts = list(keys), []
        for cache in self.all:
            held = cache.cached_keys(left)
            parts.append(getattr(cache, method)([k for k in left if k in held]))
            left = [k for k in left if k not in held]
        return {k: sum(part[k] for part in parts) for k in parts[0]}

    def put(self, *args, **kwargs) -> None:
        self.own.put(*args, **kwargs)

    def put_failure(self, *args, **kwargs) -> None:
        self.own.put_failure(*args, **kwargs)

    def failures(self, keys: list[str] | None = None) -> list[dict]:
        return self.own.failures(keys) if self.own else []

    def close(self) -> None:
        for cache in self.all:
            cache.close()
