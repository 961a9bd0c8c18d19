"""Quantized bases (issue 28): fuse -> inspect -> verify --base -> fusionsurgery.hf -> unfuse, on checkpoints
written by the library that defines each format (compressed-tensors, bitsandbytes' CPU backend) or in its
published layout and read by transformers' own quantizer (block FP8, MXFP4); the fused config's skip lists
checked with each loader's own matching or replacement function.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from any_decoder import build_model  # noqa: E402
from helpers import error_lines, run_cli  # noqa: E402
from quantized_bases import (LINEARS, save_awq, save_block_fp8, save_bnb_4bit, save_compressed_fp8,  # noqa: E402
                             save_gptq, save_mxfp4, tiny_model)

from fusionsurgery import fuse, inspect_checkpoint, unfuse, verify  # noqa: E402
from fusionsurgery.errors import CheckpointError, UsageError  # noqa: E402

FUSED_LAYERS = [1, 3]
FUSION_LINEARS = ("cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _writer(fmt: str):
    if fmt == "compressed":
        pytest.importorskip("compressed_tensors")
        return save_compressed_fp8
    return save_block_fp8


def _fusion_linears(prefix: str = "model.layers") -> list[str]:
    return [f"{prefix}.{i}.fusion_layer.{name}" for i in FUSED_LAYERS for name in FUSION_LINEARS]


def _base_linears(base: Path, suffix: str = ".weight") -> list[str]:
    """The decoder-layer linears of ``base`` (the modules holding a ``suffix`` tensor)."""
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        return sorted({k.removesuffix(suffix) for k in f.keys() if LINEARS.search(k.removesuffix(suffix))})


def _require_fp8_reference() -> None:
    """Skip where the installed transformers cannot read block FP8 on this machine (its early 5.x releases
    import triton for it): the tool then refuses in one line (test_fp8_without_triton_is_one_line), and there
    is no transformers reference to compare with."""
    from fusionsurgery.arch.quantization import _fp8_without_triton

    problem = _fp8_without_triton()
    if problem is not None:
        pytest.skip(problem)


def _same_bytes(a: Path, b: Path) -> None:
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def fp8_cases(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """(model type, format) -> (base, fused) for block FP8 and compressed-tensors FP8, built once."""
    return {}


def _case(cases, tmp_path_factory, model_type: str, fmt: str) -> tuple[Path, Path]:
    if (model_type, fmt) not in cases:
        root = tmp_path_factory.mktemp(f"{model_type}-{fmt}")
        base = root / "base"
        base.mkdir()
        _writer(fmt)(tiny_model(model_type), base)
        fuse(base, root / "fused", layers="1,3")
        cases[(model_type, fmt)] = (base, root / "fused")
    return cases[(model_type, fmt)]


@pytest.mark.slow  # verify's forward checks through transformers, or transformers models built and loaded
@pytest.mark.parametrize("fmt", ["block", "compressed"])
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "olmo2"])
def test_fp8_base_fuses_verifies_loads_and_unfuses(model_type, fmt, fp8_cases, tmp_path_factory, tmp_path):
    base, fused = _case(fp8_cases, tmp_path_factory, model_type, fmt)
    method = "fp8" if fmt == "block" else "compressed-tensors"
    # the originals keep their bytes (F8_E4M3 weights and their scales), the fusion blocks are bf16
    report = inspect_checkpoint(fused)
    q = report.quantization
    assert q is not None and q["method"] == method and q["bits"] == 8 and q["quantized_dtypes"] == ["F8_E4M3"]
    assert q["side_tensors"] == (["weight_scale_inv"] if fmt == "block" else ["weight_scale"])
    assert q["quantized_modules"] == 28
    assert report.forward == "transformers" and report.fusion.dtype == "BF16"
    float_params = sum(p.numel() for p in tiny_model(model_type).parameters())
    assert report.fusion.base_params == float_params  # scales are not parameters; F8 weights one each
    # every fusion module is kept out of quantization, in the list the method's loader reads
    doc = json.loads((fused / "config.json").read_text())
    original = json.loads((base / "config.json").read_text())["quantization_config"]
    assert doc["fusion"]["base_quantization_config"] == original
    # verify (every check) through transformers, originals compared with the base
    result = verify(fused, base, seq_len=8, bench_len=8)
    assert result.ok, [(c.name, c.summary) for c in result.checks if c.status != "passed"]
    assert result.settings["engine"] == "hf"
    # fusionsurgery.hf with closed gates = transformers' own base logits
    import transformers

    import fusionsurgery.hf as fhf

    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    own = transformers.AutoModelForCausalLM.from_pretrained(str(base)).eval()
    model = fhf.from_pretrained(fused).eval()
    assert torch.equal(_logits(model, ids), _logits(own, ids))
    for name, module in model.named_modules():  # the fusion blocks are float modules of float weights
        if ".fusion_layer." in name and isinstance(module, torch.nn.Linear):
            assert module.weight.dtype == torch.bfloat16 and not hasattr(module, "quantization_scheme"), name
    if fmt == "compressed":  # the loader's own replacement: base linears quantized, fusion linears not
        base_linears = _base_linears(base)
        assert base_linears and all(hasattr(model.get_submodule(n), "quantization_scheme") for n in base_linears)
    # unfuse gives the base back: bytes and config
    unfuse(fused, tmp_path / "back")
    _same_bytes(base, tmp_path / "back")


def test_block_fp8_skip_list_by_transformers_replacement(fp8_cases, tmp_path_factory):
    """transformers' own FP8 replacement (what runs on an FP8 GPU) leaves the fusion linears float with the
    fused config's list, and converts them with the base's (the list is what keeps them out)."""
    _require_fp8_reference()
    import transformers
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear
    from transformers.quantizers.base import HfQuantizer

    import fusionsurgery.hf as fhf
    from fusionsurgery.io.checkpoint import Checkpoint

    base, fused = _case(fp8_cases, tmp_path_factory, "llama", "block")
    doc = json.loads((fused / "config.json").read_text())

    def converted(qc: dict) -> set[str]:
        config = transformers.AutoConfig.from_pretrained(str(fused))
        with torch.device("meta"):
            model = fhf.model_class(Checkpoint.open(fused))(config)
        qconf = transformers.FineGrainedFP8Config.from_dict(dict(qc, dequantize=False))
        skips = HfQuantizer.get_modules_to_not_convert(model, qconf.modules_to_not_convert,
                                                       model._keep_in_fp32_modules)
        replace_with_fp8_linear(model, skips, qconf, pre_quantized=True)
        return {n for n, m in model.named_modules() if type(m).__name__ == "FP8Linear"}

    with_ours = converted(doc["quantization_config"])
    assert with_ours == set(_base_linears(base))  # every base linear, no fusion linear, not lm_head
    with_base = converted(doc["fusion"]["base_quantization_config"])
    assert set(_fusion_linears()) <= with_base  # the base's list alone would have converted them
    # a tied output projection (no tensor of its own) stays float too once the list is set
    tied = tmp_path_factory.mktemp("tied") / "base"
    tied.mkdir()
    save_block_fp8(tiny_model("llama", tie=True), tied)
    fused = tied.parent / "fused"
    fuse(tied, fused, layers="1,3")
    doc = json.loads((fused / "config.json").read_text())
    assert "lm_head" in doc["quantization_config"]["modules_to_not_convert"]
    assert converted(doc["quantization_config"]) == set(_base_linears(tied))


@pytest.mark.parametrize("fmt", ["block", "compressed"])
def test_skip_list_matches_by_loader_functions(fmt, fp8_cases, tmp_path_factory):
    """The loader's own matcher: transformers' should_convert_module for modules_to_not_convert,
    compressed-tensors' is_match for ignore; every fusion linear skipped, every base linear still converted."""
    base, fused = _case(fp8_cases, tmp_path_factory, "qwen3", fmt)
    qc = json.loads((fused / "config.json").read_text())["quantization_config"]
    fusion, base_linears = _fusion_linears(), _base_linears(base)
    if fmt == "block":
        from transformers.quantizers.quantizers_utils import should_convert_module

        assert not any(should_convert_module(n, qc["modules_to_not_convert"]) for n in fusion)
        assert all(should_convert_module(n, qc["modules_to_not_convert"]) for n in base_linears)
    else:
        from compressed_tensors.utils import is_match

        targets = qc["config_groups"]["group_0"]["targets"]
        linear = torch.nn.Linear(2, 2)
        assert not any(is_match(n, linear, targets, qc["ignore"]) for n in fusion)
        assert all(is_match(n, linear, targets, qc["ignore"]) for n in base_linears)
        base_ignore = json.loads((base / "config.json").read_text())["quantization_config"]["ignore"]
        assert all(is_match(n, linear, targets, base_ignore) for n in fusion)  # what the list prevents


