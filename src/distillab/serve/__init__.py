"""An OpenAI-compatible server for any local HF causal LM: to serve a student, and to be a real teacher
endpoint in tests and benchmarks. `distillab serve MODEL` runs it; `create_app` builds the app.

    GET  /v1/models
    POST /v1/completions        prompt: str | [str] | [int] | [[int]]; logprobs (top-k, legacy format); echo
    POST /v1/chat/completions   messages; logprobs + top_logprobs (chat format)
    POST /v1/files, POST /v1/batches, GET /v1/batches/{id}, GET /v1/files/{id}/content, ...
                                the OpenAI Batch API: each JSONL line answered like the endpoints above (`batches`)
    GET  /v1/tokenizer          the model's tokenizer files (GET /v1/tokenizer/{name}: one), to read returned ids
    GET  /metrics               Prometheus text
    GET  /health                {"status": "ok"}, without auth; touches neither the model, its queue nor a request

Concurrent requests are batched (`engine`): handlers put jobs on a queue, and one batching loop collects them
for a few milliseconds, groups the ones with compatible sampling parameters and runs one `sampling.generate`
call per group in a worker thread. The handlers' own CPU work (parsing bodies, tokenizing, building and
encoding responses) runs in a second thread, so the event loop only moves bytes: /health and new requests
are answered while the model and a large response are busy.

Limits (`ServeLimits`), each answered with OpenAI's JSON error naming the limit:
- a body over `max_request_bytes` (1 MiB) is a 413; a body that is not a JSON object, is nested deeper than
  `max_json_depth` (64), or holds text that is not valid Unicode is a 400;
- `max_tokens` at most `limits.max_tokens` (1024), and prompt + max_tokens within the model's context;
  at most `max_prompts` (256) prompts in one completions request;
- work: a request may fill at most `max_request_work` (262,144) token slots, counted as the tokens it may
  return (prompts x max_tokens, plus the prompts when echoed) x (1 + top logprobs asked). Compute and
  response size both follow it: 256 prompts x 240 tokens with top-20 logprobs is 1,290,240 and is refused;
- completions without max_tokens get 16 (OpenAI's default); a chat request without one gets the rest of
  the context (the model's positions - the prompt), at most `limits.max_tokens` and what the work limit
  leaves for its top logprobs.

Logprobs cover every completion token including the end-of-sequence token when the model stopped (the
student learns to stop from it, as with the local teacher); usage.completion_tokens counts it too.
vLLM's `return_tokens_as_token_ids` makes every token string "token_id:<id>", so clients get exact ids.

An `Idempotency-Key` header makes a repeated request (a client that died and resumed, a retry after a
timeout) get the stored answer, or join the one being computed, instead of running the model again.

The modules, in the order a request meets them:
    app        create_app (routes -> Server) and serve (uvicorn)
    server     Server: auth, limits, validation, idempotency, batching groups, response shapes; needs no HTTP
               and no model (its unit tests give it a fake engine)
    faults     FaultConfig: seeded injected 429s, 500s, hangs and truncated bodies, for tests and benchmarks
    batches    BatchService: files and batches in memory, each line through the Server in the background
    tokenizer_files  the model's tokenizer files, for clients that read the ids it returns
    protocol   OpenAI's wire format: request schemas, the error object, logprobs and usage shapes
    engine     Engine: the batching loop and the model thread; score_prompts for echo
    metrics    Metrics: the counters, in a prometheus_client registry per app
`distillab.testing` runs a real server on 127.0.0.1 for tests and benchmarks.
"""

from distillab.serve.app import create_app, serve
from distillab.serve.engine import Engine, score_prompts
from distillab.serve.faults import FaultConfig
from distillab.serve.metrics import Metrics
from distillab.serve.protocol import APIError, ChatRequest, CompletionRequest
from distillab.serve.server import ServeLimits, Server, chat_prompt

__all__ = [
    "APIError",
    "ChatRequest",
    "CompletionRequest",
    "Engine",
    "FaultConfig",
    "Metrics",
    "ServeLimits",
    "Server",
    "chat_prompt",
    "create_app",
    "score_prompts",
    "serve",
]
