"""`rstar.models.openai.OpenAIPolicy` against a real OpenAI-compatible server on loopback.

The server is llama.cpp's own C++ server (the code of `llama-server`), run as a subprocess
through the `xllamacpp` package (prebuilt CPU wheel on PyPI) by tests/llama_server.py,
serving the tiny Qwen2 policy converted to GGUF (f32) by the same helper. The policy is the
tiny model of `rstar.models.tiny` after memorising one short solution, so that greedy
continuations are known: they must equal the HF backend's, stop tag included.

A few tests at the end use a stub HTTP server instead (in-process, also on loopback) for
what a real server cannot be made to do on demand: answer 503 and then recover, ignore `n`,
or answer like vLLM (no vLLM server runs on a CPU machine).

Every server here listens on 127.0.0.1 only and is stopped when its test or module ends.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import RSTAR_FORMAT
from helpers.memorise import SOLUTION_CASES, SOLUTION_TEXT, memorise
from rstar import RstarError, steps
from rstar.models.base import Completion, GenRequest, Policy
from rstar.models.hf import HFPolicy, first_stop
from rstar.models.openai import OpenAIPolicy, api_root, infer_stop, share_tokens

# End to end against a llama.cpp server with a memorised model: `pytest -m "not slow"` skips it.
pytestmark = pytest.mark.slow

pytest.importorskip("gguf", reason="needs the server extra: pip install -e '.[server]'")
pytest.importorskip("xllamacpp", reason="needs the server extra: pip install -e '.[server]'")

HELPER = Path(__file__).with_name("llama_server.py")
SFT_EXAMPLES = RSTAR_FORMAT / "sft_data_examples.json"

# A solution with every kind of step, each different so that a tiny model can memorise it
# (tests/helpers/memorise.py); CASES: (prompt, the greedy continuation up to its stop tag).
TRAIN_TEXT, CASES = SOLUTION_TEXT, SOLUTION_CASES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama.cpp's server in a subprocess on 127.0.0.1; `stop()` always ends it."""

    def __init__(self, gguf: Path, log_path: Path, parallel: int = 4, ctx: int = 1024) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("w")
        cmd = [sys.executable, str(HELPER), "serve", "--model", str(gguf), "--port", str(self.port)]
        cmd += ["--parallel", str(parallel), "--ctx", str(ctx), "--threads", "1"]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(timeout_s=60)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout_s}s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """The tiny policy after memorising TRAIN_TEXT, saved as an HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("http") / "policy"
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster for a tiny model
    try:
        # Until greedy decoding gives every step the tests expect (a fixed step count reaches
        # different losses on different CPUs).
        memorise(model, tok, TRAIN_TEXT, CASES)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gguf_path(model_dir: Path) -> Path:
    sys.path.insert(0, str(HELPER.parent))
    try:
        from llama_server import hf_to_gguf
    finally:
        sys.path.remove(str(HELPER.parent))
    return hf_to_gguf(model_dir, model_dir.parent / "policy.gguf")


@pytest.fixture(scope="module")
def server(gguf_path: Path) -> Iterator[LlamaServer]:
    srv = LlamaServer(gguf_path, gguf_path.parent / "server.log")
    try:
        yield srv
    finally:
        srv.stop()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


# --- against llama.cpp's server ------------------------------------------------------------


def test_server_tokenizes_like_the_hf_tokenizer(server: LlamaServer, model_dir: Path) -> None:
    """The GGUF's vocabulary, merges and pre-tokenizer reproduce the HF tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = json.loads(SFT_EXAMPLES.read_text())
    texts = [TRAIN_TEXT, "unicode: é 漢字 😀 \t tabs\r\n and \\boxed{\\frac{1}{2}}", "  a  b\n\n\nc 12345"]
    texts += [steps.sft_prompt(e["query"]) + e["response"] for e in examples[:3]]
    for text in texts:
        theirs = _post(
            server.url + "/tokenize", {"content": text, "add_special": True, "parse_special": True}
        )
        assert theirs["tokens"] == tok(text)["input_ids"], text[:60]
        back = _post(server.url + "/detokenize", {"tokens": theirs["tokens"]})
        assert back["content"] == text


