"""A policy served by any OpenAI-compatible completions server: `OpenAIPolicy`.

It talks to `POST {base}/v1/completions` (raw prompt continuation: the step format is not a
chat), with the Python standard library only (`http.client` + a thread pool): no client
package to install, and it runs beside any torch/vLLM stack.

How a `generate` call runs. Every `GenRequest` becomes one HTTP request with `n` samples
(or `n` requests of one sample, see "Server kinds"; a greedy request, temperature 0, is
asked for one sample, which stands for all n); up to `max_concurrency` requests are in
flight at once, on keep-alive connections (one per worker thread). The server batches what
arrives concurrently (vLLM and llama.cpp both batch continuously), so the client needs no
batching of its own.

Failures. A connection error, a timeout (`timeout_s`, per socket operation), HTTP 5xx,
408 or 429 is retried up to `max_retries` times, sleeping `backoff_s * 2**k` between tries;
after the last try an `RstarError` names the URL and the cause ("is the server running?").
Any other HTTP 4xx (a bad parameter, a prompt longer than the context) is raised at once as
an `RstarError` carrying the server's own message: retrying cannot fix it.

Server kinds (`server="auto"` asks `GET /v1/models` once and reads `owned_by`):
- "vllm": one request per GenRequest with `n`. The server strips the stop string from the
  text but names it in each choice's `stop_reason`, so `Completion.text` gets it back
  exactly (`stop_reason` null = end of sequence). vLLM's sampling extras are pinned to
  neutral values (top_k, min_p, repetition_penalty), because vLLM's server otherwise applies
  the model's generation_config.json defaults (Qwen ships top_k and repetition_penalty),
  and the other backends sample with temperature and top_p only.
- "llamacpp" (llama.cpp's `llama-server`, also as embedded by xllamacpp): its
  OpenAI-compatible response says neither which stop string matched nor, for n > 1, the
  right token count; with `"verbose": true` and n = 1 it returns both (`stopping_word`,
  `stop_type`, `tokens_predicted`). So each sample is its own request with seed
  `seed + i`, which is exactly what llama.cpp (and vLLM) do for sample i of a seeded n > 1
  request: the samples are the same either way. llama.cpp's own defaults (top_k 40,
  min_p 0.05, top_p 0.95) are overridden so that it samples from the same distribution as
  the other backends, with temperature applied before top_p as transformers does.
- "generic" (anything else, e.g. OpenAI itself): standard fields only. If a server returns
  fewer choices than `n` (some ignore `n`), the missing samples are requested one by one
  with seeds `seed + i`, and later requests are split from the start.

Restoring the stop string when the server does not name it ("generic" only). OpenAI's
`finish_reason` is "stop" both for a stop string and for the end-of-sequence token, and the
matched string is stripped. The rule (`infer_stop`), built on the step format of
`rstar.steps`, in order:
1. the request has one stop string: that one;
2. the text contains `<answer>`: `<end_of_answer>`;
3. the text contains `<output>` and `<end_of_output>` is a stop string: `<end_of_output>`;
4. the last code line (not blank, not a comment) starts with `print(`: `<end_of_code>`
   (in the authors' data every final code step ends with its print and no
   `<end_of_step>` step does, but a model may print in a middle step);
5. otherwise `<end_of_step>` (or the first stop string if that one is not a stop string).
An end-of-sequence token is thus taken for a stop string. Every inferred stop is counted
in `inferred_stops` and logged once; use a server that names the stop (vLLM, llama.cpp)
when the step kind matters, as it does in the search.

Seeds: a request's seed goes to the server as is (sample i of a split request gets
`seed + i`); vLLM and llama.cpp (uint32 seeds) sample each request from its own seeded
generator, other servers do as they document. The same seed gives the same text as long as
the server computes the same logits: under concurrent load both batch requests together,
and kernels that round differently for other batch sizes (or a prompt cache filled in
another batch) can flip a token at a near-tie. On llama.cpp's CPU server this was seen once
at temperature 2 with 4 requests in flight; one request at a time was reproducible.
Requests without a seed are sampled with the server's randomness.

Counters for throughput figures: `tokens_generated` (from the servers' `usage`; for n > 1
choices of one response the total is exact and is shared among the choices in proportion to
their text length), `calls`, `http_requests`, `retries`, `inferred_stops`, `peak_inflight`.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from rstar import RstarError, steps
from rstar.models.base import Completion, GenRequest

log = logging.getLogger(__name__)

SERVER_KINDS = ("auto", "vllm", "llamacpp", "generic")

# Errors of a stale keep-alive connection (the server closed it while idle): the request
# never reached the server, so it is re-sent once at once on a fresh connection.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
_RETRY_STATUS = {408, 429}


def api_root(base_url: str) -> tuple[str, str | None]:
    """(`.../v1` root, model or None) of a server URL.

    Accepts "http://host:port", "http://host:port/v1" or a longer prefix; a URL fragment
    names the model ("http://host:8000/v1#Qwen2.5-Math-7B"), so that one string (the CLI's
    `--policy`) can carry both.
    """
    parts = urllib.parse.urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RstarError(f"{base_url!r}: expected an http(s):// URL of an OpenAI-compatible server")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    root = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    return root, (urllib.parse.unquote(parts.fragment) or None)


def infer_stop(text: str, stops: Sequence[str]) -> str | None:
    """The stop string that most likely ended `text`, for servers that strip it without
    saying which one it was (the rule is in the module docstring). None if `stops` is empty."""
    if not stops:
        return None
    if len(stops) == 1:
        return stops[0]
    if steps.END_OF_ANSWER in stops and steps.ANSWER_OPEN in text:
        return steps.END_OF_ANSWER
    if steps.END_OF_OUTPUT in stops and steps.OUTPUT_OPEN in text:
        return steps.END_OF_OUTPUT
    if steps.END_OF_CODE in stops and _ends_with_print(text):
        return steps.END_OF_CODE
    return steps.END_OF_STEP if steps.END_OF_STEP in stops else stops[0]


def _ends_with_print(text: str) -> bool:
    code = [ln.strip() for ln in steps.parse_step(text).code.splitlines()]
    code = [ln for ln in code if ln and not ln.startswith("#")]
    return bool(code) and code[-1].startswith("print(")


def share_tokens(total: int, texts: Sequence[str]) -> list[int]:
    """Split `total` tokens among `texts` in proportion to their length; the parts sum to
    `total` (a response's `usage` counts all its choices together)."""
    if not texts:
        return []
    weights = [len(t) + 1 for t in texts]  # +1: an empty text still cost a token (its stop)
    s = sum(weights)
    parts = [total * w // s for w in weights]
    # Largest remainders get the tokens that the rounding down left over.
    for i in sorted(range(len(texts)), key=lambda i: -(total * weights[i] % s))[: total - sum(parts)]:
        parts[i] += 1
    return parts


@dataclass
class _Job:
    """One HTTP request: samples [first, first + n) of request `ri`."""

    ri: int
    first: int
    n: int
    seed: int | None


class OpenAIPolicy:
    """A `Policy` (see `rstar.models.base`) served by an OpenAI-compatible completions server.

    Args:
        base_url: the server, e.g. "http://127.0.0.1:8000" or ".../v1" (a "#name"
            fragment names the model).
        model: the served model name; default: the URL's fragment, else the first model
            of `GET /v1/models`.
        api_key: sent as a bearer token; default: the OPENAI_API_KEY environment variable.
        max_concurrency: most requests in flight at once (across concurrent `generate`
            calls too: they share one pool of worker threads).
        timeout_s: socket timeout of connecting and of each read.
        max_retries: retries after the first try, for connection errors, timeouts, 5xx.
        backoff_s: sleep before retry k (0-based) is `backoff_s * 2**k`.
        server: "auto" (ask `/v1/models`), "vllm", "llamacpp" or "generic" (module doc).

    The module docstring says how stop strings, seeds, errors and counters work.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        *,
        max_concurrency: int = 16,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        server: str = "auto",
    ) -> None:
        if server not in SERVER_KINDS:
            raise RstarError(f"server={server!r}: expected one of {', '.join(SERVER_KINDS)}")
        if max_concurrency < 1:
            raise RstarError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.root, fragment_model = api_root(base_url)
        parts = urllib.parse.urlsplit(self.root)
        self._https = parts.scheme == "https"
        self._netloc = parts.netloc
        self._path = parts.path
        self.model = model or fragment_model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.kind: str | None = None if server == "auto" else server
        self._split_n = self.kind == "llamacpp"  # one sample per request (module doc)
        self._probe_lock = threading.Lock()
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._inflight = 0
        self._pool: ThreadPoolExecutor | None = None
        self._warned_inference = False
        self.reset_counters()

    def reset_counters(self) -> None:
        self.tokens_generated = 0
        self.calls = 0
        self.http_requests = 0
        self.retries = 0
        self.inferred_stops = 0
        self.peak_inflight = 0

    # --- public --------------------------------------------------------------------------

    def server_info(self) -> dict[str, Any]:
        """Ask the server what it serves (once): sets `kind` ("auto") and `model` (None)."""
        with self._probe_lock:
            if self.kind is not None and self.model is not None:
                return {"kind": self.kind, "model": self.model}
            try:
                data = self._executor().submit(self._call, "GET", "/models").result()
            except RstarError as e:
                if self.model is None or "HTTP 404" not in str(e):
                    raise
                data = {}  # a server without /v1/models: the model is known, the kind is not
            models = data.get("data") or []
            if self.model is None:
                if not models or "id" not in models[0]:
                    raise RstarError(f"{self.root}/models lists no model: pass model= (or URL#model)")
                self.model = str(models[0]["id"])
            if self.kind is None:
                owner = str((models[0] if models else {}).get("owned_by", "")).lower()
                self.kind = {"vllm": "vllm", "llamacpp": "llamacpp"}.get(owner, "generic")
                self._split_n = self.kind == "llamacpp"
            return {"kind": self.kind, "model": self.model}

    def generate(self, requests: list[GenRequest]) -> list[list[Completion]]:
        """For each request, `request.n` completions, in request order (see the module doc)."""
        self.calls += 1
        if not requests:
            return []
        self.server_info()
        results: list[list[Completion | None]] = [[None] * r.n for r in requests]
        jobs: list[_Job] = []
        greedy: list[int] = []  # requests whose one sample stands for all n
        for ri, r in enumerate(requests):
            if r.max_new_tokens <= 0 or r.n <= 0:
                results[ri] = [Completion(text="", stop_reason="length", n_tokens=0) for _ in range(r.n)]
            elif r.temperature <= 0 and r.n > 1:
                greedy.append(ri)
                jobs.append(_Job(ri, 0, 1, r.seed))
            elif self._split_n or r.n == 1:
                jobs += [_Job(ri, i, 1, _seed(r.seed, i)) for i in range(r.n)]
            else:
                jobs.append(_Job(ri, 0, r.n, r.seed))
        while jobs:
            short: list[_Job] = []
            for job, outs in zip(jobs, self._run(requests, jobs)):
                results[job.ri][job.first : job.first + len(outs)] = outs
                if len(outs) < job.n:  # the server ignored n: ask for the rest one by one
                    if not self._split_n:
                        log.warning(
                            "%s returned %d of n=%d choices; sampling one per request",
                            self.root,
                            len(outs),
                            job.n,
                        )
                        self._split_n = True
                    base = requests[job.ri].seed
                    short += [
                        _Job(job.ri, i, 1, _seed(base, i))
                        for i in range(job.first + len(outs), job.first + job.n)
                    ]
            jobs = short
        for ri in greedy:
            c = results[ri][0]
            assert c is not None
            results[ri] = [Completion(c.text, c.stop_reason, c.n_tokens) for _ in range(requests[ri].n)]
        return results  # type: ignore[return-value]  # every slot is filled above

    def close(self) -> None:
        """Stop the worker threads and close the connections."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            c.close()

    def __enter__(self) -> OpenAIPolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests ------------------------------------------------------------------------

    def _run(self, requests: list[GenRequest], jobs: list[_Job]) -> list[list[Completion]]:
        """Run `jobs` on the worker pool; the first failure cancels what has not started."""
        pool = self._executor()
        futures: list[Future[list[Completion]]] = [
            pool.submit(self._complete, requests[j.ri], j) for j in jobs
        ]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                for p in pending:
                    p.cancel()
                wait(pending)
                raise f.exception()  # type: ignore[misc]
        return [f.result() for f in futures]

    def _executor(self) -> ThreadPoolExecutor:
        """The worker pool: every HTTP request runs on it, so that at most `max_concurrency`
        requests (and keep-alive connections) exist at once."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="rstar-openai")
            return self._pool

    def _body(self, r: GenRequest, n: int, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": r.prompt,
            "max_tokens": r.max_new_tokens,
            "temperature": r.temperature,
            "top_p": r.top_p,
            "n": n,
        }
        if r.stop:
            body["stop"] = list(r.stop)
        if seed is not None:
            body["seed"] = seed
        if self.kind == "vllm":
            # Neutral values beat the model's generation_config defaults that vLLM applies;
            # keep added/special tokens in the text, as the HF backend does.
            body.update(top_k=-1, min_p=0.0, repetition_penalty=1.0)
            body.update(skip_special_tokens=False, spaces_between_special_tokens=False)
        elif self.kind == "llamacpp":
            body.update(
                top_k=0, min_p=0.0, samplers=["temperature", "top_p"], verbose=True, cache_prompt=True
            )
        return body

    def _complete(self, r: GenRequest, job: _Job) -> list[Completion]:
        data = self._call("POST", "/completions", self._body(r, job.n, job.seed))
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))[: job.n]
        usage = data.get("usage") or {}
        verbose = data.get("__verbose") if isinstance(data.get("__verbose"), dict) else None
        if verbose is not None and len(choices) == 1 and "tokens_predicted" in verbose:
            counts = [int(verbose["tokens_predicted"])]
        else:
            counts = share_tokens(
                int(usage.get("completion_tokens") or 0), [c.get("text") or "" for c in choices]
            )
        outs = []
        for c, n_tok in zip(choices, counts):
            text, reason = self._restore(c, r.stop, verbose if len(choices) == 1 else None)
            outs.append(Completion(text=text, stop_reason=reason, n_tokens=n_tok))
        with self._lock:
            self.tokens_generated += sum(counts)
        return outs

    def _restore(self, choice: dict[str, Any], stops: Sequence[str], verbose: dict | None) -> tuple[str, str]:
        """(text ending with its stop string, stop_reason) of one choice."""
        text = choice.get("text") or ""
        finish = choice.get("finish_reason")
        if finish == "length":
            return text, "length"
        matched: str | None = None
        known = False  # whether the server said what ended the text
        # vLLM: stop_reason; llama.cpp's native API: stopping_word; SGLang: matched_stop.
        named = [choice.get(k) for k in ("stop_reason", "stopping_word", "matched_stop")]
        named = [s for s in named if isinstance(s, str) and s]
        if named:
            matched, known = named[0], True
        elif self.kind == "vllm":  # stop_reason null: end of sequence; an int: a stop token id
            known = True
        elif verbose is not None and "stop_type" in verbose:  # llama.cpp, n = 1
            known = True
            if verbose["stop_type"] == "word":
                matched = verbose.get("stopping_word") or None
            elif verbose["stop_type"] == "limit":
                return text, "length"
        if not known:
            matched = infer_stop(text, stops)
            if matched is not None:
                with self._lock:
                    self.inferred_stops += 1
                    warn, self._warned_inference = not self._warned_inference, True
                if warn:
                    log.warning(
                        "%s does not say which stop string ended a completion: inferring it "
                        "(rstar.models.openai.infer_stop); a vLLM or llama.cpp server says it exactly",
                        self.root,
                    )
        if matched is None:
            return text, "eos"
        if not text.endswith(matched):
            text += matched
        return text, "stop"

    # --- HTTP ----------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One API call with retries (module doc); the parsed JSON response."""
        url = self.root + path
        payload = None if body is None else json.dumps(body).encode()
        cause = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.retries += 1
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                status, raw = self._send(method, self._path + path, payload)
            except (OSError, http.client.HTTPException) as e:
                cause = f"{type(e).__name__}: {e}"
                continue
            if status < 300:
                try:
                    return json.loads(raw)
                except ValueError as e:
                    raise RstarError(f"{url}: the response is not JSON ({e}): {raw[:200]!r}") from None
            message = _error_message(raw)
            if status >= 500 or status in _RETRY_STATUS:
                cause = f"HTTP {status}: {message}"
                continue
            raise RstarError(f"{url}: HTTP {status}: {message}")
        raise RstarError(
            f"OpenAI-compatible server at {self.root} failed after {self.max_retries + 1} tries "
            f"({cause}); is it running, and is the URL right?"
        )

    def _send(self, method: str, path: str, payload: bytes | None) -> tuple[int, bytes]:
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for fresh_try in (False, True):
            conn, reused = self._connection(fresh=fresh_try)
            with self._lock:
                self._inflight += 1
                self.peak_inflight = max(self.peak_inflight, self._inflight)
                self.http_requests += 1
            try:
                conn.request(method, path, body=payload, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self._drop_connection()
                return resp.status, raw
            except _STALE:
                self._drop_connection()
                if not reused:
                    raise
            except BaseException:
                self._drop_connection()
                raise
            finally:
                with self._lock:
                    self._inflight -= 1
        raise AssertionError("unreachable")

    def _connection(self, fresh: bool) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's keep-alive connection, and whether it has been used before."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and not fresh:
            return conn, True
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._netloc, timeout=self.timeout_s)
        self._local.conn = conn
        with self._lock:
            self._conns.append(conn)
        return conn, False

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)


def _seed(seed: int | None, i: int) -> int | None:
    """Seed of sample i of a seeded request: `seed + i`, as vLLM and llama.cpp derive it."""
    return None if seed is None else seed + i


def _error_message(raw: bytes) -> str:
    """The server's error message: OpenAI's {"error": {"message": ...}}, vLLM's
    {"message": ...}, or the raw body."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")[:500].strip() or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if data.get("detail"):
            return str(data["detail"])
    return json.dumps(data)[:500]
