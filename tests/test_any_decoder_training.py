"""Training any decoder type through ``fusionsurgery.hf``: FSDP2 on a Gemma-3-shaped model (2 gloo CPU
processes equal one), gradient checkpointing and PEFT LoRA on types whose layers are not Llama's
(Gemma 3's sliding/global mix, GPT-2's Conv1D attention, Mixtral's MoE router outputs, Qwen3.5's
linear-attention hybrid). Tiny models; the FSDP2 test takes about 20-40 s on 2 cores, the rest a
few seconds per type.
"""

from __future__ import annotations

import pytest
import torch

import fusionsurgery as fs
from any_decoder import save_tiny, type_params
from fusionsurgery.verification import verify
from helpers import open_gates, train_losses

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("fusionsurgery.hf")

TYPES = ["gemma3_text", "gpt2", "mixtral", "qwen3_5_text"]


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fused_of(tmp_path_factory):
    """model type -> (base, fused) tiny checkpoints, made on first use."""
    made = {}

    def get(model_type):
        if model_type not in made:
            tmp = tmp_path_factory.mktemp(model_type)
            base = save_tiny(model_type, tmp / "base")
            fs.fuse(base, tmp / "fused", every=2, seed=3)
            made[model_type] = base, tmp / "fused"
        return made[model_type]

    return get


def _batch(model, seed=0, size=4, seq=10):
    g = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(3, vocab, (size, seq), generator=g), torch.randn(size, 6, model.fusion.encoder_dim, generator=g)


def _fusion_grads(model, ids, states):
    torch.manual_seed(0)  # the same dropout masks (GPT-2 trains with dropout) in every run
    model.zero_grad()
    model(ids, cross_attention_states=states, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_fsdp2_on_a_gemma3_shaped_model_equals_one_process(fused_of, tmp_path):
    from test_hf_training import check_fsdp2_equals_one_process

    base, fused = fused_of("gemma3_text")
    check_fsdp2_equals_one_process(base, fused, tmp_path)


@pytest.mark.parametrize("model_type", type_params(TYPES))
def test_gradient_checkpointing_gives_the_same_fusion_gradients(fused_of, model_type):
    _, fused = fused_of(model_type)
    model = hf.from_pretrained(fused, dtype=torch.float32)
    model.train()
    hf.freeze_all_but_fusion(model)
    open_gates(model, 0.3)
    ids, s = _batch(model, size=2)
    plain = _fusion_grads(model, ids, s)
    runs = []
    first = hf.decoder_layers(model)[1]
    first.fusion_layer.register_forward_hook(lambda *_: runs.append(1))
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    checkpointed = _fusion_grads(model, ids, s)
    assert len(runs) == 2  # recomputed in the backward pass: the activations were not kept
    assert plain.keys() == checkpointed.keys() == set(fs.get_fusion_params(model))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
        assert plain[name].abs().sum() > 0, name


@pytest.mark.parametrize("model_type", type_params(TYPES))
def test_peft_lora_on_self_attention_with_fusion_trainable(fused_of, model_type, tmp_path):
    peft = pytest.importorskip("peft")
    base, fused = fused_of(model_type)
    model = hf.from_pretrained(fused, dtype=torch.float32)
    targets = hf.attention_targets(model)
    assert targets and not any("fusion_layer" in t for t in targets)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    fusion = hf.make_fusion_trainable(lora)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    lora_params = {n for n in trainable if "lora_" in n}
    assert lora_params and trainable == set(fusion) | lora_params
    ids, s = _batch(model)
    losses = train_losses(lora, ids, s, 4)
    assert losses[-1] < losses[0]
    lora.eval()
    hf.save_fused(lora, tmp_path / "saved")  # originals untouched (LoRA is PEFT's to save), fusion trained
    report = verify(tmp_path / "saved", base, device="cpu", dtype="fp32")
    assert report.ok, [(c.name, c.details) for c in report.failures]
    assert len(report.check("originals").figures["changed_fusion_tensors"]) == len(fusion)
