"""The reward model (`rstar.models.ppm`): trained for real on the tiny policy, then scored.

Two PPMs are trained here: a few steps on the authors' example pairs (read in place), and a
few dozen steps on a toy set that a model can learn (the positive step carries a word the
negative lacks), which must rank held-out pairs well above chance. The trained directories
are then loaded as the search loads them and checked for the scoring invariants: values in
[-1, 1], independent of batching, long prefixes cut from the left, and the same values as in
training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import RSTAR_FORMAT
from helpers.toy_ppm import TOY_CFG
from rstar import RstarError, steps
from rstar.config import TrainConfig
from rstar.models import RewardModel
from rstar.models.ppm import HFRewardModel, encode, load_reward_model, split_ids, values_from_logits
from rstar.training.common import problem_key, split_held_out
from rstar.training.reward import train_reward

PAIRS = RSTAR_FORMAT / "ppm_pair_examples.json"


pytestmark = pytest.mark.usefixtures("torch_one_thread")


# --- training ------------------------------------------------------------------------------


def test_train_on_example_pairs_reports_heldout_accuracy(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(learning_rate=1e-3, batch_size=2, micro_batch_size=2, max_length=384, eval_fraction=0.4)
    out = tmp_path / "ppm"
    metrics = train_reward(PAIRS, tiny_dir, out, cfg, kind="ppm", max_steps=2)
    assert metrics["steps"] == 2
    assert metrics["eval_records"] >= 1 and metrics["train_records"] >= 1
    # The reported accuracy is the loaded model's ranking of the held-out pairs (two steps from
    # a zero head rank nothing reliably, so the number itself is not pinned).
    recs = json.loads(PAIRS.read_text())
    _, held = split_held_out(recs, cfg.eval_fraction, cfg.seed, key=lambda r: problem_key(r["prompt"]))
    assert len(held) == metrics["eval_records"]
    scorer = load_reward_model(out, device="cpu")
    pos = scorer.score([r["prompt"] for r in held], [r["pos"] for r in held])
    neg = scorer.score([r["prompt"] for r in held], [r["neg"] for r in held])
    assert metrics["heldout_accuracy"] == pytest.approx(sum(p > n for p, n in zip(pos, neg)) / len(held))
    assert json.loads((out / "metrics.json").read_text())["heldout_accuracy"] == metrics["heldout_accuracy"]
    # One self-describing directory: weights (head included) and config, no side file.
    config = json.loads((out / "config.json").read_text())
    assert config["rstar_reward"] == {"kind": "ppm", "activation": "tanh", "max_length": 384}
    assert config["architectures"] == ["Qwen2ForSequenceClassification"]
    assert not list(out.glob("*value_head*"))
    rm = load_reward_model(out)
    assert isinstance(rm, RewardModel) and rm.kind == "ppm" and rm.max_length == 384


def test_toy_ppm_learns_to_rank(toy_ppm: tuple[Path, dict, list[dict]]) -> None:
    _, metrics, _ = toy_ppm
    assert metrics["eval_records"] == 12
    # The zero-initialised head starts at chance: every value 0, loss log 2 = 0.693, no pair
    # ranked. (tanh bounds the loss from below by -log sigmoid(2) = 0.127.)
    assert metrics["heldout_accuracy"] >= 0.9, metrics
    assert metrics["eval_loss"] < 0.45, metrics


def test_scores_match_training_values(toy_ppm: tuple[Path, dict, list[dict]]) -> None:
    """The loaded model ranks the held-out pairs exactly as training's evaluation did."""
    out, metrics, recs = toy_ppm
    _, held = split_held_out(
        recs, TOY_CFG.eval_fraction, TOY_CFG.seed, key=lambda r: problem_key(r["prompt"])
    )
    rm = load_reward_model(out, device="cpu")
    pos = rm.score([r["prompt"] for r in held], [r["pos"] for r in held])
    neg = rm.score([r["prompt"] for r in held], [r["neg"] for r in held])
    acc = sum(p > n for p, n in zip(pos, neg)) / len(held)
    assert acc == pytest.approx(metrics["heldout_accuracy"])


