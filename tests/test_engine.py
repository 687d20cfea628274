"""The CPU decode engine (`rstar.models.engine`) against HF `generate`, its reference.

Real tiny Qwen2 models built in a temporary directory: a random one (long, stop-free
continuations) and one that memorised a short step-format text (known stops).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import RSTAR_FORMAT
from helpers.memorise import REPEAT_HEADER as HEADER
from helpers.memorise import REPEAT_STEP as STEP
from rstar import steps
from rstar.models.base import GenRequest
from rstar.models.engine import PrefixCache, sample_tokens, uniforms
from rstar.models.hf import HFPolicy

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def trained(repeat_memorised):
    # Greedy decoding goes on with STEP after the header and after every STEP (conftest).
    return repeat_memorised


def prompts() -> list[str]:
    examples = json.loads((RSTAR_FORMAT / "sft_data_examples.json").read_text())
    return [HEADER, "x", HEADER + STEP * 2, HEADER + STEP] + [
        steps.sft_prompt(e["query"]) + e["response"][: 40 * i] for i, e in enumerate(examples[:6])
    ]


def outs(policy: HFPolicy, reqs: list[GenRequest]) -> list[list[tuple]]:
    return [[(c.text, c.stop_reason, c.n_tokens) for c in cs] for cs in policy.generate(reqs)]


@pytest.mark.parametrize("stops", [steps.STOP_STRINGS, ["x + 1", "zzz"], []])
def test_greedy_equals_hf_generate(trained, stops) -> None:
    """Single-token stops, a stop string of several tokens (text tails), no stops (length);
    several n, max_new_tokens and prompt lengths in one call, rows retiring at different steps."""
    model, tok = trained
    reqs = [
        GenRequest(p, n=1 + i % 3, max_new_tokens=30 - 6 * (i % 4), temperature=0.0, stop=list(stops))
        for i, p in enumerate(prompts())
    ]
    ref = outs(HFPolicy(model, tokenizer=tok, engine="hf", max_batch_size=64), reqs)
    fast = HFPolicy(model, tokenizer=tok, engine="fast")
    assert fast.engine is not None
    assert outs(fast, reqs) == ref
    if stops == steps.STOP_STRINGS:
        assert ref[0][0] == (STEP, "stop", len(tok.encode(STEP, add_special_tokens=False)))
    if stops and stops[0] == "x + 1":
        assert ref[0][0][:2] == ("\n\n# add one\nx = x + 1", "stop")


def test_a_bfloat16_model_decodes_as_hf_generate_does(trained) -> None:
    """`model.dtype: bfloat16` on CPU: the engine's KV, attention and forward run in the
    model's dtype (the attention kernel's fp32 log-sum-exp included) and its greedy output
    is HF generate's on the memorised model, whose next tokens win by wide margins."""
    import copy

    model, tok = trained
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    reqs = [
        GenRequest(p, n=1, max_new_tokens=24, temperature=0.0, stop=steps.STOP_STRINGS) for p in prompts()[:4]
    ]
    ref = outs(HFPolicy(bf16, tokenizer=tok, engine="hf"), reqs)
    fast = HFPolicy(bf16, tokenizer=tok, engine="fast")
    assert fast.engine is not None and fast.engine.dtype == torch.bfloat16
    assert outs(fast, reqs) == ref
    assert ref[0][0][:2] == (STEP, "stop")


def test_continuous_batching_and_prefix_cache_change_nothing_greedy(tiny_dir: Path, monkeypatch) -> None:
    """A random model (long continuations): few live rows (requests wait and join as rows
    finish), the prefix cache on/off, and the written-out softmax in place of torch's fused
    attention kernel (a torch without it) give HF generate's greedy output."""
    from rstar.models import engine

    reqs = [
        GenRequest(p, n=2, max_new_tokens=6 + 3 * (i % 5), temperature=0.0, stop=steps.STOP_STRINGS)
        for i, p in enumerate(prompts())
    ]
    ref = outs(HFPolicy(tiny_dir, engine="hf"), reqs)
    small = HFPolicy(tiny_dir, engine="fast", prefix_cache_mb=0)
    small.engine.max_rows = 3
    assert outs(small, reqs) == ref
    with monkeypatch.context() as m:
        m.setattr(engine, "_FLASH", None)
        assert outs(HFPolicy(tiny_dir, engine="fast"), reqs) == ref
    assert small.engine.cache.hits == 0
    cached = HFPolicy(tiny_dir, engine="fast", prefix_cache_mb=64)
    assert outs(cached, reqs) == ref
    # A second call: every prompt and each sample's prompt + step is in the cache now.
    deeper = [
        GenRequest(r.prompt + c[0][0], n=1, max_new_tokens=5, temperature=0.0) for r, c in zip(reqs, ref)
    ]
    before = cached.engine.prefix_tokens_encoded
    assert outs(cached, deeper) == outs(HFPolicy(tiny_dir, engine="hf"), deeper)
    assert cached.engine.cache.hits > 0 and cached.engine.prefix_tokens_encoded - before < 3 * len(deeper)


