"""A real `distillab serve` on 127.0.0.1, for tests and benchmarks: in a thread of this process
(`server_thread`) or as a `python -m distillab serve` subprocess (`server_process`, `server_popen`); and its
/metrics read back (`read_metrics`, `metric_sum`).

    with server_thread("lab:teacher", model_name="tiny") as server:
        server.base_url                 # http://127.0.0.1:PORT/v1
        read_metrics(server.url)["distillab_answers_total"]
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from distillab.serve import create_app

# ----------------------------------------------------------------------------------------------------
# In a thread.


class ServerThread:
    """Runs an app under uvicorn in a background thread on 127.0.0.1 (port 0: a free one).

    with ServerThread(create_app(...)) as server:
        server.base_url  # http://127.0.0.1:PORT/v1
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.app = app
        # A short graceful shutdown: an injected hang must not hold the test that started it.
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self.base_url = self.url + "/v1"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextmanager
def server_thread(model_dir, **app_kwargs):
    """create_app(model_dir, ...) under uvicorn in a thread; yields the ServerThread (.url, .base_url, .app)."""
    with ServerThread(create_app(model_dir, **app_kwargs)) as server:
        yield server


# ----------------------------------------------------------------------------------------------------
# As a subprocess.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
    """The environment for a child python: one torch thread (tests and benchmarks share two cores), offline,
    no tokenizer threads, and this distillab importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


@contextmanager
def server_process(model_dir, *args: str, timeout_s: float = 90.0, cpus: set[int] | None = None):
    """`python -m distillab serve MODEL_DIR --port P ARGS...` in a subprocess (env: `subprocess_env()`), until
    its /health answers; yields its base URL (http://127.0.0.1:P/v1) and terminates it on exit.
    cpus: pin the server to these CPUs (benchmarks keep it off the client's)."""
    with server_popen(model_dir, *args, timeout_s=timeout_s, cpus=cpus) as (url, _):
        yield url


@contextmanager
def server_popen(model_dir, *args: str, timeout_s: float = 90.0, cpus: set[int] | None = None):
    """server_process, yielding (base URL, the server's Popen): for a caller that kills it mid-run."""
    port = free_port()
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    # stderr to a file, not a pipe nobody reads while it runs: a chatty server would block on a full pipe
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distillab", "serve", str(model_dir), "--port", str(port), *args],
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=pin,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, stderr, timeout_s)
            yield url + "/v1", proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(url: str, proc: subprocess.Popen, stderr, timeout_s: float) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            stderr.seek(0)
            raise RuntimeError(f"server exited: {stderr.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            raise RuntimeError("server did not come up")
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------------------
# Its metrics.


class MetricValues(dict):
    """Sample values by 'name{label="value",...}'. A label set has no order: a key finds its sample whatever
    order its labels are written in (they are stored sorted by name, as prometheus_client writes them)."""

    def __getitem__(self, key: str) -> float:
        return super().__getitem__(_sample_key(key))

    def __contains__(self, key) -> bool:
        return super().__contains__(_sample_key(key))

    def get(self, key: str, default=None):
        return super().get(_sample_key(key), default)


def parse_metrics(text: str) -> MetricValues:
    """Prometheus text -> {'name{labels}': value}."""
    return MetricValues(
        {
            _format_sample(sample.name, sample.labels): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
    )


def read_metrics(url: str, api_key: str | None = None) -> MetricValues:
    """A server's /metrics, parsed by parse_metrics; `url` may be the base URL (…/v1)."""
    import httpx

    root = url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return parse_metrics(httpx.get(root + "/metrics", headers=headers, timeout=10).text)


def metric_sum(values: dict[str, float], name: str) -> float:
    """Sum of a counter over all its label sets."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def _format_sample(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{label}="{value}"' for label, value in sorted(labels.items())) + "}"


def _sample_key(key: str) -> str:
    """A key with its labels sorted; a key that is not one sample's name and labels is kept as it is."""
    if "{" not in key:
        return key
    try:
        sample = next(text_string_to_metric_families(f"{key} 0\n")).samples[0]
    except (ValueError, StopIteration, IndexError):
        return key
    return _format_sample(sample.name, sample.labels)