@pytest.mark.slow  # verify's forward checks through transformers, or transformers models built and loaded
def test_bnb_prequantized_base(tmp_path):
    """A bitsandbytes NF4 checkpoint saved by transformers on bitsandbytes' CPU backend: fuse -> inspect (packed
    parameters counted unpacked) -> verify --base -> fusionsurgery.hf (base Linear4bit, fusion float, closed
    gates = transformers' own logits) -> unfuse byte-exact."""
    pytest.importorskip("bitsandbytes")
    import transformers

    import fusionsurgery.hf as fhf

    base = save_bnb_4bit(tiny_model("llama"), tmp_path / "bnb")
    fuse(base, tmp_path / "fused", layers="1,3")
    qc = json.loads((tmp_path / "fused" / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["lm_head"] + [f"model.layers.{i}.fusion_layer" for i in FUSED_LAYERS]
    report = inspect_checkpoint(tmp_path / "fused")
    assert report.quantization["method"] == "bitsandbytes" and report.quantization["bits"] == 4
    assert report.quantization["packed_tensors"] == ["weight"]
    assert report.fusion.base_params == sum(p.numel() for p in tiny_model("llama").parameters())
    result = verify(tmp_path / "fused", base, seq_len=8, bench_len=8)
    assert result.ok, [(c.name, c.summary) for c in result.checks if c.status != "passed"]
    model = fhf.from_pretrained(tmp_path / "fused", device_map="cpu").eval()
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert all(kinds[n] == "Linear4bit" for n in _base_linears(tmp_path / "bnb-float"))
    assert all(kinds[n] == "Linear" for n in _fusion_linears())
    own = transformers.AutoModelForCausalLM.from_pretrained(str(base), device_map="cpu").eval()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(model, ids), _logits(own, ids))
    unfuse(tmp_path / "fused", tmp_path / "back")
    _same_bytes(base, tmp_path / "back")


@pytest.mark.slow  # verify's forward checks through transformers, or transformers models built and loaded
def test_mxfp4_base(tmp_path):
    """gpt-oss MXFP4 (written in its layout, read by transformers' mxfp4 quantizer, which dequantizes on a CPU):
    fuse -> inspect -> verify --base -> unfuse byte-exact; the skip list by transformers' matcher."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = build_model("gpt_oss")
    base = tmp_path / "oss"
    base.mkdir()
    save_mxfp4(model, base)
    fuse(base, tmp_path / "fused", layers="1,3")
    qc = json.loads((tmp_path / "fused" / "config.json").read_text())["quantization_config"]
    assert not any(should_convert_module(n, qc["modules_to_not_convert"]) for n in _fusion_linears())
    assert should_convert_module("model.layers.0.mlp.experts", qc["modules_to_not_convert"])
    report = inspect_checkpoint(tmp_path / "fused")
    assert report.quantization["method"] == "mxfp4" and report.quantization["side_tensors"] == ["*_scales"]
    assert report.fusion.base_params == sum(p.numel() for p in model.parameters())
    result = verify(tmp_path / "fused", base, seq_len=8, bench_len=8)
    assert result.ok, [(c.name, c.summary) for c in result.checks if c.status != "passed"]
    unfuse(tmp_path / "fused", tmp_path / "back")
    _same_bytes(base, tmp_path / "back")


def test_gptq_base_layout_and_missing_kernel_package(tmp_path, monkeypatch, capsys):
    """GPTQ (its published layout; no GPTQ kernel package installs on this CPU): fuse -> inspect -> unfuse
    byte-exact; skip lists by transformers' matcher and modules_in_block_to_quantize naming the base's own;
    verify and fusionsurgery.hf name what to install in one line, and write nothing."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = tiny_model("llama")
    base = tmp_path / "gptq"
    base.mkdir()
    save_gptq(model, base)
    fuse(base, tmp_path / "fused", layers="1,3")
    qc = json.loads((tmp_path / "fused" / "config.json").read_text())["quantization_config"]
    assert not any(should_convert_module(n, qc["modules_to_not_convert"]) for n in _fusion_linears())
    assert qc["modules_in_block_to_quantize"] == [sorted(
        n.split(".", 3)[3] for n in _base_linears(base, ".qweight") if n.startswith("model.layers.0."))]
    report = inspect_checkpoint(tmp_path / "fused")
    assert report.quantization["packed_tensors"] == ["qweight"]
    assert set(report.quantization["side_tensors"]) == {"qzeros", "scales", "g_idx"}
    assert report.fusion.base_params == sum(p.numel() for p in model.parameters())
    unfuse(tmp_path / "fused", tmp_path / "back")
    _same_bytes(base, tmp_path / "back")
    for name in ("optimum", "gptqmodel"):
        monkeypatch.setitem(sys.modules, name, None)  # not installed, whatever this machine has
    code, err = run_cli(["verify", str(tmp_path / "fused")], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "pip install optimum gptqmodel" in err
    import fusionsurgery.hf as fhf

    with pytest.raises(UsageError, match="fusionsurgery\\[quant\\]"):
        fhf.from_pretrained(tmp_path / "fused")


def test_awq_base_layout(tmp_path, monkeypatch, capsys):
    """AWQ (its published GEMM layout; no AWQ kernel package installs on this CPU): fuse -> inspect -> unfuse
    byte-exact; the fusion modules join the list transformers' AWQ quantizer reads (by its own matcher), the base
    keeps every packed tensor's bytes, parameters are counted unpacked; verify names what to install in one line."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = tiny_model("llama")
    base = tmp_path / "awq"
    base.mkdir()
    save_awq(model, base)
    fuse(base, tmp_path / "fused", layers="1,3")
    qc = json.loads((tmp_path / "fused" / "config.json").read_text())["quantization_config"]
    assert not any(should_convert_module(n, qc["modules_to_not_convert"]) for n in _fusion_linears())
    assert all(should_convert_module(n, qc["modules_to_not_convert"]) for n in _base_linears(base, ".qweight"))
    report = inspect_checkpoint(tmp_path / "fused")
    assert report.quantization["method"] == "awq" and report.quantization["packed_tensors"] == ["qweight"]
    assert set(report.quantization["side_tensors"]) == {"qzeros", "scales"}
    assert report.fusion.base_params == sum(p.numel() for p in model.parameters())
    unfuse(tmp_path / "fused", tmp_path / "back")
    _same_bytes(base, tmp_path / "back")
    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # not installed, whatever this machine has
    code, err = run_cli(["verify", str(tmp_path / "fused")], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "gptqmodel" in err


def test_missing_compressed_tensors_is_one_line(fp8_cases, tmp_path_factory, monkeypatch, capsys):
    base, fused = _case(fp8_cases, tmp_path_factory, "llama", "compressed")
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    code, err = run_cli(["verify", str(fused), "--base", str(base)], capsys)
    assert code == 2 and error_lines(err) == [
        'error: this compressed-tensors checkpoint runs through transformers with compressed-tensors, which is not '
        'installed: pip install "fusionsurgery[quant]" (or pip install compressed-tensors)']


def test_refusals(fp8_cases, tmp_path_factory, tmp_path):
    base, fused = _case(fp8_cases, tmp_path_factory, "llama", "block")
    # --init copy would read F8 values without their scales
    with pytest.raises(UsageError, match="F8_E4M3 .*--init normal"):
        fuse(base, tmp_path / "copy", layers="1", init="copy")
    assert not (tmp_path / "copy").exists()
    # a fused config that lets the loader quantize the fusion blocks (an older fuse) is refused by readers
    old = tmp_path / "old"
    shutil.copytree(fused, old)
    doc = json.loads((fused / "config.json").read_text())
    doc["quantization_config"] = doc["fusion"].pop("base_quantization_config")
    (old / "config.json").write_text(json.dumps(doc))
    _require_fp8_reference()  # verify reads the forward's needs first: there, one line on triton
    report = verify(old)
    assert not report.ok and "fusion block(s), which have no quantization scales" in report.checks[0].details[0]
    import fusionsurgery.hf as fhf

    with pytest.raises(CheckpointError, match="lets the loader quantize 2 fusion block"):
        fhf.from_pretrained(old)
    # tensors quantized with no quantization_config
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(base / "model.safetensors", bare / "model.safetensors")
    cfg = json.loads((base / "config.json").read_text())
    del cfg["quantization_config"]
    (bare / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no quantization_config, but the tensors are quantized"):
        fuse(bare, tmp_path / "bare-fused", layers="1")
    assert not (tmp_path / "bare-fused").exists()


@pytest.mark.slow  # verify's forward checks through transformers, or transformers models built and loaded
def test_mllama_export_of_fp8_llama(fp8_cases, tmp_path_factory, tmp_path):
    """export --to mllama of a block-FP8 Llama: the FP8 weights and their scales keep their bytes under Mllama's
    names; transformers' FP8 replacement leaves the cross-attention layers float and converts every self-attention
    layer's linears; transformers' Mllama without images gives the base's logits."""
    import transformers
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear
    from transformers.quantizers.base import HfQuantizer

    from fusionsurgery import export

    base, fused = _case(fp8_cases, tmp_path_factory, "llama", "block")
    out = tmp_path / "mllama"
    result = export(fused, out, to="mllama")
    doc = json.loads((out / "config.json").read_text())
    cross = doc["cross_attention_layers"]
    assert cross == [m["mllama_layer"] for m in result.layer_map if m["kind"] == "cross"] and len(cross) == 2
    config = transformers.AutoConfig.from_pretrained(str(out))
    with torch.device("meta"):
        skeleton = transformers.MllamaForCausalLM(config)
    qconf = transformers.FineGrainedFP8Config.from_dict(dict(doc["quantization_config"], dequantize=False))
    skips = HfQuantizer.get_modules_to_not_convert(skeleton, qconf.modules_to_not_convert,
                                                   skeleton._keep_in_fp32_modules)
    replace_with_fp8_linear(skeleton, skips, qconf, pre_quantized=True)
    converted = {n for n, m in skeleton.named_modules() if type(m).__name__ == "FP8Linear"}
    linears = {n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) or n in converted}
    selfs = {n for n in linears if n.startswith("model.layers.") and int(n.split(".")[2]) not in cross}
    assert converted == selfs and len(selfs) == 28
    own = transformers.AutoModelForCausalLM.from_pretrained(str(base)).eval()
    mllama = transformers.MllamaForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(mllama, ids), _logits(own, ids), rtol=0, atol=1e-2)
    with pytest.raises(UsageError, match="torchtune's builders read float weights"):
        export(fused, tmp_path / "tt", to="torchtune")
    assert not (tmp_path / "tt").exists()


