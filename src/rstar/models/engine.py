"""A CPU decode engine for small Qwen2 policies: shared prompt KV, continuous batching, a prefix cache.

`HFPolicy` uses it automatically for supported models on CPU (`engine="auto"`); HF
`model.generate` stays the reference and the path for everything else. Measurements:
docs/EXPERIMENTS.md, "Search speed (issue 18)"; where the cache lives: docs/ARCHITECTURE.md.

Why a hand-written scheduling loop. On CPU, with the tiny policies of this project, reading
the KV cache dominates a decode step, and a search sends many prompts with n samples each
whose steps end at very different lengths. Among the libraries kept here none does the
three things that matter: vLLM (prefix caching, continuous batching) has no CPU build here;
llama.cpp was measured slower than a loop like this one on this kind of machine (1.31x HF
generate against 2.32x); HF `generate` keeps finished rows in the batch until the longest ends
(39-51% of its row-steps produce a token) and copies a prompt's KV once per sample.
(transformers' own continuous batching, `generate_batch` with paged attention, was not
evaluated here; its asynchronous path lists only CUDA and XPU devices.)

Why the Qwen2 forward is written out (`DecodeEngine._forward`) rather than called through
transformers' modules with the attention plugged in: at these sizes a decode step is a few
dozen small ops, and the module plumbing (hooks, keyword routing, per-call rotary tables)
and five separate projections took about a tenth of a round-1 search's model time
(docs/EXPERIMENTS.md, "Search speed"). Written out, q/k/v are one
matmul and gate/up another, over the model's own weights (read from its modules, re-read
and the prefix cache cleared when a parameter changes), with its own rotary module and
`torch.rms_norm`; a test holds it to transformers' forward, and `supports` sends every other
model (other architectures, activations, quantised or adapted layers) to HF generate.

Data layout (per layer; Hkv = KV heads, D = head dim):
- a *group* is a request's prompt (or up to `width` of its samples): its KV is stored once,
  `gk/gv` (G, Hkv, P, D), valid up to `glen[g]`; its samples read it once per step through
  one matmul for the whole group (this is what "share the prompt's KV" buys: a step reads
  G x P instead of rows x P);
- a *row* is one sample j of group g; the KV of its generated tokens is in `sk/sv`
  (G, Hkv, W, S, D), valid up to `slen[g * W + j]`;
- a decode step runs the model on live rows only (finished rows retire at once), and freed
  room is filled from the waiting requests (their prompts are prefilled in batches).

Prefix cache (`PrefixCache`): KV of token-id sequences already encoded (prompts, and each
finished sample's prompt + generated tokens), looked up by the longest common token prefix
(vLLM's automatic prefix caching, without its blocks: entries are whole sequences, indexed
by a hash chain over 16-token blocks); bounded in bytes, least recently used out first.
A search's child node's prompt is its parent's prompt + the parent's step, so its prefill
encodes only the few tokens after the cached part.

Sampling: per-row temperature and top-p; each row's random numbers come from a counter-based
hash of (request seed, sample index, step), so a seeded request's samples do not depend on
what it was batched with (HF `generate` draws from one generator per batch).

Why one file of this length: the decode loop, its KV layout, the forward and attention that
read it and the prefix cache index the same slots, and each is wrong without the others.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rstar.models.base import Completion, GenRequest, first_stop

# Model types whose forward `DecodeEngine._forward` writes out (others use HF generate).
SUPPORTED_MODEL_TYPES = ("qwen2",)
_BLOCK = 16  # tokens per hash-chain block of the prefix cache index

_M64 = (1 << 64) - 1
# torch's fused CPU attention kernel, which also returns each row's log-sum-exp: the decode
# attention combines a softmax over the group KV with one over the row's own tokens, so it
# needs the log-sum-exp that `scaled_dot_product_attention` does not return. About 2x the
# written-out softmax on a decode step's group part (measured on the round-1 layout).
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def supports(model: Any, device: torch.device) -> str | None:
    """None if the engine can run `model` on `device`, else the reason it cannot."""
    cfg = model.config
    if device.type != "cpu":
        return f"device {device.type} (the engine is for CPU; use vLLM or HF generate on GPUs)"
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {cfg.model_type!r} not in {SUPPORTED_MODEL_TYPES}"
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ["full_attention"]):
        return "layers other than full attention"
    if cfg.hidden_act != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    if any(type(m) is not torch.nn.Linear for layer in model.model.layers for m in _projections(layer)):
        return "projections that are not plain torch Linear layers (quantised or adapted)"
    return None


def _projections(layer: Any) -> tuple[Any, ...]:
    a, mlp = layer.self_attn, layer.mlp
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj


def select_engine(
    engine: str, model: Any, tokenizer: Any, device: torch.device, what: str, **kwargs: Any
) -> DecodeEngine | None:
    """The `model.engine` setting applied to a loaded model: a `DecodeEngine` for "auto" where
    `supports` accepts the model and for "fast" (else an error naming `what`), None for "hf"
    and for "auto" where it does not. `kwargs` go to `DecodeEngine`."""
    if engine not in ("auto", "hf", "fast"):
        raise ValueError(f"engine must be 'auto', 'hf' or 'fast', got {engine!r}")
    if engine == "hf":
        return None
    why = supports(model, device)
    if why is None:
        return DecodeEngine(model, tokenizer, **kwargs)
    if engine == "fast":
        raise ValueError(f"engine='fast' cannot run this {what}: {why}")
    return None


# --- random numbers ------------------------------------------------------------------------


def _signed(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >> 63 else x


_C1, _C2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
_GOLDEN = _signed(0x9E3779B97F4A7C15)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps; shifts made logical)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _C1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _C2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def row_key(seed: int, sample: int) -> int:
    """The random stream of one sample of a seeded request."""
    x = torch.tensor([_signed(seed * 0x100000001B3 + sample * 0x9E3779B1 + 1)], dtype=torch.long)
    return int(_mix(_mix(x))[0])


def uniforms(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(B,) float64 in [0, 1): one draw per row for its `steps`-th token."""
    x = _mix(keys + (steps + 1) * _GOLDEN)
    return ((x >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Next token per row. logits (B, V); temperature, top_p (B,) (temperature 0 = greedy);
    u (B,) uniforms. Sampling is by inverse CDF over the (top-p truncated) distribution."""
    greedy = logits.argmax(dim=-1)
    hot = temperature > 0
    if not bool(hot.any()):
        return greedy
    t = torch.where(hot, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits.float() / t[:, None], dim=-1)  # (B, V)
    if bool((top_p < 1).any()):
        probs, order = probs.sort(dim=-1, descending=True)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each
        probs = probs.masked_fill(before >= top_p[:, None], 0.0)  # the top token always stays
    else:
        order = None
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    target = (u * cdf[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cdf, target, right=True)  # the first token whose cdf passes the target
    # A zero-probability token never passes it (its cdf equals its predecessor's), except past
    # the end, where rounding can put the target: take the last token with mass there.
    over = idx >= cdf.shape[1]
    if bool(over.any()):
        last = (probs > 0).long().cumsum(dim=-1).argmax(dim=-1, keepdim=True)
        idx = torch.where(over, last, idx)
    tok = idx if order is None else order.gather(1, idx)
    return torch.where(hot, tok[:, 0], greedy)


# --- prefix cache --------------------------------------------------------------------------


@dataclass
class _Entry:
    ids: tuple[int, ...]
    k: list[torch.Tensor]  # per layer (Hkv, L, D)
    v: list[torch.Tensor]
    nbytes: int
    hashes: list[int]


class PrefixCache:
    """KV of encoded token sequences, found by longest common prefix; LRU within `max_bytes`.

    Invariants: an entry's KV is exactly what the model computes for its ids from position 0
    (so any prefix of it is valid for any sequence starting with that prefix); the index maps
    the hash chain of each full 16-token block prefix to the newest entry holding it. The
    cache belongs to one model's weights: whoever changes the weights must `clear()` it.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self.index: dict[int, tuple[int, ...]] = {}
        self.nbytes = 0
        self.hits = 0
        self.lookups = 0

    def clear(self) -> None:
        self.entries.clear()
        self.index.clear()
        self.nbytes = 0

    @staticmethod
    def _chain(ids: Sequence[int]) -> list[int]:
        out, h = [], 0
        for s in range(0, len(ids) - _BLOCK + 1, _BLOCK):
            h = hash((h, tuple(ids[s : s + _BLOCK])))
            out.append(h)
        return out

    def lookup(self, ids: Sequence[int], limit: int) -> tuple[_Entry | None, int]:
        """(entry, n): the entry sharing the longest prefix with `ids`, n <= limit tokens of it."""
        self.lookups += 1
        best: _Entry | None = None
        for h in reversed(self._chain(ids[:limit])):
            key = self.index.get(h)
            if key is not None and key in self.entries:
                best = self.entries[key]
                break
        if best is None:
            return None, 0
        n, m = 0, min(limit, len(best.ids))
        while n < m and best.ids[n] == ids[n]:
            n += 1
        if n == 0:
            return None, 0
        self.entries.move_to_end(best.ids)
        self.hits += 1
        return best, n

    def insert(self, ids: Sequence[int], k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        key = tuple(ids)
        if self.max_bytes <= 0 or len(key) < _BLOCK:
            return
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        k = [x.contiguous().clone() for x in k]
        v = [x.contiguous().clone() for x in v]
        nbytes = sum(x.numel() * x.element_size() for x in k + v)
        if nbytes > self.max_bytes:
            return
        entry = _Entry(key, k, v, nbytes, self._chain(key))
        self.entries[key] = entry
        self.nbytes += nbytes
        for h in entry.hashes:
            self.index[h] = key
        while self.nbytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes
            for h in old.hashes:
                if self.index.get(h) == old.ids:
                    del self.index[h]


# --- the per-forward state the attention function reads ------------------------------------


@dataclass
class _Prefill:
    past_k: list[torch.Tensor]  # per layer (U, Hkv, C, D), zero beyond each row's past length
    past_v: list[torch.Tensor]
    mask: torch.Tensor  # (U, 1, T, C + T) bool, True = attend
    new_k: list[torch.Tensor] = field(default_factory=list)  # filled by the forward: (U, Hkv, T, D)
    new_v: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _Decode:
    engine: _Batch
    groups: torch.Tensor  # (B,) live rows' group slots
    js: torch.Tensor  # (B,) and sample slots within the group
    spos: torch.Tensor  # (B,) where each row's new token goes in its suffix KV
    G: int  # group slots in use (0..G-1)
    P: int  # the longest live prompt
    gbias: torch.Tensor  # (G, 1, 1, P) 0 / -inf over the group KV
    sbias: torch.Tensor  # (G, 1, W, 1, S) 0 / -inf over the suffix KV


def _attend(
    layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, st: Any, scale: float
) -> torch.Tensor:
    """Attention for the engine's two kinds of forward: q (B, H, T, D), k/v (B, Hkv, T, D)
    after the rotary embedding -> (B, T, H, D)."""
    if isinstance(st, _Prefill):
        st.new_k.append(k)
        st.new_v.append(v)
        keys = torch.cat([st.past_k[layer], k], dim=2)
        vals = torch.cat([st.past_v[layer], v], dim=2)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, keys, vals, attn_mask=st.mask, scale=scale, enable_gqa=True
        )  # (U, H, T, D)
        return out.transpose(1, 2)
    return st.engine.decode_attention(layer, q, k, v, st, scale)


def _softmax_part(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (..., R, D) over k/v (..., L, D) with an additive bias: (output (..., R,
    D), log-sum-exp of the scores (..., R, 1)), so that parts over disjoint keys combine."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale + bias
    m = s.amax(dim=-1, keepdim=True)
    e = torch.exp(s - m)
    den = e.sum(dim=-1, keepdim=True)
    return torch.matmul(e, v) / den, m + torch.log(den)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding as transformers' `apply_rotary_pos_emb` (rotate_half form)."""
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin


@dataclass
class _Layer:
    """One decoder layer's weights, q/k/v and gate/up concatenated (see the module doc)."""

    ln1: torch.Tensor
    wqkv: torch.Tensor  # ((H + 2 Hkv) D, h)
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    ln2: torch.Tensor
    wgu: torch.Tensor  # (2 i, h)
    wd: torch.Tensor
    scale: float


def _layers(model: Any) -> list[_Layer]:
    out = []
    for layer in model.model.layers:
        q, k, v, o, gate, up, down = _projections(layer)
        bias = None if q.bias is None else torch.cat([q.bias, k.bias, v.bias])
        out.append(
            _Layer(
                ln1=layer.input_layernorm.weight,
                wqkv=torch.cat([q.weight, k.weight, v.weight]),
                bqkv=bias,
                wo=o.weight,
                ln2=layer.post_attention_layernorm.weight,
                wgu=torch.cat([gate.weight, up.weight]),
                wd=down.weight,
                scale=layer.self_attn.scaling,
            )
        )
    return out


# --- the engine ----------------------------------------------------------------------------


@dataclass
class _Row:
    sample: int  # sample index within its request
    key: int  # random stream
    tokens: list[int] = field(default_factory=list)
    done: str = ""  # "", or the stop reason


@dataclass
class _Item:
    """Up to `width` samples of one request: one group of rows sharing the prompt's KV."""

    req: int
    samples: list[int]
    ids: list[int]
    max_new: int
    temperature: float
    top_p: float
    stops: tuple[str, ...]


class _Batch:
    """The KV buffers of `generate` calls of one width and token limit, grown as needed.

    gk/gv: per layer (G, Hkv, P, D), group g's prompt KV in [:, :, :glen[g]];
    sk/sv: per layer (G, Hkv, W, S, D), the KV of the tokens that sample j of group g generated.
    P is the allocated prompt length, not the longest live one: a slice along it would make
    the group KV non-contiguous and every matmul would copy it.
    """

    def __init__(self, engine: DecodeEngine, width: int, S: int) -> None:
        self.e = engine
        self.W = width
        self.S = S
        self.G = 0  # group slots allocated
        self.P = 0
        L, H, D, dt = engine.n_layers, engine.n_kv, engine.head_dim, engine.dtype
        self.gk = [torch.zeros(0, H, 0, D, dtype=dt) for _ in range(L)]
        self.gv = [torch.zeros(0, H, 0, D, dtype=dt) for _ in range(L)]
        self.sk = [torch.zeros(0, H, width, S, D, dtype=dt) for _ in range(L)]
        self.sv = [torch.zeros(0, H, width, S, D, dtype=dt) for _ in range(L)]
        self.glen = torch.zeros(0, dtype=torch.long)

    def ensure(self, groups: int, plen: int) -> None:
        """Room for `groups` group slots and prompts of `plen` tokens (zero-filled: masked
        positions must hold finite numbers, since 0 x NaN is NaN)."""
        G = max(self.G, groups if groups <= self.G else max(groups, 2 * self.G))
        P = max(self.P, plen if plen <= self.P else -(-max(plen, int(self.P * 1.25)) // 32) * 32)
        if G == self.G and P == self.P:
            return
        e = self.e
        for lst in (self.gk, self.gv):
            for i, x in enumerate(lst):
                y = torch.zeros(G, e.n_kv, P, e.head_dim, dtype=e.dtype)
                y[: self.G, :, : self.P] = x
                lst[i] = y
        for lst in (self.sk, self.sv):
            for i, x in enumerate(lst):
                y = torch.zeros(G, e.n_kv, self.W, self.S, e.head_dim, dtype=e.dtype)
                y[: self.G] = x
                lst[i] = y
        glen = torch.zeros(G, dtype=torch.long)
        glen[: self.G] = self.glen
        self.glen, self.G, self.P = glen, G, P

    def decode_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, st: _Decode, scale: float
    ) -> torch.Tensor:
        """q (B, H, 1, D), k/v (B, Hkv, 1, D) for one new token per live row -> (B, 1, H, D).

        Computed in slot space (G groups x W samples; dead slots compute garbage that is never
        read), as two softmax parts combined by their log-sum-exps, so that the group KV is
        never copied per sample: the W*rep queries of a group and KV head against the group
        KV (P keys, read once per group: torch's fused kernel where it has one), and each
        sample's rep queries against its own S generated tokens."""
        B, H, _, D = q.shape
        Hkv, W, G, P = k.shape[1], self.W, st.G, st.P
        rep = H // Hkv
        g, j = st.groups, st.js
        sk, sv = self.sk[layer][:G], self.sv[layer][:G]
        sk[g, :, j, st.spos] = k[:, :, 0]
        sv[g, :, j, st.spos] = v[:, :, 0]
        qs = q.new_zeros(G, Hkv, W, rep, D)
        qs[g, :, j] = q.reshape(B, Hkv, rep, D)
        # (slicing P keeps each (P, D) matrix contiguous: neither kernel copies it)
        gk, gv = self.gk[layer][:G, :, :P], self.gv[layer][:G, :, :P]
        R = W * rep
        if _FLASH is not None:  # heads folded into the batch: (G*Hkv, 1, R, D) against (G*Hkv, 1, P, D)
            og, lg = _FLASH(
                qs.view(G * Hkv, 1, R, D),
                gk.flatten(0, 1).unsqueeze(1),
                gv.flatten(0, 1).unsqueeze(1),
                attn_mask=st.gbias.expand(G, Hkv, 1, P).reshape(G * Hkv, 1, 1, P),
                scale=scale,
            )
        else:
            og, lg = _softmax_part(qs.view(G, Hkv, R, D), gk, gv, st.gbias, scale)
        og, lg = og.view(G, Hkv, W, rep, D), lg.view(G, Hkv, W, rep, 1)
        os_, ls = _softmax_part(qs, sk, sv, st.sbias, scale)  # (G, Hkv, W, rep, D), (.., 1)
        m = torch.maximum(lg, ls)
        wg, ws = torch.exp(lg - m), torch.exp(ls - m)
        out = (og * wg + os_ * ws) / (wg + ws)
        return out[g, :, j].reshape(B, 1, H, D).to(q.dtype)  # (the kernel's log-sum-exp is fp32)


class DecodeEngine:
    """Generation for `HFPolicy` on supported models (see the module doc).

    Args:
        model: a loaded transformers causal LM (`supports()` must accept it).
        tokenizer: its tokenizer.
        eos_ids: ids that end a sequence ("eos").
        max_rows: live samples per decode step (the batch the MLP sees).
        prefix_cache_mb: bound of the prefix cache in MiB; 0 = no cache.
        cache_outputs: also cache each finished sample's prompt + generated tokens (a child
            node's prompt starts with them).
        prefill_tokens: most prompt tokens per prefill forward.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        eos_ids: Sequence[int],
        *,
        max_rows: int = 256,
        prefix_cache_mb: int = 256,
        cache_outputs: bool = True,
        prefill_tokens: int = 4096,
    ) -> None:
        self.model = model
        self.tok = tokenizer
        self.eos_ids = set(eos_ids)
        self.pad_id = tokenizer.pad_token_id
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.dtype = model.dtype
        self.n_heads = cfg.num_attention_heads
        self._weights: list[_Layer] = []
        self._weights_of: tuple = ()  # the parameters (identity, version) they were read from
        self.max_rows = max_rows
        self.cache = PrefixCache(prefix_cache_mb << 20)
        self.cache_outputs = cache_outputs
        self.prefill_tokens = prefill_tokens
        self._batch: _Batch | None = None  # the last call's KV buffers (see `_generate`)
        self._candidate: dict[tuple[str, ...], frozenset[int]] = {}
        self._single: dict[tuple[str, ...], dict[int, str]] = {}
        self.reset_counters()

    def reset_counters(self) -> None:
        self.tokens_generated = 0
        self.prefix_tokens_encoded = 0  # prompt tokens run through the model (prefill)
        self.prefix_tokens_reused = 0  # prompt tokens whose KV came from the prefix cache
        self.decode_steps = 0
        self.row_steps = 0  # live rows summed over decode steps
        self.prefills = 0
        self.model_seconds = 0.0
        self.sequences = 0

    # --- stop strings ----------------------------------------------------------------------

    def _stop_tables(self, stops: tuple[str, ...]) -> tuple[frozenset[int], dict[int, str]]:
        """(candidate: ids of the tokens after which a stop string may have just completed,
        single: {token id: stop string} for stops that are one token). A Python set, not a
        tensor: every generated token is looked up, and a tensor index costs microseconds."""
        if stops not in self._candidate:
            V = self.model.get_output_embeddings().weight.shape[0]
            tails = {s[-1] for s in stops if s}
            texts = (self.tok.decode([i], skip_special_tokens=False) for i in range(min(V, len(self.tok))))
            cand = frozenset(i for i, t in enumerate(texts) if "\ufffd" in t or any(c in t for c in tails))
            single: dict[int, str] = {}
            for s in stops:
                enc = self.tok.encode(s, add_special_tokens=False)
                if len(enc) == 1 and self.tok.decode(enc) == s:
                    single[enc[0]] = s
            self._candidate[stops], self._single[stops] = cand, single
        return self._candidate[stops], self._single[stops]

    # --- the model ---------------------------------------------------------------------------

    def _sync_weights(self) -> None:
        """Before a call: re-read the weights if a parameter was replaced or changed in place
        since the last call, and forget the cached KV, which the old weights computed."""
        key = tuple((id(p), p._version) for p in self.model.parameters())
        if key != self._weights_of:
            if self._weights_of:
                self.cache.clear()
            with torch.no_grad():  # copies of the weights, outside any autograd graph
                self._weights, self._weights_of = _layers(self.model), key

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, state: Any) -> torch.Tensor:
        """Hidden states (B, T, h) of the Qwen2 model at token `ids` (B, T) and `positions`,
        with the engine's attention (`state`: a prefill or a decode step); transformers'
        `Qwen2Model.forward` written out (see the module doc)."""
        F = torch.nn.functional
        m = self.model.model
        eps, hs = m.norm.variance_epsilon, (self.model.config.hidden_size,)
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        B, T = ids.shape
        x = F.embedding(ids, m.embed_tokens.weight)  # (B, T, h)
        cos, sin = m.rotary_emb(x, positions)  # (B, T, D) each
        cos, sin = cos[:, None], sin[:, None]
        for i, w in enumerate(self._weights):
            qkv = F.linear(torch.rms_norm(x, hs, w.ln1, eps), w.wqkv, w.bqkv)
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = _rotate(q.view(B, T, H, D).transpose(1, 2), cos, sin)
            k = _rotate(k.view(B, T, Hkv, D).transpose(1, 2), cos, sin)
            o = _attend(i, q, k, v.view(B, T, Hkv, D).transpose(1, 2), state, w.scale)
            x = x + F.linear(o.reshape(B, T, H * D), w.wo)
            gate, up = F.linear(torch.rms_norm(x, hs, w.ln2, eps), w.wgu).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.wd)
        return torch.rms_norm(x, hs, m.norm.weight, eps)

    def _prefill(
        self, seqs: list[list[int]]
    ) -> tuple[torch.Tensor, list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        """Encode the token sequences `seqs` (reusing cached prefixes): (last-token hidden
        states (U, h), per sequence per-layer k and v of the whole sequence, each (Hkv, L, D)).
        The caller applies its head: the LM head for generation, a value head for scoring."""
        U = len(seqs)
        # at most len - 1 from the cache: the last token's hidden state has to be computed
        hits = [self.cache.lookup(ids, len(ids) - 1) for ids in seqs]
        past = [n for _, n in hits]
        new = [ids[n:] for ids, n in zip(seqs, past)]
        C, T = max(past), max(len(x) for x in new)
        Hkv, D, dt = self.n_kv, self.head_dim, self.dtype
        past_k = [torch.zeros(U, Hkv, C, D, dtype=dt) for _ in range(self.n_layers)]
        past_v = [torch.zeros(U, Hkv, C, D, dtype=dt) for _ in range(self.n_layers)]
        for u, (entry, n) in enumerate(hits):
            if entry is not None:
                for layer in range(self.n_layers):
                    past_k[layer][u, :, :n] = entry.k[layer][:, :n]
                    past_v[layer][u, :, :n] = entry.v[layer][:, :n]
        ids = torch.full((U, T), self.pad_id, dtype=torch.long)
        for u, x in enumerate(new):
            ids[u, : len(x)] = torch.tensor(x, dtype=torch.long)
        t = torch.arange(T)
        pos = torch.tensor(past)[:, None] + t[None, :]  # (U, T), right padded
        nlen = torch.tensor([len(x) for x in new])
        past_ok = torch.arange(C)[None, :] < torch.tensor(past)[:, None]  # (U, C)
        causal = (t[None, :] <= t[:, None])[None] & (t[None, None, :] < nlen[:, None, None])  # (U, T, T)
        mask = torch.cat([past_ok[:, None, :].expand(U, T, C), causal], dim=-1)[:, None]
        st = _Prefill(past_k, past_v, mask)
        hidden = self._forward(ids, pos, st)  # (U, T, h)
        last = hidden[torch.arange(U), nlen - 1]  # (U, h)
        ks, vs = [], []
        for u, (x, n) in enumerate(zip(new, past)):
            L = len(x)
            ks.append(
                [torch.cat([past_k[i][u, :, :n], st.new_k[i][u, :, :L]], dim=1) for i in range(self.n_layers)]
            )
            vs.append(
                [torch.cat([past_v[i][u, :, :n], st.new_v[i][u, :, :L]], dim=1) for i in range(self.n_layers)]
            )
        self.prefix_tokens_encoded += int(nlen.sum())
        self.prefix_tokens_reused += sum(past)
        self.prefills += 1
        return last, ks, vs

    # --- generation --------------------------------------------------------------------------

    def generate(
        self, requests: list[GenRequest], prompt_ids: list[list[int]], max_new: list[int]
    ) -> list[list[Completion]]:
        """For each request, `request.n` completions (see `HFPolicy.generate`); `prompt_ids`
        and `max_new` (the capped token limit) per request."""
        t0 = time.perf_counter()
        self._sync_weights()
        with torch.inference_mode():
            out = self._generate(requests, prompt_ids, max_new)
        self.model_seconds += time.perf_counter() - t0
        return out

    def encode_last(self, seqs: list[list[int]], batch_size: int = 64) -> torch.Tensor:
        """Last-token hidden states (U, h) of each token sequence, through the prefix cache.

        For a reward model's value head (`rstar.models.ppm.HFRewardModel`): a search scores a
        node's text, later its children's, whose texts start with it. Each sequence's KV is
        cached, so a child's text is encoded from where its parent's ended: a step's tokens
        instead of the whole prompt and every earlier step. Sequences are encoded longest
        first in batches of `batch_size` (or fewer, to keep `prefill_tokens` new tokens).
        """
        if any(not ids for ids in seqs):
            raise ValueError("encode_last: an empty token sequence has no last token")
        t0 = time.perf_counter()
        self._sync_weights()
        out: list[torch.Tensor | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
        with torch.inference_mode():
            while order:
                rows = [order.pop(0)]
                tokens = len(seqs[rows[0]])
                while (
                    order and len(rows) < batch_size and tokens + len(seqs[order[0]]) <= self.prefill_tokens
                ):
                    tokens += len(seqs[order[0]])
                    rows.append(order.pop(0))
                last, ks, vs = self._prefill([seqs[i] for i in rows])
                for u, i in enumerate(rows):
                    out[i] = last[u]
                    if self.cache.max_bytes > 0:
                        self.cache.insert(seqs[i], ks[u], vs[u])
        self.model_seconds += time.perf_counter() - t0
        self.sequences += len(seqs)
        return torch.stack(out) if out else torch.zeros(0)  # type: ignore[arg-type]

    def _generate(
        self, requests: list[GenRequest], prompt_ids: list[list[int]], max_new: list[int]
    ) -> list[list[Completion]]:
        results: list[list[Completion | None]] = [[None] * r.n for r in requests]
        width = max(1, min(max((r.n for r in requests), default=1), 16))
        items: list[_Item] = []
        for ri, r in enumerate(requests):
            if max_new[ri] <= 0 or not prompt_ids[ri]:
                for si in range(r.n):
                    results[ri][si] = Completion(text="", stop_reason="length", n_tokens=0)
                continue
            sample = r.temperature > 0
            for s0 in range(0, r.n, width):
                items.append(
                    _Item(
                        req=ri,
                        samples=list(range(s0, min(r.n, s0 + width))),
                        ids=prompt_ids[ri],
                        max_new=max_new[ri],
                        temperature=r.temperature if sample else 0.0,
                        top_p=r.top_p if sample else 1.0,
                        stops=tuple(r.stop),
                    )
                )
        if not items:
            return results  # type: ignore[return-value]
        S = max(it.max_new for it in items)
        # The buffers of the last call are kept for the next one of the same shape (a search
        # calls with the same width and token limit over and over): growing fresh ones from
        # nothing on every call showed in profiles (EXPERIMENTS, "Search speed"). Old KV in them is
        # finite and masked.
        batch = self._batch
        if batch is None or (batch.W, batch.S) != (width, S):
            batch = self._batch = _Batch(self, width, S)
        # A stack, longest prompt on top: groups alive at the same time have similar prompt
        # lengths, so little of the group KV the attention reads is padding.
        waiting = sorted(range(len(items)), key=lambda i: len(items[i].ids))
        free_groups: list[int] = []  # a heap: the lowest free slot first keeps live groups low
        used_groups = 0
        group_rows: dict[int, list[int]] = {}  # group slot -> live row slots
        slot_row: dict[int, _Row] = {}  # row slot -> row
        slot_item: dict[int, _Item] = {}  # group slot -> item
        slen = torch.zeros(0, dtype=torch.long)  # per row slot: tokens in its suffix KV
        live = 0
        waiting_rows = sum(len(it.samples) for it in items)
        # Admit when an eighth of the rows is free (or all that wait fit): prefills come in
        # batches rather than one request per decode step.
        admit_at = max(1, self.max_rows // 8)

        def finish(slot: int, reason: str) -> None:
            nonlocal live
            row = slot_row.pop(slot)
            row.done = reason
            g = slot // width
            group_rows[g].remove(slot)
            live -= 1
            it = slot_item[g]
            if self.cache_outputs and self.cache.max_bytes > 0:
                n = int(slen[slot])  # generated tokens whose KV exists
                if n > 0:
                    plen = len(it.ids)
                    self.cache.insert(
                        list(it.ids) + row.tokens[:n],
                        [
                            torch.cat([batch.gk[i][g, :, :plen], batch.sk[i][g, :, slot % width, :n]], dim=1)
                            for i in range(self.n_layers)
                        ],
                        [
                            torch.cat([batch.gv[i][g, :, :plen], batch.sv[i][g, :, slot % width, :n]], dim=1)
                            for i in range(self.n_layers)
                        ],
                    )
            results[it.req][row.sample] = self._completion(row, it)
            if not group_rows[g]:
                del group_rows[g], slot_item[g]
                heapq.heappush(free_groups, g)

        def check(slots: list[int], toks: list[int]) -> None:
            """Append each row's new token; retire rows that ended."""
            for slot, t in zip(slots, toks):
                row = slot_row[slot]
                it = slot_item[slot // width]
                row.tokens.append(t)
                cand, single = self._stop_tables(it.stops)
                if t in single:
                    finish(slot, "stop")
                elif t in self.eos_ids:
                    finish(slot, "eos")
                elif t in cand and it.stops and self._ends_with_stop(row.tokens, it.stops):
                    finish(slot, "stop")
                elif len(row.tokens) >= it.max_new:
                    finish(slot, "length")

        while waiting or live:
            # 1. Admit waiting work into freed room, prefilling in batches.
            room = self.max_rows - live
            if waiting and (
                live == 0 or room >= max(min(admit_at, waiting_rows), len(items[waiting[-1]].samples))
            ):
                admitted: list[tuple[int, _Item]] = []
                tokens = 0
                while waiting:
                    it = items[waiting[-1]]
                    if live + len(it.samples) > self.max_rows and live > 0:
                        break
                    if admitted and tokens + len(it.ids) > self.prefill_tokens:
                        break
                    waiting.pop()
                    if free_groups:
                        g = heapq.heappop(free_groups)
                    else:
                        g, used_groups = used_groups, used_groups + 1
                    admitted.append((g, it))
                    live += len(it.samples)
                    waiting_rows -= len(it.samples)
                    tokens += len(it.ids)
                batch.ensure(used_groups, max(len(it.ids) for _, it in admitted))
                if slen.shape[0] < batch.G * width:
                    slen = torch.cat([slen, torch.zeros(batch.G * width - slen.shape[0], dtype=torch.long)])
                last, ks, vs = self._prefill([it.ids for _, it in admitted])
                logits = self.model.lm_head(last)
                first_slots, first_logits, temps, tops, keys, steps = [], [], [], [], [], []
                for u, (g, it) in enumerate(admitted):
                    plen = len(it.ids)
                    for i in range(self.n_layers):
                        batch.gk[i][g, :, :plen] = ks[u][i]
                        batch.gv[i][g, :, :plen] = vs[u][i]
                    batch.glen[g] = plen
                    if self.cache.max_bytes > 0:
                        self.cache.insert(it.ids, ks[u], vs[u])
                    slot_item[g] = it
                    group_rows[g] = []
                    req = requests[it.req]
                    for j, si in enumerate(it.samples):
                        slot = g * width + j
                        key = (
                            row_key(req.seed, si)
                            if req.seed is not None
                            else int(torch.randint(-(2**62), 2**62, ()).item())
                        )
                        slot_row[slot] = _Row(sample=si, key=key)
                        group_rows[g].append(slot)
                        slen[slot] = 0
                        first_slots.append(slot)
                        first_logits.append(u)
                        temps.append(it.temperature)
                        tops.append(it.top_p)
                        keys.append(key)
                        steps.append(0)
                toks = sample_tokens(
                    logits[first_logits],
                    torch.tensor(temps),
                    torch.tensor(tops),
                    uniforms(torch.tensor(keys, dtype=torch.long), torch.tensor(steps)),
                )
                check(first_slots, toks.tolist())
                continue
            # 2. One decode step for every live row.
            slots = sorted(slot_row)
            rows_t = torch.tensor(slots)
            groups = rows_t // width
            spos = slen[rows_t]
            G = max(group_rows) + 1  # group slots up to the highest live one
            glen = batch.glen[:G]
            P = int(batch.glen[groups].max())  # the longest live prompt
            inf = float("-inf")
            gbias = torch.where(torch.arange(P)[None, :] < glen[:, None], 0.0, inf).to(self.dtype)
            sl = slen[: G * width].view(G, width)  # dead slots keep position 0 at least: finite
            sbias = torch.where(torch.arange(S)[None, None, :] <= sl[:, :, None], 0.0, inf).to(self.dtype)
            st = _Decode(
                batch, groups, rows_t % width, spos, G, P, gbias[:, None, None, :], sbias[:, None, :, None, :]
            )
            last = torch.tensor([slot_row[s].tokens[-1] for s in slots])
            hidden = self._forward(last[:, None], (batch.glen[groups] + spos)[:, None], st)
            logits = self.model.lm_head(hidden[:, 0])
            slen[rows_t] = spos + 1
            its = [slot_item[s // width] for s in slots]
            toks = sample_tokens(
                logits,
                torch.tensor([it.temperature for it in its]),
                torch.tensor([it.top_p for it in its]),
                uniforms(
                    torch.tensor([slot_row[s].key for s in slots], dtype=torch.long),
                    torch.tensor([len(slot_row[s].tokens) for s in slots]),
                ),
            )
            self.decode_steps += 1
            self.row_steps += len(slots)
            check(slots, toks.tolist())
        return results  # type: ignore[return-value]

    def _ends_with_stop(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        text = self.tok.decode(tokens, skip_special_tokens=False)
        return first_stop_in(text, stops)

    def _completion(self, row: _Row, it: _Item) -> Completion:
        strip = self.eos_ids | {self.pad_id}
        text = self.tok.decode([t for t in row.tokens if t not in strip], skip_special_tokens=False)
        reason = row.done
        cut = first_stop(text, it.stops)
        if cut is not None:
            text, reason = text[:cut], "stop"
        elif reason == "stop":
            reason = "length"
        self.tokens_generated += len(row.tokens)
        self.sequences += 1
        return Completion(text=text, stop_reason=reason, n_tokens=len(row.tokens))


def first_stop_in(text: str, stops: Sequence[str]) -> bool:
    return any(s and s in text for s in stops)
