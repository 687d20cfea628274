"""`rstar.models.vllm` without vLLM: the SamplingParams mapping, the output conversion, and
`VLLMPolicy.generate` over a stand-in `vllm` module.

vLLM cannot be installed on these CPU machines (it pins its own torch and needs a GPU), so
vLLM's `RequestOutput` / `CompletionOutput` are built here as `types.SimpleNamespace`s with
the attributes vLLM returns (index, text, token_ids, finish_reason, stop_reason). The real
engine is checked on a GPU machine by bench/vllm_check.py (docs/GPU.md).
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace
from typing import Any

import pytest

from rstar import RstarError, steps
from rstar.models.base import Completion, GenRequest, Policy
from rstar.models.vllm import VLLMPolicy, outputs_to_completions, sampling_kwargs


def _out(
    index: int, text: str, finish: str | None, stop_reason: object = None, n_tok: int = 3
) -> SimpleNamespace:
    return SimpleNamespace(
        index=index, text=text, token_ids=list(range(n_tok)), finish_reason=finish, stop_reason=stop_reason
    )


def test_sampling_kwargs() -> None:
    r = GenRequest("p", n=8, max_new_tokens=64, temperature=0.7, top_p=0.95, stop=steps.STOP_STRINGS, seed=11)
    assert sampling_kwargs(r) == dict(
        n=8,
        temperature=0.7,
        top_p=0.95,
        max_tokens=64,
        stop=steps.STOP_STRINGS,
        seed=11,
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
    )
    greedy = sampling_kwargs(GenRequest("p", n=4, temperature=0.0, top_p=0.5))
    assert greedy["n"] == 1 and greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0
    assert greedy["stop"] is None and greedy["seed"] is None


def test_outputs_to_completions() -> None:
    ro = SimpleNamespace(
        outputs=[
            _out(2, "abc", "length", None, n_tok=5),
            _out(0, "# a\nx = 1\n<end_of_step>", "stop", steps.END_OF_STEP, n_tok=4),
            _out(1, "\n<answer>\\boxed{2}", "stop", steps.END_OF_ANSWER),  # stop string left out
            _out(3, "done<|endoftext|>", "stop", None),  # eos, its text kept by the detokenizer
            _out(4, "x", "stop", 151643),  # a stop token id
            _out(5, "cut", "abort", None),
        ]
    )
    cs = outputs_to_completions(ro, 6, steps.STOP_STRINGS, ["<|endoftext|>"])
    assert cs == [
        Completion("# a\nx = 1\n<end_of_step>", "stop", 4),
        Completion("\n<answer>\\boxed{2}<end_of_answer>", "stop", 3),
        Completion("abc", "length", 5),
        Completion("done", "eos", 3),
        Completion("x", "eos", 3),
        Completion("cut", "length", 3),
    ]
    # A greedy request was sent with n=1: its output stands for all n.
    one = SimpleNamespace(outputs=[_out(0, "s<end_of_code>", "stop", steps.END_OF_CODE)])
    cs = outputs_to_completions(one, 3)
    assert [c.text for c in cs] == ["s<end_of_code>"] * 3 and cs[0] is not cs[1]
    with pytest.raises(RstarError, match="2 outputs for a request of n=3"):
        outputs_to_completions(SimpleNamespace(outputs=[_out(0, "a", "length"), _out(1, "b", "length")]), 3)


def test_missing_vllm_gives_install_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(RstarError, match=r"vLLM is not installed") as e:
        VLLMPolicy("some/model")
    assert "docs/GPU.md" in str(e.value) and "pip install" in str(e.value)


class _FakeLLM:
    """Stands in for `vllm.LLM`: records its arguments, answers like vLLM's offline engine
    (per request: n outputs, seed-determined text, stop strings included)."""

    instances: list[_FakeLLM] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple[list[str], list[SimpleNamespace]]] = []
        _FakeLLM.instances.append(self)

    def get_tokenizer(self) -> SimpleNamespace:
        return SimpleNamespace(eos_token="<|endoftext|>")

    def generate(self, prompts: list[str], params: list[SimpleNamespace], use_tqdm: bool = True) -> list:
        assert isinstance(prompts, list) and len(prompts) == len(params) and use_tqdm is False
        self.calls.append((prompts, params))
        outs = []
        for p, sp in zip(prompts, params):
            items = []
            for i in range(sp.n):
                seed = None if sp.seed is None else sp.seed + i
                stop = sp.stop[0] if sp.stop else None
                text = f"{p}|{seed}|" + (stop or "")
                items.append(_out(i, text, "stop" if stop else "length", stop, n_tok=2))
            outs.append(SimpleNamespace(outputs=items[::-1]))  # any order: sorted by index
        return outs


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    mod = types.ModuleType("vllm")
    mod.LLM = _FakeLLM  # type: ignore[attr-defined]
    mod.SamplingParams = SimpleNamespace  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", mod)
    _FakeLLM.instances.clear()
    return mod


def test_generate_maps_requests_to_one_engine_call(fake_vllm: types.ModuleType) -> None:
    policy = VLLMPolicy("/models/tiny", dtype="auto", max_model_len=1024, enforce_eager=True)
    assert isinstance(policy, Policy)
    llm = _FakeLLM.instances[0]
    assert llm.kwargs == dict(
        model="/models/tiny",
        dtype="bfloat16",
        gpu_memory_utilization=0.9,
        enable_prefix_caching=True,
        tensor_parallel_size=1,
        max_model_len=1024,
        seed=0,
        enforce_eager=True,
    )
    reqs = [
        GenRequest("a", n=3, temperature=1.0, stop=steps.STOP_STRINGS, seed=10),
        GenRequest("b", n=2, max_new_tokens=0),  # nothing to generate: not sent
        GenRequest("c", n=4, temperature=0.0, stop=[]),  # greedy: sent with n=1
    ]
    out = policy.generate(reqs)
    assert len(llm.calls) == 1 and llm.calls[0][0] == ["a", "c"]
    assert [sp.n for sp in llm.calls[0][1]] == [3, 1]
    assert [c.text for c in out[0]] == [f"a|{s}|<end_of_step>" for s in (10, 11, 12)]
    assert [c.stop_reason for c in out[0]] == ["stop"] * 3
    assert out[1] == [Completion("", "length", 0)] * 2
    assert [c.text for c in out[2]] == ["c|None|"] * 4 and out[2][0].stop_reason == "length"
    assert policy.tokens_generated == 2 * 4 and policy.sequences == 4 and policy.calls == 1
    assert policy.generate([]) == [] and len(llm.calls) == 1
    with pytest.raises(RstarError, match="dtype='fp8'"):
        VLLMPolicy("/models/tiny", dtype="fp8")