@pytest.mark.slow  # verify's forward checks through transformers, or transformers models built and loaded
def test_link_adapter_and_graft_on_fp8(tmp_path):
    """--link hard-links the FP8 shard; --adapter-only leaves the FP8 tensors and scales in the base; graft of that
    adapter onto another FP8 base writes the skip list for it, verifies, and unfuses to that base's bytes."""
    from fusionsurgery import graft

    base_a, base_b = tmp_path / "a", tmp_path / "b"
    for path, seed in ((base_a, 0), (base_b, 1)):
        path.mkdir()
        save_block_fp8(tiny_model("llama", seed=seed), path)
    f16 = fuse(base_a, tmp_path / "f16", layers="1", dtype="fp16")  # `dtype` chooses the blocks' float dtype
    assert {t.dtype for t in f16.new_tensors} == {"F16"}
    linked = fuse(base_a, tmp_path / "linked", layers="1,3", link=True)
    assert linked.layout == "link" and (tmp_path / "linked" / "model.safetensors").stat().st_nlink > 1
    fuse(base_a, tmp_path / "adapter", layers="1,3", adapter_only=True)
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    described = inspect_checkpoint(tmp_path / "adapter").quantization  # from the config: the tensors are in a
    assert described["method"] == "fp8" and described["quantized_modules"] is None
    adapter_qc = json.loads((tmp_path / "adapter" / "config.json").read_text())["quantization_config"]
    assert adapter_qc["modules_to_not_convert"] == ["lm_head", "model.layers.1.fusion_layer",
                                                    "model.layers.3.fusion_layer"]
    graft(tmp_path / "adapter", base_b, tmp_path / "grafted")
    doc = json.loads((tmp_path / "grafted" / "config.json").read_text())
    assert doc["quantization_config"] == adapter_qc
    assert doc["fusion"]["base_quantization_config"] == json.loads((base_b / "config.json").read_text())[
        "quantization_config"]
    result = verify(tmp_path / "grafted", base_b, seq_len=8, bench_len=8)
    assert result.ok, [(c.name, c.summary) for c in result.checks if c.status != "passed"]
    unfuse(tmp_path / "grafted", tmp_path / "back")
    _same_bytes(base_b, tmp_path / "back")