def test_greedy_steps_match_the_hf_backend_with_their_stop_tags(server: LlamaServer, model_dir: Path) -> None:
    policy = OpenAIPolicy(server.url)
    assert isinstance(policy, Policy)
    assert policy.server_info()["kind"] == "llamacpp"
    reqs = [GenRequest(p, n=2, max_new_tokens=40, temperature=0.0, stop=steps.STOP_STRINGS) for p, _ in CASES]
    out = policy.generate(reqs)
    hf = HFPolicy(model_dir, device="cpu").generate(reqs)
    for (_, want), cs, hcs in zip(CASES, out, hf):
        assert [c.text for c in cs] == [want, want]
        assert [c.stop_reason for c in cs] == ["stop", "stop"]
        assert [(c.text, c.stop_reason) for c in cs] == [(c.text, c.stop_reason) for c in hcs]
        # Token counts: llama.cpp's count of generated tokens, the stop token included.
        assert [c.n_tokens for c in cs] == [c.n_tokens for c in hcs]
    # The step kinds the search reads from the tags.
    kinds = [steps.parse_step(cs[0].text).kind for cs in out]
    assert kinds == ["code", "code", "code_end", "answer"]
    assert policy.inferred_stops == 0 and policy.retries == 0
    # Greedy: one sample asked for, standing for both (+ 1: the /v1/models probe).
    assert policy.http_requests == 1 + len(CASES)
    policy.close()


def test_generic_mode_infers_the_stripped_stop_tags(server: LlamaServer) -> None:
    """`server="generic"` reads standard fields only: the stop string is inferred, and for
    these steps the rule gets every tag right."""
    policy = OpenAIPolicy(server.url, server="generic")
    reqs = [GenRequest(p, n=1, max_new_tokens=40, temperature=0.0, stop=steps.STOP_STRINGS) for p, _ in CASES]
    out = policy.generate(reqs)
    for (_, want), cs in zip(CASES, out):
        assert [c.text for c in cs] == [want]
    assert policy.inferred_stops == len(CASES)
    # Sampling with native n (llama.cpp honours it): one request for n=3.
    before = policy.http_requests
    out = policy.generate([GenRequest(CASES[0][0], n=3, max_new_tokens=8, temperature=1.0, seed=1)])
    assert len(out[0]) == 3 and policy.http_requests == before + 1
    policy.close()


