"""Encoder masks at decoding time, as either torchtune era passes them."""

from __future__ import annotations

import torch


def rows_for_positions(encoder_mask: torch.Tensor | None, input_pos: torch.Tensor | None,
                       seq_len: int) -> torch.Tensor | None:
    """The rows of ``encoder_mask`` for the tokens at ``input_pos``.

    torchtune's first ``DeepFusionModel`` took the whole sequence's mask ``[b, S, e]`` while
    decoding and sliced it by ``input_pos`` (``[s]`` or ``[b, s]``) itself; later releases expect the
    caller to pass the ``[b, s, e]`` rows. A mask that already has ``seq_len`` rows is returned
    as it is; one that covers the whole sequence is sliced.
    """
    if encoder_mask is None or input_pos is None or encoder_mask.shape[1] == seq_len:
        return encoder_mask
    if input_pos.shape[-1] != seq_len:
        raise ValueError(f"input_pos has {input_pos.shape[-1]} position(s) for {seq_len} token(s)")
    if int(input_pos.max()) >= encoder_mask.shape[1]:
        raise ValueError(f"encoder_mask has {encoder_mask.shape[1]} row(s), neither one per token ({seq_len}) "
                         f"nor one per position up to {int(input_pos.max())}")
    index = input_pos.long()
    if index.dim() == 1:
        return encoder_mask[:, index]
    return encoder_mask[torch.arange(encoder_mask.shape[0], device=index.device)[:, None], index]
