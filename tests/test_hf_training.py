"""fusionsurgery.hf beyond one forward pass: loader options, adapters, gradient checkpointing, PEFT LoRA,
and FSDP2 training on 2 CPU processes (gloo) against a single-process run."""

from __future__ import annotations

import pytest
import torch

import fusionsurgery as fs
from fusionsurgery.errors import UsageError
from fusionsurgery.exporting import export
from fusionsurgery.io.checkpoint import Checkpoint
from fusionsurgery.verification import verify
from helpers import make_base, open_gates, train_losses

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("fusionsurgery.hf")


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf-train")
    base, ref = make_base(tmp, "qwen2")  # tied output, q/k/v biases
    out = tmp / "fused"
    fs.fuse(base, out, every=2, seed=2)
    return base, ref, out


def batch(model, seed=0, size=2, seq=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (size, seq), generator=g)
    return ids, torch.randn(size, 6, model.fusion.encoder_dim, generator=g)


def fusion_grads(model, ids, states):
    model.zero_grad()
    model(ids, cross_attention_states=states, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loader_options_reach_transformers(fused):
    _, _, out = fused
    model = hf.from_pretrained(out, dtype=torch.bfloat16, device_map="cpu", attn_implementation="eager")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]
    eager = hf.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ids, s = batch(eager)
    with torch.no_grad():
        torch.testing.assert_close(eager(ids, cross_attention_states=s).logits,
                                   fs.load_fused(out, dtype=torch.float32)(ids, encoder_input=s), atol=1e-4, rtol=0)
    # the class builds on the meta device like any transformers model (no memory, no init time)
    cls = hf.model_class(Checkpoint.open(out))
    with torch.device("meta"):
        empty = cls(eager.config)
    assert {p.device.type for p in empty.parameters()} == {"meta"}
    fresh = cls(eager.config)  # built from a config alone: random weights, gates closed
    assert all(p.detach().item() == 0.0 for n, p in fresh.named_parameters() if n.endswith("_gate"))


def test_refusals_are_one_line_errors(fused, tmp_path):
    base, _, out = fused
    with pytest.raises(UsageError, match="not a fused checkpoint"):
        hf.from_pretrained(base)
    adapter = tmp_path / "adapter"
    fs.fuse(base, adapter, every=2, adapter_only=True)
    with pytest.raises(UsageError, match="base"):
        hf.from_pretrained(adapter)
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    with pytest.raises(UsageError, match="not loaded from a fused checkpoint"):
        hf.save_fused(plain, tmp_path / "nowhere")
    llama, _ = make_base(tmp_path, "llama")
    fs.fuse(llama, tmp_path / "llama-fused", every=2)
    export(tmp_path / "llama-fused", tmp_path / "tune", to="torchtune")
    with pytest.raises(UsageError, match="--to hf"):  # torchtune names: export them to Hugging Face names first
        hf.from_pretrained(tmp_path / "tune")


def test_adapter_opens_on_its_base_and_saves_as_an_adapter(fused, tmp_path):
    base, _, _ = fused
    adapter = tmp_path / "adapter"
    fs.fuse(base, adapter, every=2, seed=4, adapter_only=True)
    model = hf.from_pretrained(adapter, base=base, dtype=torch.float32)
    own = fs.load_fused(adapter, base=base, dtype=torch.float32)
    ids, s = batch(model)
    open_gates(model, 0.6)
    open_gates(own, 0.6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, cross_attention_states=s).logits, own(ids, encoder_input=s),
                                   atol=1e-4, rtol=0)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    assert sorted(p.name for p in saved.iterdir()) == sorted(p.name for p in adapter.iterdir())
    report = verify(saved, base, device="cpu")
    assert report.ok, [c.message for c in report.failures]


def test_gradient_checkpointing_gives_the_same_gradients(fused):
    _, _, out = fused
    model = hf.from_pretrained(out, dtype=torch.float32)
    model.train()
    hf.freeze_all_but_fusion(model)
    open_gates(model, 0.3)
    ids, s = batch(model)
    plain = fusion_grads(model, ids, s)
    runs = []
    model.model.layers[1].fusion_layer.register_forward_hook(lambda *_: runs.append(1))
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    checkpointed = fusion_grads(model, ids, s)
    assert len(runs) == 2  # the forward ran again in the backward pass: activations were not kept
    assert plain.keys() == checkpointed.keys() and len(plain) == len(fs.get_fusion_params(model))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
        assert plain[name].abs().sum() > 0, name