def test_sampling_n_stop_and_seeds(server: LlamaServer, model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    # One request at a time: llama.cpp's CPU kernels round differently for different batch
    # sizes, so under concurrent load a seeded sample can change at a near-tie (seen at
    # temperature 2); alone, a seeded request is reproducible.
    policy = OpenAIPolicy(server.url, max_concurrency=1)
    prompts = [p for p, _ in CASES]

    def sample(seed: int | None, temperature: float = 2.0) -> list[list]:
        reqs = [
            GenRequest(p, n=4, max_new_tokens=24, temperature=temperature, stop=steps.STOP_STRINGS, seed=seed)
            for p in prompts
        ]
        return policy.generate(reqs)

    policy.server_info()  # the /v1/models probe
    before = policy.http_requests
    a, b, c = sample(7), sample(7), sample(8)
    assert policy.http_requests - before == 3 * 4 * len(prompts)  # llama.cpp: one request per sample
    assert [len(cs) for cs in a] == [4] * len(prompts)
    texts = lambda out: [[x.text for x in cs] for cs in out]  # noqa: E731
    assert texts(a) == texts(b)  # same seed, same samples
    assert texts(a) != texts(c)  # another seed, other samples
    assert any(len(set(cs)) > 1 for cs in texts(a))  # the n samples of a request differ
    # A seeded n=4 request gives sample i = the request with seed 7 + i alone.
    alone = policy.generate(
        [
            GenRequest(
                prompts[0], n=1, max_new_tokens=24, temperature=2.0, stop=steps.STOP_STRINGS, seed=7 + i
            )
            for i in range(4)
        ]
    )
    assert [cs[0].text for cs in alone] == texts(a)[0]
    for cs in a:
        for x in cs:
            assert x.stop_reason in ("stop", "length", "eos")
            assert 0 < x.n_tokens <= 24
            cut = first_stop(x.text, steps.STOP_STRINGS)
            if x.stop_reason == "stop":
                assert cut == len(x.text)  # ends with its tag, and has no earlier tag
            else:
                assert cut is None
            if "\ufffd" not in x.text:  # (a random byte sequence can be invalid UTF-8)
                assert tok.decode(tok(x.text)["input_ids"]) == x.text
    # At a lower temperature the memorised steps come back, tags restored.
    low = sample(3, temperature=0.3)
    assert any(x.stop_reason == "stop" for cs in low for x in cs)
    assert policy.tokens_generated > 0 and policy.retries == 0
    policy.close()


class _CountingProxy:
    """A TCP relay on 127.0.0.1 that records how many client connections are open at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.open = 0
        self.max_open = 0
        self.lock = threading.Lock()
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.open += 1
                self.max_open = max(self.max_open, self.open)
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counts: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if counts:
                with self.lock:
                    self.open -= 1

    def close(self) -> None:
        self.closing = True
        self.sock.close()


def test_concurrency_limit(server: LlamaServer) -> None:
    proxy = _CountingProxy(server.port)
    try:
        policy = OpenAIPolicy(f"http://127.0.0.1:{proxy.port}", max_concurrency=3)
        reqs = [
            GenRequest(p, n=4, max_new_tokens=16, temperature=1.0, stop=steps.STOP_STRINGS, seed=i)
            for i, (p, _) in enumerate(CASES * 4)
        ]
        out = policy.generate(reqs)
        assert [len(cs) for cs in out] == [4] * len(reqs)
        assert 2 <= policy.peak_inflight <= 3  # requests in flight, as the client counts them
        assert proxy.max_open <= 3  # connections, as the wire sees them (keep-alive: one a worker)
        policy.close()
    finally:
        proxy.close()


def test_client_errors_are_not_retried(server: LlamaServer) -> None:
    policy = OpenAIPolicy(server.url, max_retries=3, backoff_s=0.05)
    too_long = GenRequest("x " * 3000, n=1, max_new_tokens=8, temperature=0.0)  # > the 1024-token context
    with pytest.raises(RstarError, match=r"HTTP 400: .*context"):
        policy.generate([too_long])
    assert policy.retries == 0
    policy.close()


def test_a_killed_server_gives_a_clear_error(gguf_path: Path) -> None:
    srv = LlamaServer(gguf_path, gguf_path.parent / "killed.log", parallel=1)
    try:
        policy = OpenAIPolicy(srv.url, max_retries=2, backoff_s=0.05, timeout_s=5)
        req = GenRequest(CASES[0][0], n=1, max_new_tokens=8, temperature=0.0, stop=steps.STOP_STRINGS)
        assert policy.generate([req])[0][0].text  # up and answering (keep-alive connection open)
        srv.proc.kill()
        srv.proc.wait(timeout=10)
        t0 = time.monotonic()
        with pytest.raises(RstarError) as e:
            policy.generate([req])
        assert time.monotonic() - t0 < 5  # bounded: 3 tries, 0.05 + 0.1 s of backoff
        assert srv.url in str(e.value) and "3 tries" in str(e.value) and "running" in str(e.value)
        assert policy.retries == 2
        policy.close()
    finally:
        srv.stop()
    # Nothing listens at all from the start: the same error (from the /v1/models probe).
    with pytest.raises(RstarError, match=r"127\.0\.0\.1:\d+/v1 failed after 2 tries .*Connection"):
        OpenAIPolicy(f"http://127.0.0.1:{_free_port()}", max_retries=1, backoff_s=0.01).generate([req])


# --- against a stub server: what a real one cannot be made to do here ------------------------


class _Stub(BaseHTTPRequestHandler):
    """Answers from `server.script`: a list of (status, json body or callable(request body))."""

    def do_GET(self) -> None:  # noqa: N802
        self._answer(None)

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)  # type: ignore[attr-defined]
        self._answer(body)

    def _answer(self, body: dict | None) -> None:
        status, payload = self.server.script.pop(0)  # type: ignore[attr-defined]
        if callable(payload):
            payload = payload(body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[ThreadingHTTPServer]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    srv.script, srv.requests = [], []  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def _url(srv: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


def _choices(*items: tuple[str, str, object]) -> dict:
    return {
        "choices": [
            {"index": i, "text": t, "finish_reason": f, "stop_reason": s} for i, (t, f, s) in enumerate(items)
        ],
        "usage": {"completion_tokens": 30},
    }


def test_vllm_style_answers_and_retries_on_5xx(stub: ThreadingHTTPServer) -> None:
    stub.script += [
        (200, {"data": [{"id": "m", "owned_by": "vllm"}]}),
        (503, {"error": {"message": "busy"}}),
        (500, {"message": "oops"}),
        (
            200,
            _choices(
                ("# a\nx = 1\n", "stop", steps.END_OF_STEP), ("abc", "stop", None), ("abcdef", "length", None)
            ),
        ),
    ]
    policy = OpenAIPolicy(_url(stub), max_retries=3, backoff_s=0.01)
    out = policy.generate(
        [GenRequest("p", n=3, max_new_tokens=10, temperature=0.7, stop=steps.STOP_STRINGS, seed=5)]
    )
    assert [(c.text, c.stop_reason) for c in out[0]] == [
        ("# a\nx = 1\n" + steps.END_OF_STEP, "stop"),
        ("abc", "eos"),
        ("abcdef", "length"),
    ]
    assert sum(c.n_tokens for c in out[0]) == 30 and policy.tokens_generated == 30
    assert policy.retries == 2 and policy.server_info() == {"kind": "vllm", "model": "m"}
    body = stub.requests[-1]
    assert (
        body["n"] == 3 and body["seed"] == 5 and body["stop"] == steps.STOP_STRINGS and body["model"] == "m"
    )
    assert body["top_k"] == -1 and body["repetition_penalty"] == 1.0 and body["skip_special_tokens"] is False
    policy.close()


def test_5xx_until_the_end_and_4xx_messages(stub: ThreadingHTTPServer) -> None:
    stub.script += [(503, {"error": {"message": "overloaded"}})] * 3
    policy = OpenAIPolicy(_url(stub) + "/v1#m", max_retries=2, backoff_s=0.01, server="generic")
    with pytest.raises(RstarError, match=r"failed after 3 tries \(HTTP 503: overloaded\)"):
        policy.generate([GenRequest("p", n=1, max_new_tokens=4)])
    stub.script += [(404, {"error": {"message": "The model `m` does not exist."}})]
    with pytest.raises(RstarError, match=r"/v1/completions: HTTP 404: The model `m` does not exist"):
        policy.generate([GenRequest("p", n=1, max_new_tokens=4)])
    assert len(stub.requests) == 4  # 3 tries, then 1 (no retry of a 4xx)
    policy.close()


def test_a_server_that_ignores_n_is_asked_once_per_missing_sample(stub: ThreadingHTTPServer) -> None:
    one = lambda body: _choices((f"s{body.get('seed')}", "length", None))  # noqa: E731
    stub.script += [(200, one)] * 4
    policy = OpenAIPolicy(_url(stub) + "#m", server="generic")
    out = policy.generate([GenRequest("p", n=3, max_new_tokens=4, seed=10)])
    assert [c.text for c in out[0]] == ["s10", "s11", "s12"]
    assert [b["n"] for b in stub.requests] == [3, 1, 1]
    out = policy.generate([GenRequest("p", n=1, max_new_tokens=4, seed=20)])
    assert [b["n"] for b in stub.requests][-1] == 1
    assert policy.generate([GenRequest("p", n=2, max_new_tokens=0)]) == [[Completion("", "length", 0)] * 2]
    policy.close()


# --- pure functions --------------------------------------------------------------------------


def test_infer_stop_rule() -> None:
    S = steps.STOP_STRINGS
    assert infer_stop("\n\n# add\nx = 1\n", S) == steps.END_OF_STEP
    assert infer_stop("\n\n# Now print the final answer\nprint(x)\n", S) == steps.END_OF_CODE
    assert infer_stop("\nprint(x)  \n# done\n", S) == steps.END_OF_CODE
    assert infer_stop("\n<answer>so \\boxed{3}", S) == steps.END_OF_ANSWER
    assert infer_stop("x\n<output>3", steps.ROUND1_STOP_STRINGS) == steps.END_OF_OUTPUT
    assert infer_stop("anything", ["###"]) == "###"
    assert infer_stop("anything", []) is None
    # The authors' data: every step of every response gets its own tag back.
    examples = json.loads(SFT_EXAMPLES.read_text())
    n = 0
    for e in examples:
        for step in steps.split_steps(e["response"]):
            for tag in S:
                if tag in step:
                    head = step.split(tag)[0]
                    assert infer_stop(head, S) == tag, step
                    n += 1
    assert n > 20


def test_api_root_and_share_tokens() -> None:
    assert api_root("http://h:8000") == ("http://h:8000/v1", None)
    assert api_root("http://h:8000/v1/") == ("http://h:8000/v1", None)
    assert api_root("https://h/api/v1#Qwen%2FMath") == ("https://h/api/v1", "Qwen/Math")
    with pytest.raises(RstarError):
        api_root("h:8000")
    with pytest.raises(RstarError):
        OpenAIPolicy("http://h:1", server="tgi")
    assert share_tokens(10, ["a", "bbbb", ""]) == [3, 6, 1]
    assert (
        sum(share_tokens(7, ["x"] * 3)) == 7 and share_tokens(0, ["a"]) == [0] and share_tokens(5, []) == []
    )


def test_api_key_from_the_environment(stub: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []

    def answer(body: dict) -> dict:
        return _choices(("t", "length", None))

    class _KeyStub(_Stub):
        def do_POST(self) -> None:  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            super().do_POST()

    stub.RequestHandlerClass = _KeyStub
    stub.script += [(200, answer)]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    OpenAIPolicy(_url(stub) + "#m", server="generic").generate([GenRequest("p", max_new_tokens=2)])
    assert seen == ["Bearer sk-test"]