def test_seeded_samples_do_not_depend_on_batch_mates(tiny_dir: Path) -> None:
    """Also the engine's buffers kept from call to call: the lone request below runs in group
    slot 0, where the call before left the longest prompt's KV (masked, never read)."""
    policy = HFPolicy(tiny_dir, engine="fast")
    ps = prompts()
    reqs = [
        GenRequest(p, n=3, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=i) for i, p in enumerate(ps)
    ]
    together = outs(policy, reqs)
    assert together == outs(policy, reqs[::-1])[::-1]
    assert together[2] == outs(policy, [reqs[2]])[0]
    assert len({c for cs in together for c in cs}) > len(ps)  # samples differ
    other = outs(policy, [GenRequest(ps[2], n=3, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=99)])
    assert other[0] != together[2]
    # per-request settings in one call: a tiny top_p keeps only the top token = greedy
    mixed = [
        GenRequest(ps[0], n=2, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=1),
        GenRequest(ps[0], n=1, max_new_tokens=10, temperature=0.0),
    ]
    m = outs(policy, mixed)
    assert m[0] == [m[1][0]] * 2


def test_max_new_tokens_and_empty_calls(tiny_dir: Path) -> None:
    policy = HFPolicy(tiny_dir, engine="fast", max_new_tokens_cap=4)
    out = policy.generate(
        [GenRequest("x", n=2, max_new_tokens=50, temperature=0.0), GenRequest("y", n=1, max_new_tokens=0)]
    )
    assert [c.n_tokens for c in out[0]] == [4, 4] and out[0][0].stop_reason == "length"
    assert (out[1][0].text, out[1][0].stop_reason) == ("", "length")
    assert policy.generate([]) == [] and policy.tokens_generated == 8


def test_engine_is_chosen_for_qwen2_on_cpu_only(tiny_dir: Path) -> None:
    assert HFPolicy(tiny_dir, device="cpu").engine is not None
    assert HFPolicy(tiny_dir, device="cpu", engine="hf").engine is None
    with pytest.raises(ValueError):
        HFPolicy(tiny_dir, engine="nope")


def test_sampling_top_p_and_temperature() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 4000))
    keys = torch.arange(4000, dtype=torch.long) * 7919
    u = uniforms(keys, torch.zeros(4000, dtype=torch.long))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.03
    ones = torch.ones(4000)
    tok = sample_tokens(logits, ones, ones, u)
    freq = torch.bincount(tok, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)
    tok = sample_tokens(logits, ones, torch.full((4000,), 0.7), u)  # top-p 0.7: {0, 1}
    freq = torch.bincount(tok, minlength=3).float() / 4000
    assert freq[2] == 0 and abs(float(freq[0]) - 0.625) < 0.03
    assert sample_tokens(logits, torch.zeros(4000), ones, u).eq(0).all()  # greedy


def test_prefix_cache_longest_prefix_and_lru() -> None:
    kv = lambda n: [torch.full((2, n, 4), float(n))]  # noqa: E731 - one layer, 2 heads, dim 4
    cache = PrefixCache(max_bytes=2 * 2 * 40 * 4 * 4)  # room for 80 tokens of k + v
    a = list(range(40))
    cache.insert(a, kv(40), kv(40))
    entry, n = cache.lookup(a + [7, 8], limit=41)
    assert n == 40 and entry.ids == tuple(a)
    entry, n = cache.lookup(a[:35] + [999] * 10, limit=44)
    assert n == 35  # the 16-token blocks find it, the token comparison ends the match
    entry, n = cache.lookup(a, limit=39)
    assert n == 39  # a prompt leaves at least one token to encode
    assert cache.lookup([5] * 40, limit=39) == (None, 0)
    cache.insert(list(range(100, 140)), kv(40), kv(40))
    cache.insert(list(range(200, 240)), kv(40), kv(40))  # over the bound: the oldest goes
    assert tuple(a) not in cache.entries and cache.nbytes <= cache.max_bytes
    assert cache.lookup(a + [1], limit=41) == (None, 0)


# --- searches ------------------------------------------------------------------------------


def run_search(cfg, backends, probs) -> list:
    from rstar.search.expand import derive_seed
    from rstar.search.scheduler import Job, run_jobs

    done = []
    jobs = [Job(problem=p, seed=derive_seed(cfg.search.seed, p.id, 0)) for p in probs]

    def on_error(job, tb):
        raise AssertionError(tb)

    run_jobs(jobs, cfg, backends, lambda j, t, i: done.append((j.key, t.to_dict())), on_error)
    return sorted(done, key=lambda x: x[0])


