"""Train the fusion layers of a fused checkpoint on several GPUs (or CPU processes) with PyTorch FSDP2.

    torchrun --nproc_per_node 8 examples/hf_fsdp_train.py FUSED OUT [--steps 100] [--batch 64]

Each process loads the checkpoint as its transformers class (``fusionsurgery.hf.from_pretrained``),
freezes the base, shards every decoder layer and the model with ``fully_shard`` and trains on its
share of each global batch; rank 0 saves the gathered weights as a fused directory that
``fusionsurgery verify --base BASE`` accepts. On CUDA it runs NCCL in bf16, elsewhere gloo in fp32.
The data here is synthetic (random tokens, random encoder states): put your loader in ``batches``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from fusionsurgery import hf


def batches(vocab: int, encoder_dim: int, steps: int, batch: int, seq: int = 32, encoder_len: int = 16,
            seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` global batches of (token ids ``[batch, seq]``, encoder states ``[batch, encoder_len, encoder_dim]``)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (batch, seq), generator=g), torch.randn(batch, encoder_len, encoder_dim, generator=g))
            for _ in range(steps)]


def train(model: torch.nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], *, rank: int = 0, world: int = 1,
          lr: float = 1e-3, device: torch.device | str = "cpu") -> torch.Tensor:
    """AdamW on the trainable parameters; rank ``rank`` takes rows ``rank::world`` of every batch.

    Returns the loss of every step, averaged over the ranks (equal shares: the global batch's loss).
    """
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for ids, states in data:
        ids, states = ids[rank::world].to(device), states[rank::world].to(device)
        loss = model(ids, cross_attention_states=states, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().float())
    out = torch.stack(losses)
    if world > 1:
        dist.all_reduce(out)
        out /= world
    return out


def main() -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fused")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64, help="global batch (split over the processes)")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    rank, world, local = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = hf.from_pretrained(args.fused, dtype=torch.bfloat16 if cuda else torch.float32, device_map=device)
    hf.freeze_all_but_fusion(model)
    hf.shard_with_fsdp2(model)
    data = batches(model.config.vocab_size, model.fusion.encoder_dim, args.steps, args.batch)
    losses = train(model, data, rank=rank, world=world, lr=args.lr, device=device)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps on {world} process(es)")
        model.save_pretrained(args.out, state_dict=state)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
