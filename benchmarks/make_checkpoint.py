#!/usr/bin/env python3
"""Write a Llama 3.x-shaped checkpoint with random bf16 weights, streaming, one tensor at a time.

Presets follow the real models' config.json (Llama 3.2-1B, Llama 3.2-3B, Llama 3.1-8B): widths,
layers, heads, grouped-query kv heads, vocab 128256, tied embeddings for 1B/3B, `rope_type: llama3`
scaling. The files are laid out as on the Hub: keys in module order, cut greedily into
`model-0000X-of-0000N.safetensors` shards of at most 5 GB (10^9 bytes, transformers' "5GB") with a
`model.safetensors.index.json`; a checkpoint that fits in one shard (1B) is a single
`model.safetensors`. Inside a shard, tensors are sorted by name as safetensors' serializer does.

Weights are bf16 bit patterns of N(0, 0.02) values (norm weights near 1.0). To write 16 GB in a
few minutes on two cores, one random block (64 MiB) is drawn once from the seed; every chunk
written is a window of it at a random offset with its low mantissa bits XOR-ed by a random mask,
so no two tensors share bytes while each byte costs one vectorised XOR. Peak memory is about
three blocks, whatever the model size.

    python benchmarks/make_checkpoint.py 8b benchmarks/work/base-8b
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fusionsurgery.io.safetensors_format import build_header

#: transformers' default max_shard_size "5GB" (decimal, as the Hub's Llama shards are cut).
HUB_SHARD_BYTES = 5 * 10**9
#: Elements in the random block (64 MiB of bf16).
BLOCK_ELEMS = 32 * 1024 * 1024
#: Elements per write (at most one block).
WRITE_ELEMS = 16 * 1024 * 1024


@dataclass(frozen=True)
class Preset:
    name: str
    model: str  # the Hub model whose shapes these are
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    rope_factor: float
    shard_bytes: int = HUB_SHARD_BYTES
    model_type: str = "llama"  # "gemma3_text": Gemma 3's layer (q/k norms, four norms per layer, own head_dim)
    head_size: int | None = None  # head_dim where it is not hidden / heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", "tiny smoke test", 64, 192, 8, 4, 2, 1024, True, 32.0, shard_bytes=400_000),
    "1b": Preset("1b", "meta-llama/Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128256, True, 32.0),
    "3b": Preset("3b", "meta-llama/Llama-3.2-3B", 3072, 8192, 28, 24, 8, 128256, True, 32.0),
    "8b": Preset("8b", "meta-llama/Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, False, 8.0),
    "gemma3-1b": Preset("gemma3-1b", "google/gemma-3-1b-pt", 1152, 6912, 26, 4, 1, 262144, True, 1.0,
                        model_type="gemma3_text", head_size=256),
}


def tensor_plan(p: Preset) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor as (key, shape), in transformers' module order (the order shards are cut in)."""
    d, q, kv = p.hidden, p.heads * p.head_dim, p.kv_heads * p.head_dim
    gemma = p.model_type == "gemma3_text"
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (p.vocab, d))]
    for i in range(p.layers):
        pre = f"model.layers.{i}."
        if gemma:
            out += [(pre + "self_attn.q_norm.weight", (p.head_dim,)), (pre + "self_attn.k_norm.weight", (p.head_dim,)),
                    (pre + "pre_feedforward_layernorm.weight", (d,)), (pre + "post_feedforward_layernorm.weight", (d,))]
        out += [
            (pre + "self_attn.q_proj.weight", (q, d)),
            (pre + "self_attn.k_proj.weight", (kv, d)),
            (pre + "self_attn.v_proj.weight", (kv, d)),
            (pre + "self_attn.o_proj.weight", (d, q)),
            (pre + "mlp.gate_proj.weight", (p.intermediate, d)),
            (pre + "mlp.up_proj.weight", (p.intermediate, d)),
            (pre + "mlp.down_proj.weight", (d, p.intermediate)),
            (pre + "input_layernorm.weight", (d,)),
            (pre + "post_attention_layernorm.weight", (d,)),
        ]
    out.append(("model.norm.weight", (d,)))
    if not p.tied:
        out.append(("lm_head.weight", (p.vocab, d)))
    return out


def shard_plan(p: Preset) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy cut into shards of at most ``p.shard_bytes`` (a tensor larger than that gets its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in tensor_plan(p):
        n = math.prod(shape) * 2
        if shards[-1] and size + n > p.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += n
    return shards


def hf_config(p: Preset) -> dict:
    """config.json as the Hub's Llama 3.x (or Gemma 3) checkpoints have it."""
    if p.model_type == "gemma3_text":
        return gemma3_config(p)
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": min(128000, p.vocab - 2),
        "eos_token_id": min(128001, p.vocab - 1),
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "hidden_size": p.hidden,
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": p.heads,
        "num_hidden_layers": p.layers,
        "num_key_value_heads": p.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": p.rope_factor,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": p.tied,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0",
        "use_cache": True,
        "vocab_size": p.vocab,
    }