def test_peft_lora_on_self_attention_with_fusion_trainable(fused, tmp_path):
    peft = pytest.importorskip("peft")
    base, _, out = fused
    model = hf.from_pretrained(out, dtype=torch.float32)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=hf.SELF_ATTENTION_TARGETS))
    fusion = hf.make_fusion_trainable(lora)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora_" in n} and all(".self_attn." in n for n in trainable if "lora_" in n)
    assert set(fusion) <= trainable and not trainable - set(fusion) - {n for n in trainable if "lora_" in n}
    ids, s = batch(model, size=4)
    losses = train_losses(lora, ids, s, 8)
    assert losses[-1] < losses[0] - 0.05
    lora.eval()
    lora.save_pretrained(tmp_path / "lora")  # PEFT's own adapter (the LoRA weights)
    hf.save_fused(lora, tmp_path / "fused")  # the fused directory: originals untouched, fusion trained
    report = verify(tmp_path / "fused", base, device="cpu")
    assert report.ok, [c.message for c in report.failures]
    assert len(report.check("originals").figures["changed_fusion_tensors"]) == len(fusion)
    again = peft.PeftModel.from_pretrained(hf.from_pretrained(tmp_path / "fused", dtype=torch.float32),
                                           tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, cross_attention_states=s).logits,
                                   lora(input_ids=ids, cross_attention_states=s).logits, atol=1e-5, rtol=0)
        generated = lora.generate(input_ids=ids[:, :4], cross_attention_states=s, max_new_tokens=3, do_sample=False)
    assert generated.shape == (4, 7)


# ------------------------------------------------------------------------------ FSDP2
STEPS, WORLD = 3, 2


def _example():
    """examples/hf_fsdp_train.py, whose ``batches`` and ``train`` both runs below use."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "hf_fsdp_train.py"
    spec = importlib.util.spec_from_file_location("hf_fsdp_train", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _fsdp_worker(rank: int, path: str, tmp: str) -> None:
    import faulthandler

    import torch.distributed as dist

    faulthandler.enable(all_threads=True)  # a rank that aborts in C++ (SIGABRT) shows where its Python was
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    example = _example()
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        model = hf.from_pretrained(path, dtype=torch.float32)
        hf.freeze_all_but_fusion(model)
        hf.shard_with_fsdp2(model)
        data = example.batches(model.config.vocab_size, model.fusion.encoder_dim, STEPS, batch=4, seq=10, encoder_len=6)
        losses = example.train(model, data, rank=rank, world=WORLD, lr=1e-2)  # each rank: its half of each batch
        params = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        sharded = {n: p.to_local().numel() for n, p in model.named_parameters()}
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"losses": losses, "params": params, "sharded": sharded}, f"{tmp}/result.pt")
            model.save_pretrained(f"{tmp}/saved", state_dict=full)
        dist.barrier()  # every rank leaves together, as examples/hf_fsdp_train.py does
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one(fused, tmp_path):
    base, _, out = fused
    check_fsdp2_equals_one_process(base, out, tmp_path)


def _run_ranks(out, tmp_path):
    """Run the ranks from a fresh rendezvous; returns the directory holding rank 0's results.

    A rank killed by SIGABRT (``terminate called without an active exception`` inside gloo, right after
    loading: seen in about one fresh-venv CI run in three on these sandboxed machines, never when the
    test runs alone or in a loop) is run once more, with a warning in the summary; any other failure
    fails the test. The assertions on the results are the same either way.
    """
    import warnings

    import torch.multiprocessing as mp

    for attempt in (1, 2):
        run = tmp_path / f"run{attempt}"
        run.mkdir()
        try:
            mp.spawn(_fsdp_worker, args=(str(out), str(run)), nprocs=WORLD)
            return run
        except mp.ProcessExitedException as exc:
            if attempt == 2 or exc.signal_name != "SIGABRT":
                raise
            warnings.warn(f"FSDP2 rank {exc.error_index} died of {exc.signal_name} inside gloo; ran the ranks again")
    raise AssertionError("unreachable")


def check_fsdp2_equals_one_process(base, out, tmp_path) -> None:
    """FSDP2 over 2 gloo processes trains the fused checkpoint ``out`` as one process does (losses and
    fusion weights), each rank holding half; rank 0's gathered save passes ``verify --base``."""
    run = _run_ranks(out, tmp_path)
    result = torch.load(run / "result.pt")
    example = _example()
    model = hf.from_pretrained(out, dtype=torch.float32)
    hf.freeze_all_but_fusion(model)
    data = example.batches(model.config.vocab_size, model.fusion.encoder_dim, STEPS, batch=4, seq=10, encoder_len=6)
    order = torch.cat([torch.arange(r, 4, WORLD) for r in range(WORLD)])  # the ranks' halves, in one batch
    losses = example.train(model, [(ids[order], s[order]) for ids, s in data], lr=1e-2)
    torch.testing.assert_close(result["losses"], losses, atol=1e-5, rtol=0)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained.keys() == result["params"].keys()
    for name, p in trained.items():
        torch.testing.assert_close(result["params"][name], p.detach(), atol=5e-5, rtol=0)
    full = {n: p.numel() for n, p in model.named_parameters()}
    assert sum(result["sharded"].values()) <= sum(full.values()) // WORLD + 64  # each rank held half
    report = verify(run / "saved", base, device="cpu")  # rank 0 saved the gathered weights
    assert report.ok, [c.message for c in report.failures]
    saved = hf.from_pretrained(run / "saved", dtype=torch.float32)
    for name, p in saved.named_parameters():
        if name in trained:
            torch.testing.assert_close(p, result["params"][name])