# --- scoring -------------------------------------------------------------------------------


def test_values_in_range_and_independent_of_batching(toy_ppm: tuple[Path, dict, list[dict]]) -> None:
    out, _, recs = toy_ppm
    rm = load_reward_model(out, device="cpu", max_batch_size=64)
    # Prefixes of very different lengths, so batches carry a lot of padding.
    prefixes = [r["prompt"] + (r["pos"] if i % 2 else "") for i, r in enumerate(recs[:10])]
    steps_ = [
        r["neg"][-40:] if i % 3 else "\n\n# Step 3: good\nz = 1\n<end_of_step>"
        for i, r in enumerate(recs[:10])
    ]
    batched = rm.score(prefixes, steps_)
    assert all(-1.0 <= v <= 1.0 for v in batched)
    assert len(set(round(v, 6) for v in batched)) > 1  # a trained head tells texts apart
    alone = [rm.score([p], [s])[0] for p, s in zip(prefixes, steps_)]
    assert batched == pytest.approx(alone, abs=1e-5)
    rm.max_batch_size = 3
    assert rm.score(prefixes, steps_) == pytest.approx(alone, abs=1e-5)
    assert rm.score([], []) == []


def test_long_prefix_is_cut_from_the_left(toy_ppm: tuple[Path, dict, list[dict]]) -> None:
    out, _, recs = toy_ppm
    rm = HFRewardModel(out, device="cpu", max_length=64)
    step = "\n\n# Step 2: good\ny = x * 7\n<end_of_step>"
    filler = "".join(f"\n# note {i}\nv{i} = {i}\n{steps.END_OF_STEP}" for i in range(40))
    prefix_a = recs[0]["prompt"] + filler
    prefix_b = recs[1]["prompt"] + "\n# another beginning altogether\n" + filler  # same last 64 tokens

    ids = encode(rm.tokenizer, prefix_a + step, rm.max_length)
    step_ids = rm.tokenizer(step, add_special_tokens=False)["input_ids"]
    full = rm.tokenizer(prefix_a + step)["input_ids"]
    assert len(full) > 2 * rm.max_length
    assert len(ids) == rm.max_length
    assert ids[-len(step_ids) :] == step_ids  # the step is whole, at the end
    assert ids == full[-rm.max_length :]

    with torch.inference_mode():
        direct = values_from_logits(rm.model(input_ids=torch.tensor([ids])).logits).item()
    score_a, score_b = rm.score([prefix_a, prefix_b], [step, step])
    assert score_a == pytest.approx(direct, abs=1e-5)
    assert score_b == pytest.approx(score_a, abs=1e-5)  # only the cut-off beginnings differ
    # Scoring the truncated text itself gives the same value.
    assert rm.score_texts([rm.tokenizer.decode(ids)])[0] == pytest.approx(direct, abs=1e-5)


def test_a_policy_directory_is_not_a_reward_model(tiny_dir: Path) -> None:
    with pytest.raises(
        RstarError,
        match=r"not a reward-model directory \(its config.json has no 'rstar_reward'\); "
        r"train one with `rstar train ppm DATA --model SFT_DIR --out DIR`$",
    ):
        load_reward_model(tiny_dir)
    with pytest.raises(RstarError, match="not a model directory"):
        load_reward_model(tiny_dir / "missing")