@pytest.mark.slow  # verify's forward checks through transformers, or transformers models built and loaded
@pytest.mark.parametrize("fmt", ["block", "compressed"])
def test_save_pretrained_of_fp8_keeps_the_base_bytes(fmt, fp8_cases, tmp_path_factory, tmp_path):
    """A fused FP8 checkpoint opened with fusionsurgery.hf (block FP8 dequantized by transformers on a CPU,
    compressed-tensors kept compressed), its gates changed, saved: verify --base finds the originals
    bit-identical; a changed base weight is refused in one line rather than written back without scales."""
    import fusionsurgery.hf as fhf

    base, fused = _case(fp8_cases, tmp_path_factory, "llama", fmt)
    model = fhf.from_pretrained(fused)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("cross_attn_attn_gate"):
                p.fill_(0.5)
    model.save_pretrained(tmp_path / "saved")
    result = verify(tmp_path / "saved", base, seq_len=8, bench_len=8)
    assert result.ok, [(c.name, c.summary) for c in result.checks if c.status != "passed"]
    if fmt == "block":
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
        with pytest.raises(UsageError, match="down_proj.weight differs from the checkpoint's FP8 weight"):
            model.save_pretrained(tmp_path / "changed")
        assert not (tmp_path / "changed").exists()


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_load_fused_dequantizes_fp8_of_native_types(model_type, fp8_cases, tmp_path_factory, tmp_path):
    """load_fused (the native modules) reads a block-FP8 and a weight-only compressed-tensors FP8 release of a
    native type, dequantizing as transformers and compressed-tensors do: closed gates give the base's logits as
    transformers computes them; a scheme quantizing activations too is refused, naming fusionsurgery.hf."""
    _require_fp8_reference()
    import transformers

    from fusionsurgery import load_fused

    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    base, fused = _case(fp8_cases, tmp_path_factory, model_type, "block")
    own = transformers.AutoModelForCausalLM.from_pretrained(str(base)).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_fused(fused)(ids).float(), _logits(own, ids), rtol=0, atol=1e-4)
    pytest.importorskip("compressed_tensors")
    weights_only = tmp_path / "ct-weights"
    weights_only.mkdir()
    save_compressed_fp8(tiny_model(model_type), weights_only, activations=False)
    fuse(weights_only, tmp_path / "ct-fused", layers="1,3")
    own = transformers.AutoModelForCausalLM.from_pretrained(str(weights_only)).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_fused(tmp_path / "ct-fused")(ids).float(), _logits(own, ids),
                                   rtol=0, atol=1e-4)
    _, dynamic = _case(fp8_cases, tmp_path_factory, model_type, "compressed")
    with pytest.raises(UsageError, match="fusionsurgery.hf.from_pretrained"):
        load_fused(dynamic)


def test_fp8_without_triton_is_one_line(fp8_cases, tmp_path_factory, monkeypatch, capsys):
    """A transformers whose FP8 integration needs triton (its early 5.x releases on a machine without triton):
    verify and fusionsurgery.hf refuse an FP8 checkpoint in one line naming the upgrade, before loading."""
    import importlib.util

    base, fused = _case(fp8_cases, tmp_path_factory, "llama", "block")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "transformers.integrations.finegrained_fp8", None)  # as if it imported triton
    code, err = run_cli(["verify", str(fused), "--base", str(base)], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "pip install -U transformers" in err, err
    import fusionsurgery.hf as fhf

    with pytest.raises(UsageError, match="reads FP8 only with triton"):
        fhf.from_pretrained(fused)