def test_generate_with_the_encoder_cache_equals_generate_without_any_cache(fused):
    _, _, out = fused
    model = hf.from_pretrained(out, dtype=torch.float32)
    open_gates(model, 1.0)
    ids, s = batch(model, size=2, seq=5)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 2:] = False
    common = dict(cross_attention_states=s, cross_attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                  pad_token_id=0, do_sample=False)
    with torch.no_grad():
        for beams in (1, 3):  # greedy and beam search (the cache's rows are reordered between beams)
            cached = model.generate(ids, num_beams=beams, **common)
            uncached = model.generate(ids, num_beams=beams, use_cache=False, **common)
            assert torch.equal(cached, uncached), beams
        torch.manual_seed(0)
        sampled = model.generate(ids, cross_attention_states=s, do_sample=True, max_new_tokens=4, pad_token_id=0)
    assert sampled.shape == (2, 9)


def test_documented_example_runs_and_verifies(tmp_path, monkeypatch):
    """docs/transformers.md's copy-paste example, as written (output paths moved into tmp_path)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    section = (root / "docs" / "transformers.md").read_text()
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]
    code = code.replace("/tmp/tiny-fused", str(tmp_path / "tiny-fused")).replace("/tmp/tiny-trained",
                                                                               str(tmp_path / "tiny-trained"))
    monkeypatch.chdir(root)
    scope: dict = {}
    exec(compile(code, "docs/transformers.md", "exec"), scope)
    assert scope["new"].shape == (2, 12)
    report = verify(tmp_path / "tiny-trained", root / "examples" / "tiny-llama", device="cpu")
    assert report.ok, [c.message for c in report.failures]
    assert report.check("originals").figures["changed_fusion_tensors"]


def test_transformers_trainer_trains_and_saves_the_fused_layout(fused, tmp_path):
    base, _, out = fused
    model = hf.from_pretrained(out, dtype=torch.float32)
    hf.freeze_all_but_fusion(model)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):  # Trainer keeps the encoder columns: forward declares them
        ids = torch.randint(0, model.config.vocab_size, (10,), generator=g)
        rows.append({"input_ids": ids, "labels": ids, "cross_attention_states": torch.randn(6, 64, generator=g),
                     "cross_attention_mask": torch.ones(6, dtype=torch.long)})
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    report = verify(tmp_path / "saved", base, device="cpu")
    assert report.ok, [c.message for c in report.failures]
    assert len(report.check("originals").figures["changed_fusion_tensors"]) == len(hf.freeze_all_but_fusion(model))
