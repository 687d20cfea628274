"""The tiny local policy (`rstar.models.tiny`) and the transformers backend (`rstar.models.hf`).

Real models, built in a temporary directory: a random tiny Qwen2, and a copy of it trained
for a few dozen steps to continue a short step-format text, so that stopping behaviour is
deterministic (a random model mostly repeats its last token).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import RSTAR_FORMAT
from helpers.memorise import REPEAT_HEADER as HEADER
from helpers.memorise import REPEAT_STEP as STEP
from rstar import steps
from rstar.models.base import Completion, GenRequest, Policy
from rstar.models.hf import HFPolicy, _GeneratedStopCriteria, first_stop
from rstar.models.tiny import ADDED_TOKENS, default_corpus, train_tokenizer

SFT_EXAMPLES = RSTAR_FORMAT / "sft_data_examples.json"


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def trained(repeat_memorised):
    """(model, tokenizer): the tiny model after memorising TRAIN_TEXT (conftest)."""
    return repeat_memorised


# --- tokenizer -----------------------------------------------------------------------------


def test_tokenizer_round_trip_and_single_token_tags() -> None:
    tok = train_tokenizer(default_corpus())
    examples = json.loads(SFT_EXAMPLES.read_text())
    texts = [e["response"] for e in examples] + [
        steps.sft_prompt(e["query"]) + e["response"] for e in examples
    ]
    texts.append("unicode: é 漢字 😀 \t tabs\r\n and \\boxed{\\frac{1}{2}}")
    for text in texts:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=False) == text
    for tag in [*ADDED_TOKENS, tok.eos_token, tok.pad_token]:
        ids = tok.encode(tag, add_special_tokens=False)
        assert len(ids) == 1 and tok.decode(ids) == tag, tag
    # Tags inside text stay one token; digits are one token each.
    ids = tok.encode("x = 12345\n<end_of_step>", add_special_tokens=False)
    assert tok.convert_tokens_to_ids("<end_of_step>") in ids
    assert [tok.decode([i]) for i in tok.encode("12345", add_special_tokens=False)] == list("12345")
    # Tags are content: skipping special tokens drops pad/eos only.
    assert tok.decode(tok.encode("<code>a<|endoftext|>"), skip_special_tokens=True) == "<code>a"
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id
    assert len(tok) <= 512


def test_build_tiny_policy_is_a_normal_hf_directory(tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tiny_dir.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.tie_word_embeddings and model.config.max_position_embeddings == 2048
    assert model.config.vocab_size == len(tok) and tok.padding_side == "left"
    assert 3e5 < sum(p.numel() for p in model.parameters()) < 2e6
    policy = HFPolicy(tiny_dir)
    assert isinstance(policy, Policy) and policy.device.type in ("cpu", "cuda")


# --- generation ----------------------------------------------------------------------------


def test_generate_returns_n_completions_per_request_in_order(trained) -> None:
    model, tok = trained
    policy = HFPolicy(model, tokenizer=tok, max_batch_size=3)
    prompts = [HEADER, HEADER + STEP, steps.sft_prompt("What is 6 * 7?")]
    reqs = [
        GenRequest(prompts[0], n=3, max_new_tokens=12, temperature=0.0, stop=steps.STOP_STRINGS),
        GenRequest(prompts[1], n=1, max_new_tokens=5, temperature=1.0, stop=steps.STOP_STRINGS, seed=1),
        GenRequest(prompts[2], n=2, max_new_tokens=7, temperature=0.0, stop=[]),
    ]
    out = policy.generate(reqs)
    assert [len(cs) for cs in out] == [3, 1, 2]
    assert all(isinstance(c, Completion) for cs in out for c in cs)
    for r, cs in zip(reqs, out):
        assert all(0 < c.n_tokens <= r.max_new_tokens for c in cs)
    # Each request's completions are its own: compare with generating it alone.
    for r, cs in zip(reqs, out):
        if r.temperature == 0:
            alone = policy.generate(
                [GenRequest(r.prompt, n=1, max_new_tokens=r.max_new_tokens, temperature=0.0, stop=r.stop)]
            )
            assert [c.text for c in cs] == [alone[0][0].text] * r.n
    assert policy.generate([]) == []
    assert policy.calls == 1 + 1 + 2 and policy.tokens_generated > 0 and policy.model_seconds > 0


def test_greedy_is_the_same_alone_and_in_a_padded_batch(trained) -> None:
    model, tok = trained
    policy = HFPolicy(model, tokenizer=tok, max_batch_size=4, engine="hf")  # HF generate's batches
    examples = json.loads(SFT_EXAMPLES.read_text())
    prompts = [HEADER, "x", HEADER + STEP * 2] + [steps.sft_prompt(e["query"]) for e in examples[:3]]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) == len(prompts)  # all lengths differ
    reqs = [GenRequest(p, n=1, max_new_tokens=16, temperature=0.0, stop=steps.STOP_STRINGS) for p in prompts]
    batched = policy.generate(reqs)  # two batches (4 + 2), left padded
    assert policy.batches == 2
    for r, cs in zip(reqs, batched):
        alone = policy.generate([r])[0][0]
        assert (cs[0].text, cs[0].stop_reason, cs[0].n_tokens) == (
            alone.text,
            alone.stop_reason,
            alone.n_tokens,
        )


def test_shared_prefix_prefill_changes_nothing_but_speed(trained) -> None:
    model, tok = trained
    examples = json.loads(SFT_EXAMPLES.read_text())
    prompts = [HEADER, HEADER + STEP * 2] + [steps.sft_prompt(e["query"]) for e in examples[:3]]
    # n > 1 requests of prompts of different lengths, so rows share prompts and padding
    reqs = [GenRequest(p, n=3, max_new_tokens=16, temperature=0.0, stop=steps.STOP_STRINGS) for p in prompts]
    reqs.append(GenRequest(prompts[2], n=1, max_new_tokens=16, temperature=0.0, stop=steps.STOP_STRINGS))

    def run(share: bool) -> list:
        out = HFPolicy(model, tokenizer=tok, max_batch_size=8, share_prefix=share).generate(reqs)
        return [[(c.text, c.stop_reason, c.n_tokens) for c in cs] for cs in out]

    assert run(True) == run(False)


@pytest.mark.parametrize("stop_mode", ["tokens", "strings"])
def test_prompt_ending_with_a_stop_tag_does_not_stop_at_once(trained, stop_mode: str) -> None:
    """Both stop paths: stop-token ids, and stop strings (which transformers also matches
    across the end of the prompt) must give the next step, ended by its own tag."""
    model, tok = trained
    policy = HFPolicy(model, tokenizer=tok, stop_mode=stop_mode)
    for prompt in (HEADER, HEADER + STEP):
        c = policy.generate(
            [GenRequest(prompt, n=1, max_new_tokens=40, temperature=0.0, stop=steps.STOP_STRINGS)]
        )[0][0]
        assert (c.text, c.stop_reason) == (STEP, "stop")
        assert c.n_tokens == len(tok.encode(STEP, add_special_tokens=False))


def test_stop_strings_of_several_tokens(trained) -> None:
    """A stop string that is not one token forces the stop-string path; the text is cut right
    after it even when the token that completed it runs past it."""
    model, tok = trained
    policy = HFPolicy(model, tokenizer=tok)  # auto: "x + 1" is several tokens -> stop strings
    c = policy.generate([GenRequest(HEADER, n=1, max_new_tokens=40, temperature=0.0, stop=["x + 1", "zzz"])])[
        0
    ][0]
    assert (c.text, c.stop_reason) == ("\n\n# add one\nx = x + 1", "stop")
    assert first_stop("ab<end_of_step>cd<end_of_code>", steps.STOP_STRINGS) == len("ab<end_of_step>")


def test_stop_string_matches_reaching_into_the_prompt_are_ignored(tiny_dir: Path) -> None:
    """transformers' StopStringCriteria looks at the tail of the whole sequence; the guard
    accepts a match only when the stop string lies in the generated tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    crit = _GeneratedStopCriteria(tok, steps.STOP_STRINGS)
    enc = partial(tok.encode, add_special_tokens=False)
    # Row 0: the prompt spells "<end_of_step" in pieces and the model adds ">": the tag
    # straddles the prompt's end. Row 1: the model generates the tag itself.
    # Row 2: the prompt ends with the tag and the model goes on with a newline.
    prompts = [enc("x = 1\n") + enc("<end_of_") + enc("step"), enc("x = 1\n"), enc(HEADER)]
    generated = [enc(">"), enc("<end_of_step>"), enc("\n")]
    assert len(enc("<end_of_") + enc("step")) > 1 and all(len(g) == 1 for g in generated)
    L = max(map(len, prompts))
    rows = [[tok.pad_token_id] * (L - len(p)) + p + g for p, g in zip(prompts, generated)]
    ids = torch.tensor(rows)  # (3, L + 1)
    assert crit.inner(ids, None).tolist() == [True, True, False]  # what transformers alone says
    crit.reset(L)
    assert crit(ids, None).tolist() == [False, True, False]
    assert crit.stopped_at == {1: 1}