def test_greedy_search_trees_are_the_same_with_the_engine_and_kv_reuse_on_and_off(trained, sandbox) -> None:
    """MCTS at temperature 0 on the memorised policy (it writes `x = x + 1` steps until the
    depth limit): HF generate, the engine without and with the prefix cache, give one tree."""
    from rstar.config import load_config
    from rstar.data.problems import Problem
    from rstar.search.scheduler import Backends

    model, tok = trained
    cfg = load_config(
        "round2",
        overrides=["search.rollouts=3", "search.num_samples=2", "search.max_depth=5", "search.temperature=0"],
    )
    probs = [Problem(id=f"p{i}", question=q, answer="3") for i, q in enumerate(["Count up.", "Count up!"])]
    trees = {}
    for name, kw in {
        "hf": dict(engine="hf"),
        "fast": dict(engine="fast", prefix_cache_mb=0),
        "cached": dict(engine="fast", prefix_cache_mb=64),
    }.items():
        policy = HFPolicy(model, tokenizer=tok, **kw)
        trees[name] = run_search(cfg, Backends(policy=policy, sandbox=sandbox), probs)
        if name == "cached":
            assert policy.engine.cache.hits > 0
    assert trees["fast"] == trees["hf"] and trees["cached"] == trees["hf"]
    assert max(n["depth"] for n in trees["hf"][0][1]["nodes"]) >= 3  # a real multi-step tree


def test_parallel_rollouts_finish_and_undo_their_virtual_loss(sandbox) -> None:
    """Virtual loss is taken back: each open node's N counts exactly the answers below it."""
    import dataclasses

    from rstar.config import load_config
    from rstar.data.problems import Problem
    from rstar.grading import Grader
    from rstar.search.scheduler import Backends
    from rstar.search.tree import ANSWER, Tree
    from scripted import ScriptedPolicy

    cfg = load_config("round2", overrides=["search.rollouts=6", "search.num_samples=3"])
    probs = [
        Problem(id=f"add:{i}", question=f"What is {10 + i} + {20 + i}?", answer=str(30 + 2 * i))
        for i in range(3)
    ]
    with Grader(timeout_s=5) as grader:
        for k in (1, 3):
            pcfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, parallel_rollouts=k))
            done = run_search(pcfg, Backends(policy=ScriptedPolicy(), sandbox=sandbox, grader=grader), probs)
            assert len(done) == len(probs)
            for _, d in done:
                tree = Tree.from_dict(d)
                for node in tree.nodes:
                    if node.is_terminal:
                        continue
                    below, todo = 0, list(node.children)
                    while todo:
                        c = tree.nodes[todo.pop()]
                        below += c.terminal == ANSWER
                        todo.extend(c.children)
                    assert node.N == below, (k, node.id)
                assert tree.answers()


def test_the_written_out_forward_is_transformers_forward_and_follows_weight_changes() -> None:
    """`DecodeEngine._forward` writes Qwen2's forward out: last-token hidden states equal
    transformers' own forward on a random Qwen2 with grouped KV heads and scaled rotary
    embeddings (linear rope), a prefix read from the cache included. After a weight changes in
    place or is replaced, the engine reads the new weights and its prefix cache forgets the KV
    computed with the old ones."""
    from types import SimpleNamespace

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rstar.models.engine import DecodeEngine, supports

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=50,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
    )
    model = Qwen2ForCausalLM(cfg).eval()
    assert supports(model, torch.device("cpu")) is None
    engine = DecodeEngine(model, SimpleNamespace(pad_token_id=0), eos_ids=[1])
    seqs = [[int(t) for t in torch.randint(2, 50, (n,))] for n in (9, 30, 17)]
    longer = [seqs[1] + [5, 6, 7]]  # its first 30 tokens' KV comes from the prefix cache

    def reference(batch: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([model.model(torch.tensor([s])).last_hidden_state[0, -1] for s in batch])

    def check() -> int:
        """Compare both calls with transformers; prompt tokens the second read from the cache."""
        assert torch.allclose(engine.encode_last(seqs), reference(seqs), atol=1e-5)
        reused = engine.prefix_tokens_reused
        assert torch.allclose(engine.encode_last(longer), reference(longer), atol=1e-5)
        return engine.prefix_tokens_reused - reused

    assert check() == 30
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(3.0)
        model.model.layers[0].self_attn.k_proj.bias.add_(0.5)
    engine.reset_counters()
    first = engine.encode_last(seqs)  # all new: the cache was cleared
    assert engine.prefix_tokens_reused == 0 and torch.allclose(first, reference(seqs), atol=1e-5)
    model.model.layers[2].mlp.down_proj.weight = torch.nn.Parameter(torch.zeros(64, 96))
    assert check() == 30  # cleared again at the new weights' first forward, then reused

    # what it does not write out stays on HF generate
    gelu = Qwen2ForCausalLM(Qwen2Config(**{**cfg.to_dict(), "hidden_act": "gelu"}))
    assert "hidden_act" in supports(gelu, torch.device("cpu"))
    attn = model.model.layers[0].self_attn
    attn.q_proj = torch.nn.Sequential(attn.q_proj)
    assert "plain torch Linear" in supports(model, torch.device("cpu"))