def test_load_reward_through_model_config(toy_ppm: tuple[Path, dict, list[dict]]) -> None:
    """`rstar.models.load_reward`, as the search calls it."""
    from rstar.config import ModelConfig
    from rstar.models import load_reward

    out, _, _ = toy_ppm
    rm = load_reward(ModelConfig(ppm=str(out), device="cpu", max_batch_size=4, engine="hf"))
    assert rm.engine is None
    batches: list[int] = []
    forward = rm.model.forward
    rm.model.forward = lambda input_ids, **kw: batches.append(len(input_ids)) or forward(input_ids, **kw)
    prompt = steps.ppm_prompt("Problem 0: what is 3 + 4 times 2?") + f"\n{steps.ASSISTANT_HEADER}"
    good = "<code>\n# Step 2: good\ny = 1\n<end_of_step>"
    bad = "<code>\n# Step 2: bad\ny = 1\n<end_of_step>"
    values = rm.score([prompt] * 9, [good, bad] * 4 + [good])
    assert batches == [4, 4, 1]  # max_batch_size reached the model
    assert values[0] > values[1]  # the trained model, not a fresh head
    direct = load_reward_model(out, device="cpu").score([prompt, prompt], [good, bad])
    assert values[:2] == pytest.approx(direct, abs=1e-5)
    assert load_reward(ModelConfig(ppm="")) is None
    # the config's engine setting reaches the reward model (the default, auto: the CPU engine)
    fast = load_reward(ModelConfig(ppm=str(out), device="cpu", max_batch_size=4, prefix_cache_mb=3))
    assert fast.engine is not None and fast.engine.cache.max_bytes == 3 << 20
    assert fast.score([prompt, prompt], [good, bad]) == pytest.approx(direct, abs=1e-5)


def test_a_step_longer_than_max_length_keeps_its_end(toy_ppm: tuple[Path, dict, list[dict]]) -> None:
    """A step alone longer than the limit: its own beginning is cut, its last tokens (which the
    head reads) stay, and the value is that of the kept tokens."""
    out, _, recs = toy_ppm
    rm = HFRewardModel(out, device="cpu", max_length=32)
    step = "<code>\n" + "".join(f"# filler line {i}\n" for i in range(40)) + "# Step 2: good\n<end_of_step>"
    step_ids = rm.tokenizer(step, add_special_tokens=False)["input_ids"]
    assert len(step_ids) > 2 * rm.max_length
    ids = encode(rm.tokenizer, recs[0]["prompt"] + step, rm.max_length)
    assert ids == step_ids[-rm.max_length :]
    (v,) = rm.score([recs[0]["prompt"]], [step])
    (w,) = rm.score(["another prompt entirely"], [step])
    assert v == pytest.approx(w, abs=1e-5)
    assert rm.score_texts([rm.tokenizer.decode(ids)])[0] == pytest.approx(v, abs=1e-5)
    assert rm.texts_scored == 3 and rm.calls == 3 and rm.tokens_scored == 3 * rm.max_length


def test_encode_keeps_a_leading_bos(toy_ppm: tuple[Path, dict, list[dict]]) -> None:
    """For tokenizers that add a BOS (Qwen's does not), the cut keeps it in front."""

    class WithBos:
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=True, verbose=False):
            return {"input_ids": [1] + [10 + i for i in range(len(text))]}

    assert encode(WithBos(), "abcdef", 4) == [1, 13, 14, 15]
    assert encode(WithBos(), "ab", 4) == [1, 10, 11]
    assert encode(WithBos(), "abc", 4) == [1, 10, 11, 12]

    class BosNotAdded(WithBos):  # a BOS token this tokenizer does not put in front
        def __call__(self, text, add_special_tokens=True, verbose=False):
            return {"input_ids": [10 + i for i in range(len(text))]}

    assert encode(BosNotAdded(), "abcdef", 4) == [12, 13, 14, 15]


def test_prefixes_and_steps_must_pair_up(toy_ppm: tuple[Path, dict, list[dict]]) -> None:
    rm = load_reward_model(toy_ppm[0], device="cpu")
    with pytest.raises(ValueError, match="2 prefixes but 1 steps"):
        rm.score(["a", "b"], ["c"])
    assert rm.calls == 0