def test_max_new_tokens_gives_length(trained) -> None:
    model, tok = trained
    for policy in (HFPolicy(model, tokenizer=tok), HFPolicy(model, tokenizer=tok, max_new_tokens_cap=3)):
        max_new = 3 if policy.max_new_tokens_cap is None else 100
        c = policy.generate(
            [GenRequest(HEADER, n=1, max_new_tokens=max_new, temperature=0.0, stop=steps.STOP_STRINGS)]
        )[0][0]
        assert (c.stop_reason, c.n_tokens) == ("length", 3)
        assert STEP.startswith(c.text) and c.text


def test_sampling_is_reproducible_per_batch(tiny_dir: Path) -> None:
    policy = HFPolicy(tiny_dir)  # the random model: its samples vary (the trained one is sure)
    prompt = steps.sft_prompt("What is 6 * 7?")

    def sample(seed: int | None) -> list[str]:
        reqs = [
            GenRequest(prompt, n=4, max_new_tokens=12, temperature=1.0, stop=steps.STOP_STRINGS, seed=seed)
        ]
        return [c.text for c in policy.generate(reqs)[0]]

    state = torch.random.get_rng_state()
    assert sample(1) == sample(1)
    assert torch.equal(state, torch.random.get_rng_state())  # seeded batches leave the global RNG alone
    assert sample(1) != sample(2)
    assert len(set(sample(1))) > 1  # the n samples of one request differ


def test_cli_builds_a_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rstar.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in default_corpus(n_problems=20)))
    out = tmp_path / "m"
    assert main(["model", "tiny", "--out", str(out), "--corpus", str(corpus), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "parameters" in printed
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
