"""Multi-LoRA ops for vLLM's CPU backend, installed by loradock's vLLM plugin (`serve.resolver`)
into every vLLM process that `loradock serve` starts.

vLLM's CPU backend (`PunicaWrapperCPU`) applies LoRA with the PyTorch-native ops of
`vllm/lora/ops/torch_ops/lora_ops.py`. Two things are wrong with them there:

- **Base requests batched with adapter requests get an adapter's delta.** A token with no adapter
  carries the slot index -1, and `lora_b_weights[indices]` turns -1 into the *last* slot. While
  that slot holds an adapter, every base token in the batch is changed by it.
- **They are slow.** Each call gathers a per-token copy of the weights (tokens x out x rank) and
  then runs an einsum over it.

The ops here have the same signatures and semantics, except that a token with index -1 gets no
delta. Shrink multiplies all tokens by every slot's A at once (one matmul, tokens x slots x rank)
and keeps each token's own slot; expand places each token's rank-sized input in its slot's block
of a (tokens x slots*rank) matrix, zeros elsewhere, and multiplies by every slot's B stacked (one
matmul). Memory per call is tokens x slots x rank, never tokens x out x rank; the extra
arithmetic grows with slots x rank, which suits the CPU's handful of slots. Written by hand: no
library provides these ops for vLLM's CPU backend. `docs/cpu-lora-ops.md` is the write-up.
"""

import logging

import torch

logger = logging.getLogger("loradock.lora_ops")

# vLLM releases whose `PunicaWrapperCPU` and torch ops these replace were read and tested.
CHECKED_VLLM_VERSIONS = ("0.32.0",)
OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def _stacked(weights: torch.Tensor) -> torch.Tensor:
    """Slots x rows x cols: vLLM stacks per-layer weights as [slots, 1, rows, cols] or [slots, rows, cols]."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _own_slot(per_slot: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[tokens, slots, k] -> [tokens, k]: each token's own slot's row; zeros for index -1 (no adapter)."""
    tokens, _, k = per_slot.shape
    picked = per_slot.gather(1, indices.clamp(min=0).view(tokens, 1, 1).expand(tokens, 1, k)).squeeze(1)
    return picked * (indices >= 0).unsqueeze(1).to(picked.dtype)


def _lora_product(inputs: torch.Tensor, lora_b_weights: torch.Tensor, indices: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """[tokens, out]: each token's `inputs` row times its slot's B (zero rows for index -1)."""
    weights = _stacked(lora_b_weights).to(dtype)  # [slots, out, rank]
    slots, out, rank = weights.shape
    tokens = inputs.shape[0]
    spread = inputs.new_zeros((tokens, slots, rank), dtype=dtype)  # token t's input in its slot's block
    active = indices >= 0
    spread[active, indices[active]] = inputs[active].to(dtype)
    return spread.view(tokens, slots * rank) @ weights.permute(0, 2, 1).reshape(slots * rank, out)


def bgmv_shrink(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, scaling: float = 1.0):
    """output[t, :rank] = scaling * inputs[t] @ A[slot(t)].T (zero for tokens with no adapter)."""
    weights = _stacked(lora_b_weights).to(output_tensor.dtype)  # [slots, rank, in]
    slots, rank, hidden = weights.shape
    per_slot = (inputs.to(output_tensor.dtype) @ weights.reshape(slots * rank, hidden).T).view(-1, slots, rank)
    output_tensor[:, :rank] = scaling * _own_slot(per_slot, lora_indices_tensor)


def bgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, add_inputs: bool = True):
    outputs = _lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1  # as the stock op: one row broadcast
    # LoRA adapter and model may add different amounts of padding to the output.
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      lora_indices_tensor: torch.Tensor, slice_offset: int, slice_size: int, add_inputs: bool = True):
    outputs = _lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset:slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset:slice_offset + slice_size] = outputs


def _per_token(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    """Prefill: the slot of each sequence, repeated for each of its tokens."""
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):
    bgmv_expand(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


def install() -> bool:
    """Put these ops in place of the stock ones in `PunicaWrapperCPU`, on the CPU platform of a
    checked vLLM release only; anywhere else, leave the stock ops and log why. Returns whether
    they were installed."""
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        logger.info("loradock's CPU LoRA ops are not installed: the platform is %s, not the CPU",
                    current_platform.device_name)
        return False
    if vllm.__version__ not in CHECKED_VLLM_VERSIONS:
        logger.warning("loradock's CPU LoRA ops are not installed: they were checked against vLLM %s, this is %s "
                       "(the stock ops serve base requests in mixed batches wrongly)",
                       ", ".join(CHECKED_VLLM_VERSIONS), vllm.__version__)
        return False
    from vllm.lora.punica_wrapper import punica_cpu

    for name in OPS:
        setattr(punica_cpu, name, globals()[name])
    logger.info("loradock's CPU LoRA ops installed in PunicaWrapperCPU (vLLM %s)", vllm.__version__)
    return True