def test_init_reward_model_checks_the_kind_and_gives_a_tokenizer_a_pad(
    tiny_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from rstar.models.ppm import init_reward_model

    with pytest.raises(RstarError, match="reward model kind 'prm': expected one of ppm, orm, pqm"):
        init_reward_model(tiny_dir, kind="prm")
    # a policy whose tokenizer has no pad token: the reward model pads with EOS
    import shutil

    nopad = tmp_path / "nopad"
    shutil.copytree(tiny_dir, nopad)
    tok = AutoTokenizer.from_pretrained(nopad)
    tok.pad_token = None
    tok.save_pretrained(nopad)
    assert AutoTokenizer.from_pretrained(nopad).pad_token_id is None
    model, tok = init_reward_model(nopad, kind="pqm", max_length=99)
    assert tok.pad_token_id == tok.eos_token_id == model.config.pad_token_id
    assert model.config.rstar_reward == {"kind": "pqm", "activation": "tanh", "max_length": 99}
    assert not model.score.weight.detach().any()  # the head starts at tanh(0) = 0


def test_load_reward_model_defaults(toy_ppm: tuple[Path, dict, list[dict]]) -> None:
    rm = load_reward_model(toy_ppm[0])
    assert rm.max_batch_size == 64 and rm.kind == "ppm"


def test_pad_right_keeps_every_row_at_its_positions() -> None:
    from rstar.models.ppm import pad_right

    ids, mask = pad_right([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_a_reward_model_object_needs_its_record_and_tanh(tiny_dir: Path) -> None:
    from rstar.models.ppm import init_reward_model

    model, tok = init_reward_model(tiny_dir, kind="orm", max_length=50)
    rm = HFRewardModel(model, tokenizer=tok, device="cpu")
    assert (rm.kind, rm.max_length) == ("orm", 50) and rm.score(["a"], ["b"]) == [0.0]  # zero head
    del model.config.rstar_reward["kind"]  # an older record: a PPM
    assert HFRewardModel(model, tokenizer=tok, device="cpu").kind == "ppm"
    model.config.rstar_reward["activation"] = "sigmoid"
    with pytest.raises(RstarError, match="reward model activation 'sigmoid': only 'tanh' is supported"):
        HFRewardModel(model, tokenizer=tok, device="cpu")
    del model.config.rstar_reward["activation"]  # tanh unless said otherwise
    assert HFRewardModel(model, tokenizer=tok, device="cpu").kind == "ppm"
    del model.config.rstar_reward
    with pytest.raises(
        ValueError, match="the model's config has no 'rstar_reward': build it with init_reward_model"
    ):
        HFRewardModel(model, tokenizer=tok, device="cpu")


def test_defaults_dtype_and_pad_token_of_a_reward_model(tiny_dir: Path, toy_ppm) -> None:
    from rstar.models.hf import resolve_device
    from rstar.models.ppm import init_reward_model

    model, tok = init_reward_model(tiny_dir)  # a PPM unless told otherwise
    assert model.config.rstar_reward["kind"] == "ppm" and model.dtype == torch.float32
    assert init_reward_model(tiny_dir, dtype=torch.bfloat16)[0].dtype == torch.bfloat16
    # a model object needs its tokenizer; the error names the class
    with pytest.raises(ValueError, match=r"^HFRewardModel\(model=<PreTrainedModel>\) needs tokenizer=$"):
        HFRewardModel(model, device="cpu")
    # a tokenizer without a pad token pads with EOS ...
    tok.pad_token = None
    rm = HFRewardModel(model, tokenizer=tok, device="cpu")
    assert rm.pad_id == tok.eos_token_id == model.config.pad_token_id
    assert rm.score(["a", "a longer prefix"], ["b", "c"]) == [0.0, 0.0]  # zero head, padded batch
    # ... and one with a pad token keeps it (the tiny tokenizer's is not EOS)
    rm = HFRewardModel(toy_ppm[0])  # device "auto", batches of 64
    assert rm.tokenizer.pad_token == "<|pad|>" and rm.pad_id != rm.tokenizer.eos_token_id
    assert rm.pad_id == rm.tokenizer.pad_token_id == rm.model.config.pad_token_id
    assert (rm.device, rm.max_batch_size) == (resolve_device("auto"), 64)


def test_load_reward_model_passes_its_settings_on(monkeypatch) -> None:
    import rstar.models.ppm as ppm

    seen = {}
    monkeypatch.setattr(ppm, "HFRewardModel", lambda path, **kw: seen.update(path=path, **kw) or "rm")
    assert ppm.load_reward_model("dir", device="cuda:1", dtype="float16", max_batch_size=7) == "rm"
    assert seen == {
        "path": "dir",
        "device": "cuda:1",
        "dtype": "float16",
        "max_batch_size": 7,
        "engine": "hf",
        "prefix_cache_mb": 256,
    }
    seen.clear()
    ppm.load_reward_model("dir", engine="auto", prefix_cache_mb=5)
    assert (seen["engine"], seen["prefix_cache_mb"]) == ("auto", 5)


def test_the_engine_scores_like_one_forward_a_text_and_encodes_only_what_is_new(
    toy_ppm: tuple[Path, dict, list[dict]],
) -> None:
    """With `engine="fast"` a text that extends one scored before (a child node's text starts
    with its parent's) is encoded from where the cached one ends, and every value is the one
    the reference path (one forward of the whole text) gives."""
    out, _, recs = toy_ppm
    ref = HFRewardModel(out, device="cpu")
    rm = HFRewardModel(out, device="cpu", engine="fast", max_batch_size=3)
    parents = [r["prompt"] + r["pos"] for r in recs[:4]]
    kids = [
        "\n\n# Step 3: good\nz = 1\n<end_of_step>",
        "\n\n# Step 3: bad\nz = 2\n<end_of_step>",
        "\n\n# Step 3: a much longer step than the others, good or bad\nz = 3\n<end_of_step>",
    ]
    first = rm.score_texts(parents)
    assert first == pytest.approx(ref.score_texts(parents), abs=1e-5)
    assert rm.tokens_scored == ref.tokens_scored  # nothing cached yet: every token encoded
    assert len(set(round(v, 4) for v in first)) > 1

    children = [p + k for p in parents for k in kids]
    encoded, tokens_before = rm.engine.prefix_tokens_encoded, ref.tokens_scored
    values = rm.score_texts(children)
    assert values == pytest.approx(ref.score_texts(children), abs=1e-5)
    new_tokens = rm.engine.prefix_tokens_encoded - encoded
    steps_only = sum(
        len(encode(rm.tokenizer, c, rm.max_length)) - len(encode(rm.tokenizer, p, rm.max_length))
        for p in parents
        for c in [p + k for k in kids]
    )
    assert rm.tokens_scored == rm.engine.prefix_tokens_encoded  # the counter says what ran
    # at most the steps' tokens (and one boundary token each) ran through the model: fewer
    # where a sibling scored in an earlier batch shares the step's first tokens too
    assert 0 < new_tokens <= steps_only + len(children)
    assert new_tokens < (ref.tokens_scored - tokens_before) / 4
    assert rm.texts_scored == len(parents) + len(children) and rm.calls == 2
    # a text scored before: only its last token runs again (the head needs its hidden state)
    encoded = rm.engine.prefix_tokens_encoded
    assert rm.score_texts(children) == pytest.approx(values, abs=1e-6)
    assert rm.engine.prefix_tokens_encoded - encoded == len(children)
    # a text cut from the left (longer than max_length) shares no cached prefix: still exact
    short = HFRewardModel(out, device="cpu", engine="fast", max_length=24)
    long = [parents[0] + kids[0], parents[1] + kids[2]]
    assert short.score_texts(long) == pytest.approx(
        HFRewardModel(out, device="cpu", max_length=24).score_texts(long), abs=1e-5
    )
    assert rm.score_texts([]) == []


def test_reward_engine_settings_are_checked(toy_ppm: tuple[Path, dict, list[dict]]) -> None:
    with pytest.raises(ValueError, match="engine must be 'auto', 'hf' or 'fast', got 'gpu'"):
        HFRewardModel(toy_ppm[0], device="cpu", engine="gpu")
    assert HFRewardModel(toy_ppm[0], device="cpu", engine="hf").engine is None
    assert HFRewardModel(toy_ppm[0], device="cpu", engine="auto").engine is not None
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(toy_ppm[0])
    tok = AutoTokenizer.from_pretrained(toy_ppm[0])
    model.config.use_sliding_window = True  # attention the engine does not implement
    with pytest.raises(ValueError, match="engine='fast' cannot run this reward model: sliding-window"):
        HFRewardModel(model, tokenizer=tok, device="cpu", engine="fast")
    assert HFRewardModel(model, tokenizer=tok, device="cpu", engine="auto").engine is None  # falls back


def test_score_texts_moves_the_batch_and_its_mask_to_the_device_and_times_the_model(
    toy_ppm, monkeypatch
) -> None:
    """The model gets each padded batch with its attention mask, both on the model's device;
    `model_seconds` adds up the time spent in the model, starting from zero."""
    from types import SimpleNamespace

    import rstar.models.ppm as ppm

    rm = load_reward_model(toy_ppm[0], device="cpu", max_batch_size=2)
    assert rm.model_seconds == 0.0
    seen = []

    def model(input_ids, attention_mask):
        seen.append((input_ids.device.type, attention_mask.device.type, tuple(attention_mask.shape)))
        return SimpleNamespace(logits=torch.zeros(len(input_ids), 1))

    clock = iter(range(100))
    monkeypatch.setattr(ppm, "time", SimpleNamespace(perf_counter=lambda: 10.0 * next(clock)))
    rm.model, rm.device = model, torch.device("meta")
    longest = len(encode(rm.tokenizer, "a b c", rm.max_length))
    assert rm.score_texts(["a b c", "a"]) == [0.0, 0.0]
    assert seen == [("meta", "meta", (2, longest))]  # one batch, padded to its longest text
    assert rm.tokens_scored == longest + len(encode(rm.tokenizer, "a", rm.max_length))
    assert rm.model_seconds == 10.0  # one perf_counter pair around the forward passes
    rm.score_texts(["a"])
    assert rm.model_seconds == 20.0


def test_the_engine_path_adds_up_the_model_time(toy_ppm, monkeypatch) -> None:
    """Through the engine too, `model_seconds` is a running total: one perf_counter pair per
    call, added to what earlier calls spent."""
    from types import SimpleNamespace

    import rstar.models.ppm as ppm

    rm = HFRewardModel(toy_ppm[0], device="cpu", engine="fast")
    clock = iter(range(100))
    monkeypatch.setattr(ppm, "time", SimpleNamespace(perf_counter=lambda: 10.0 * next(clock)))
    rm.score_texts(["a b c", "a"])
    assert rm.model_seconds == 10.0
    rm.score_texts(["a b c d"])
    assert rm.model_seconds == 20.0


# --- the implicit reward (a DPO-trained policy scored against its reference) -----------------


def test_implicit_reward_learns_the_preference_and_scores_like_its_training(
    toy_implicit: tuple[Path, dict], tiny_dir: Path
) -> None:
    from helpers.toy_ppm import toy_pairs
    from rstar.models.ppm import ImplicitRewardModel

    out, metrics = toy_implicit
    assert metrics["kind"] == "implicit" and metrics["heldout_accuracy"] >= 0.9, metrics
    info = json.loads((out / "config.json").read_text())["rstar_reward"]
    assert info["kind"] == "implicit" and Path(info["reference"]) == tiny_dir.resolve()
    assert json.loads((out / "rstar_training.json").read_text())["metrics"] == metrics
    scorer = load_reward_model(out, max_batch_size=3)  # what the search loads
    assert isinstance(scorer, ImplicitRewardModel) and scorer.beta == 0.05
    fresh = toy_pairs(8, seed=1)  # problems it never saw
    good = scorer.score([r["prompt"] for r in fresh], [r["pos"] for r in fresh])
    bad = scorer.score([r["prompt"] for r in fresh], [r["neg"] for r in fresh])
    assert sum(g > b for g, b in zip(good, bad)) >= 7, (good, bad)
    # the value is tanh(beta x summed log ratio), the same number batched or alone
    ratios = scorer.log_ratios([r["prompt"] + r["pos"] for r in fresh])
    assert good == pytest.approx([math.tanh(0.05 * x) for x in ratios], abs=1e-9)
    alone = [scorer.score([r["prompt"]], [r["pos"]])[0] for r in fresh]
    assert alone == pytest.approx(good, abs=1e-5)
    # only the response's tokens count: they start where the prompt's own tokens end (TRL's
    # DPO split), and a cut from the left keeps the end and moves that start with it
    text = fresh[0]["prompt"] + fresh[0]["pos"]
    ids, first = split_ids(scorer.tokenizer, text, 10_000)
    prompt_ids = scorer.tokenizer(fresh[0]["prompt"], add_special_tokens=False)["input_ids"]
    assert ids[:first] == prompt_ids[:first] and first >= len(prompt_ids) - 1
    assert scorer.tokenizer.decode(ids[first:]).endswith(fresh[0]["pos"].rstrip())
    cut, cut_first = split_ids(scorer.tokenizer, text, len(ids) - 5)
    assert cut == ids[5:] and cut_first == first - 5


def test_implicit_log_ratio_is_the_sum_over_the_response_tokens(toy_implicit: tuple[Path, dict]) -> None:
    """log_ratios against a direct count: for each response token t (the ids from split_ids'
    start on), log pi(t | before) - log pi_ref(t | before), one unpadded text at a time; texts
    of different lengths batched together give the same sums, and the scored-token counter
    counts every token of every text."""
    from helpers.toy_ppm import toy_pairs
    from rstar.models.ppm import ImplicitRewardModel

    out, _ = toy_implicit
    scorer = load_reward_model(out, max_batch_size=4)
    assert isinstance(scorer, ImplicitRewardModel)
    rows = toy_pairs(5, seed=3)
    texts = [r["prompt"] + r["pos"] for r in rows] + [rows[0]["prompt"] + rows[1]["neg"] + " x = 1"]
    want = []
    with torch.inference_mode():
        for text in texts:
            ids, first = split_ids(scorer.tokenizer, text, scorer.max_length)
            x = torch.tensor([ids])
            lp = [m(input_ids=x).logits[0].float().log_softmax(-1) for m in (scorer.model, scorer.reference)]
            want.append(
                sum(
                    float(lp[0][t - 1, ids[t]] - lp[1][t - 1, ids[t]]) for t in range(max(first, 1), len(ids))
                )
            )
    assert (
        len({len(split_ids(scorer.tokenizer, t, scorer.max_length)[0]) for t in texts}) > 1
    )  # padding happens
    before = scorer.tokens_scored
    got = scorer.log_ratios(texts)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-3)
    assert all(abs(w) > 1e-2 for w in want)  # the sums are not trivially zero
    assert scorer.tokens_scored - before == sum(
        len(split_ids(scorer.tokenizer, t, scorer.max_length)[0]) for t in texts
    )


def test_implicit_reward_needs_its_reference(toy_implicit: tuple[Path, dict], tmp_path: Path) -> None:
    import shutil

    out, _ = toy_implicit
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["rstar_reward"]["reference"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RstarError, match="reference policy"):
        load_reward_model(moved)
    with pytest.raises(RstarError, match="--kind 'dpo'"):
        train_reward([], out, tmp_path / "x", TOY_CFG, kind="dpo")
