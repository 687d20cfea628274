"""A real OpenAI-compatible server for the tiny policy: llama.cpp's own C++ server.

Used by tests/test_models_http.py to test `rstar.models.openai.OpenAIPolicy` against a real
server process on loopback. Two parts:

- `hf_to_gguf(model_dir, out)`: writes a Qwen2 HF directory (the tiny policy of
  `rstar.models.tiny`) as a GGUF file, f32, tokenizer included. llama.cpp's own
  `convert_hf_to_gguf.py` is not on PyPI, and it refuses BPE tokenizers whose pre-tokenizer
  hash it does not know (ours is trained locally), so this writes the file with the `gguf`
  package directly. The tiny tokenizer's split regex *is* Qwen2's, so the GGUF declares
  pre-tokenizer "qwen2" and llama.cpp tokenizes exactly as the HF tokenizer does
  (test_models_http checks that on the server's /tokenize).
- `python tests/llama_server.py serve --model F.gguf --port N`: runs llama.cpp's server
  (the same C++ `server.cpp` as the `llama-server` binary, with continuous batching) through
  the `xllamacpp` package, which ships prebuilt CPU wheels on PyPI: no compiler, no
  download at run time. It listens on 127.0.0.1 only and runs until killed.

Token types. Added tokens that are not special (the step tags, `<|user|>`,
`<|assistant|>`) are USER_DEFINED: llama.cpp parses them as single tokens in prompts *and*
prints them in generated text, as the HF tokenizer decodes them with
`skip_special_tokens=False`. Only eos and pad are CONTROL (llama.cpp does not print those).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path


def hf_to_gguf(model_dir: str | Path, out: str | Path) -> Path:
    """Write the Qwen2 model in `model_dir` (config.json, model.safetensors, tokenizer.json)
    to the GGUF file `out`, all tensors in f32. Returns `out`."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    model_dir, out = Path(model_dir), Path(out)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "qwen2":
        raise ValueError(f"{model_dir}: model_type {cfg.get('model_type')!r}, this writer handles qwen2 only")
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    if tok["model"]["type"] != "BPE":
        raise ValueError(f"{model_dir}: tokenizer model {tok['model']['type']!r}, expected BPE")

    n_layers = cfg["num_hidden_layers"]
    w = gguf.GGUFWriter(str(out), arch="qwen2")
    w.add_name(model_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    # Vocabulary, in id order. Byte-level BPE tokens are stored as HF stores them (Ġ for a
    # space...), as llama.cpp's "gpt2" tokenizer model expects.
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    n_vocab = cfg["vocab_size"]
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # ids past the tokenizer (a rounded-up embedding): never produced by the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")  # the tiny tokenizer's split regex is Qwen2's
    w.add_token_list(tokens)
    w.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_token_merges(merges)
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    if eos is not None:
        w.add_eos_token_id(int(eos))
        w.add_bos_token_id(int(eos))  # there is no bos: point it at eos and never add it
    if cfg.get("pad_token_id") is not None:
        w.add_pad_token_id(int(cfg["pad_token_id"]))
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)

    # Tensors: HF names -> GGUF names. Qwen2 needs no permutation (both use NEOX rope).
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, n_layers)
    weights = load_file(str(model_dir / "model.safetensors"))
    for name, arr in weights.items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue  # llama.cpp falls back to token_embd for a missing output.weight
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"{model_dir}: no GGUF name for tensor {name}")
        w.add_tensor(new, np.ascontiguousarray(arr, dtype=np.float32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def serve(model: str, port: int, parallel: int, n_ctx: int, threads: int) -> None:
    """Run llama.cpp's server on 127.0.0.1:`port` until SIGTERM/SIGINT."""
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = model
    params.hostnames = ["127.0.0.1"]  # loopback only
    params.port = port
    params.n_parallel = parallel  # slots: requests decoded together (continuous batching)
    params.n_ctx = n_ctx * parallel  # the context is shared by the slots
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.warmup = False
    server = xlc.Server(params)
    print(f"listening {server.listening_address}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    del server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="write an HF Qwen2 directory as GGUF")
    c.add_argument("model_dir")
    c.add_argument("out")
    s = sub.add_parser("serve", help="serve a GGUF on 127.0.0.1 with llama.cpp's server")
    s.add_argument("--model", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--parallel", type=int, default=4)
    s.add_argument("--ctx", type=int, default=1024, help="context per slot")
    s.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.cmd == "convert":
        print(hf_to_gguf(args.model_dir, args.out))
    else:
        serve(args.model, args.port, args.parallel, args.ctx, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
