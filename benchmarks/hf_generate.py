"""What caching the encoder keys/values saves in ``generate`` of a ``fusionsurgery.hf`` model.

Builds a random Llama-shaped base (``--width``, ``--layers``), fuses it (``--every``), and runs greedy
``generate`` twice with the same encoder states: as shipped (each fusion block projects the states
once, at the first step, and reads the keys/values from the generation's cache afterwards) and with
the states passed again at every step (what a model without that cache must do). Prints the number
of key/value projections, the time of each and that both give the same tokens.

    python benchmarks/hf_generate.py --width 1024 --layers 8 --encoder-len 1024 --new-tokens 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fusionsurgery as fs  # noqa: E402
from fusionsurgery import hf  # noqa: E402
from fusionsurgery.hf.model import FusedCausalLMMixin  # noqa: E402


def make_fused(tmp: Path, width: int, layers: int, every: int) -> Path:
    import transformers

    config = transformers.LlamaConfig(hidden_size=width, intermediate_size=width * 3, num_hidden_layers=layers,
                                      num_attention_heads=width // 64, num_key_value_heads=max(1, width // 256),
                                      vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp / "base"))
    fs.fuse(tmp / "base", tmp / "fused", every=every, init_std=0.02)
    return tmp / "fused"


class _Recompute:
    """Keeps ``cross_attention_states`` in every step's inputs: the keys/values are projected each step."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        inputs = FusedCausalLMMixin.prepare_inputs_for_generation(self.model, *args, **kwargs)
        inputs["cross_attention_states"] = kwargs.get("cross_attention_states")
        return inputs


def run(model, prompt, states, new_tokens: int) -> tuple[torch.Tensor, float, int]:
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1))
             for n, m in model.named_modules() if n.endswith("fusion_layer.cross_attn.k_proj")]
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, cross_attention_states=states, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - start
    for h in hooks:
        h.remove()
    return out, seconds, len(calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--encoder-len", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        model = hf.from_pretrained(make_fused(Path(tmp), args.width, args.layers, args.every), dtype=torch.float32)
    model.eval()
    for name, p in model.named_parameters():
        if name.endswith("_gate"):
            p.data.fill_(0.5)
    prompt = torch.randint(0, 32000, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    states = torch.randn(1, args.encoder_len, args.width, generator=torch.Generator().manual_seed(1))
    results = {}
    for mode in ("cached", "recomputed"):
        if mode == "recomputed":
            model.prepare_inputs_for_generation = _Recompute(model)
        runs = [run(model, prompt, states, args.new_tokens) for _ in range(args.repeats)]
        results[mode] = (runs[0][0], sorted(r[1] for r in runs)[len(runs) // 2], runs[0][2])
    layers = len(model.model.layers) // args.every
    print(f"width {args.width}, {args.layers} layers ({layers} fused), encoder {args.encoder_len} positions, "
          f"{args.new_tokens} new tokens, CPU threads {torch.get_num_threads()}")
    for mode, (_, seconds, calls) in results.items():
        print(f"  {mode:10s}: {calls:4d} key/value projections, {seconds:.2f} s (median of {args.repeats})")
    same = torch.equal(results["cached"][0], results["recomputed"][0])
    print(f"  same tokens: {same}; speed-up {results['recomputed'][1] / results['cached'][1]:.2f}x")


if __name__ == "__main__":
    main()