def gemma3_config(p: Preset) -> dict:
    """config.json as google/gemma-3-1b-pt has it (sliding window 512, a global layer every sixth)."""
    return {
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "final_logit_softcapping": None, "head_dim": p.head_dim, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": p.hidden, "initializer_range": 0.02, "intermediate_size": p.intermediate,
        "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": p.heads,
        "num_hidden_layers": p.layers, "num_key_value_heads": p.kv_heads, "query_pre_attn_scalar": p.head_dim,
        "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0, "rope_scaling": None, "rope_theta": 1000000.0,
        "sliding_window": 512, "sliding_window_pattern": 6, "tie_word_embeddings": p.tied,
        "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": p.vocab,
    }


def total_bytes(p: Preset) -> int:
    return sum(math.prod(s) * 2 for _, s in tensor_plan(p))


class RandomBf16:
    """Cheap, seed-determined streams of small normal-ish bf16 bit patterns."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.Generator(np.random.SFC64(seed))
        values = self.rng.standard_normal(BLOCK_ELEMS, dtype=np.float32)
        values *= np.float32(0.02)
        bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # bf16 = the top half of fp32
        del values
        self.block = np.concatenate([bits, bits[:WRITE_ELEMS]])  # any window of WRITE_ELEMS is contiguous
        self.scratch = np.empty(WRITE_ELEMS, dtype=np.uint16)

    def chunk(self, n: int, around_one: bool = False) -> np.ndarray:
        out = self.scratch[:n]
        off = int(self.rng.integers(0, BLOCK_ELEMS))
        mask = np.uint16(self.rng.integers(1, 8))  # the 3 lowest mantissa bits: values barely move
        np.bitwise_xor(self.block[off:off + n], mask, out=out)
        if around_one:  # norm weights: 1.0 (0x3F80) with a little noise in the mantissa
            np.bitwise_and(out, np.uint16(0x000F), out=out)
            np.bitwise_or(out, np.uint16(0x3F80), out=out)
        return out


def write_checkpoint(preset: str | Preset, out: str | os.PathLike[str], seed: int = 0, *, force: bool = False,
                     quiet: bool = False, shard_bytes: int | None = None) -> Path:
    """Write the checkpoint to ``out`` (built under ``out.tmp`` and renamed when complete)."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if shard_bytes is not None:
        p = Preset(**{**p.__dict__, "shard_bytes": shard_bytes})
    out = Path(out)
    if out.exists():
        if not force:
            raise SystemExit(f"{out} exists; pass --force to replace it")
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    free = shutil.disk_usage(tmp).free
    need = total_bytes(p)
    if need > free:
        shutil.rmtree(tmp)
        raise SystemExit(f"{p.name}: needs {need / 1e9:.1f} GB, only {free / 1e9:.1f} GB free at {tmp.parent}")

    rand = RandomBf16(seed)
    shards = shard_plan(p)
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    weight_map: dict[str, str] = {}
    t0, done = time.perf_counter(), 0
    for name, shard in zip(names, shards):
        entries = sorted((key, "BF16", shape) for key, shape in shard)
        prefix, _ = build_header(entries, {"format": "pt"})
        with open(tmp / name, "wb") as fh:
            fh.write(prefix)
            for key, _, shape in entries:
                left = math.prod(shape)
                norm = len(shape) == 1
                while left:
                    n = min(left, WRITE_ELEMS)
                    fh.write(memoryview(rand.chunk(n, around_one=norm)))
                    left -= n
                    done += n * 2
                weight_map[key] = name
            fh.flush()
            os.fsync(fh.fileno())
        if not quiet:
            rate = done / max(time.perf_counter() - t0, 1e-9) / 1e6
            print(f"  {name}: {os.path.getsize(tmp / name) / 1e9:.2f} GB ({rate:.0f} MB/s so far)", file=sys.stderr)
    if len(shards) > 1:
        index = {"metadata": {"total_size": need}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(hf_config(p), indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": min(128000, p.vocab - 2), "eos_token_id": min(128001, p.vocab - 1), "do_sample": True, "temperature": 0.6, "top_p": 0.9,
         "transformers_version": "4.45.0"}, indent=2) + "\n")
    os.rename(tmp, out)
    if not quiet:
        secs = time.perf_counter() - t0
        print(f"wrote {out}: {p.name} ({p.model} shapes), {need / 1e9:.2f} GB in {len(shards)} file(s), "
              f"{secs:.1f} s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", choices=sorted(PRESETS), help="model shape")
    ap.add_argument("out", type=Path, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-bytes", type=int, default=None, help="override the shard size (bytes)")
    ap.add_argument("--force", action="store_true", help="replace an existing output")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    write_checkpoint(args.preset, args.out, args.seed, force=args.force, quiet=args.quiet,
                     shard_bytes=args.shard_bytes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
