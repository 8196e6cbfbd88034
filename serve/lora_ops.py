"""Multi-LoRA ops for vLLM's CPU backend, installed by loradock's vLLM plugin (`serve.plugin`)
into every vLLM process that `loradock serve` starts.

vLLM's CPU backend (`PunicaWrapperCPU`) applies LoRA with the PyTorch-native ops of
`vllm/lora/ops/torch_ops/lora_ops.py`. Two things are wrong with them there:

- **Base requests batched with adapter requests get an adapter's delta.** A token with no adapter
  carries the slot index -1, and `lora_b_weights[indices]` turns -1 into the *last* slot. While
  that slot holds an adapter, every base token in the batch is changed by it.
- **They are slow.** Each call gathers a per-token copy of the weights (tokens x out x rank) and
  then runs an einsum over it.

loradock's replacements keep the semantics for tokens with an adapter and give a token with index
-1 no delta. The LoRA linear layers (`PunicaWrapperCPU.add_lora_linear`, nearly all the work) use
`SlotGroups`: the step's tokens grouped by slot once per step, then per layer one shrink for all
fused slices and one expand per slice, batched over the groups, with no work at all for base
tokens. The six punica ops (still used for embeddings and logits) multiply all tokens by every
slot's weights at once and keep each token's own slot. Memory per call is bounded by tokens x
slots x rank and the size of the output, never tokens x out x rank. Written by hand: no library
provides these ops for vLLM's CPU backend. `docs/cpu-lora-ops.md` is the write-up.
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


_warned: set[str] = set()


def _per_row(indices: torch.Tensor, rows: int) -> torch.Tensor:
    """One slot index per row of an op's input.

    The layer ops get one index per token, and the logits ops one per sampled token (vLLM's
    `sampler_indices`), as many as the rows, except when vLLM computes logits for a request's prompt
    positions (`prompt_logprobs`, `echo` with logprobs): then the rows are that one request's prompt
    while the indices are still the whole batch's, one per request. When the batch's requests share
    one slot (or have none), that slot is every row's, as in the stock op's broadcast of a single
    index. When they differ, which request the rows belong to is not passed down, so the rows get
    no delta and a warning is logged once: exact for every adapter without LoRA on the LM head (the
    only ones `loradock serve` loads, where the logits' LoRA is skipped altogether:
    `serve.plugin.plain_logits`), where the stock ops stop the engine with a shape error.
    """
    if indices.shape[0] == rows:
        return indices
    if indices.numel() and bool((indices == indices[0]).all()):
        return indices[:1].expand(rows)
    if "rows" not in _warned:
        _warned.add("rows")
        logger.warning("LoRA op called with %d rows for %d requests of different adapters (prompt logprobs in "
                       "a mixed batch): no LoRA delta on those rows' logits", rows, indices.shape[0])
    return indices.new_full((rows,), -1)


def _own_slot(per_slot: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[tokens, slots, k] -> [tokens, k]: each token's own slot's row; zeros for index -1 (no adapter)."""
    tokens, _, k = per_slot.shape
    indices = _per_row(indices, tokens)
    picked = per_slot.gather(1, indices.clamp(min=0).view(tokens, 1, 1).expand(tokens, 1, k)).squeeze(1)
    return picked * (indices >= 0).unsqueeze(1).to(picked.dtype)


def _lora_product(inputs: torch.Tensor, lora_b_weights: torch.Tensor, indices: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """[tokens, out]: each token's `inputs` row times its slot's B (zero rows for index -1)."""
    weights = _stacked(lora_b_weights).to(dtype)  # [slots, out, rank]
    slots, out, rank = weights.shape
    tokens = inputs.shape[0]
    indices = _per_row(indices, tokens)
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


class SlotGroups:
    """One step's tokens grouped by adapter slot, computed once per step (when vLLM updates the
    LoRA mapping) and used by every LoRA layer of that step.

    Tokens with no adapter (index -1) are in no group, so they get no delta. When the groups are
    about the same size (decode with adapters round-robin, one adapter, ...), they are laid out as
    a padded [groups, longest, ...] batch, and a layer's LoRA is one `torch.bmm` for the shrink of
    all its slices and one per slice for the expand, whatever the number of adapters; when sizes
    differ a lot (a long prefill beside single decode tokens), each group gets its own matmuls
    instead, so padding never costs more than half the work. Either way the products land in one buffer whose last row is zero, and each token takes
    its row back with one `index_select` (the zero row for a token with no adapter): a gather and
    a dense add, several times faster on the CPU than scattering with `index_add_`.
    """

    def __init__(self, indices: torch.Tensor):
        order = torch.argsort(indices, stable=True)
        slots, counts = torch.unique_consecutive(indices[order], return_counts=True)
        slots, counts = slots.tolist(), counts.tolist()
        skipped = counts[0] if slots and slots[0] < 0 else 0
        if skipped:
            slots, counts = slots[1:], counts[1:]
        self.tokens = order[skipped:]  # tokens with an adapter, grouped by slot
        self.slots, self.active, self.batch = slots, len(self.tokens), len(indices)
        self.empty = self.active == 0
        if self.empty:
            return
        self.one_adapter = self.active == self.batch and len(slots) == 1  # for the whole batch
        self.slot_index = torch.tensor(slots, dtype=torch.long)
        longest, starts = max(counts), [0, *torch.tensor(counts).cumsum(0).tolist()]
        self.padded = len(slots) == 1 or len(slots) * longest <= 1.5 * self.active
        if self.padded:
            group = torch.repeat_interleave(torch.arange(len(slots)), torch.tensor(counts))
            place = group * longest + torch.arange(self.active) - torch.tensor(starts[:-1])[group]
            self.shape, self.products = (len(slots), longest), len(slots) * longest
            self.rows = torch.zeros(self.products, dtype=torch.long)  # padding reads row 0; never read back
            self.rows[place] = self.tokens
        else:
            self.spans, self.products = list(zip(slots, starts[:-1], starts[1:])), self.active
            place = torch.arange(self.active)
        self.source = torch.full((self.batch,), self.products, dtype=torch.long)  # the zero row...
        self.source[self.tokens] = place  # ...except for tokens with an adapter: their own product

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, lora_a: tuple[torch.Tensor, ...],
                 lora_b: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...]) -> None:
        """y[t, slice i] += scale * x[t] @ A_i[slot(t)].T @ B_i[slot(t)].T for each token with an adapter.

        The slices of a fused layer (q/k/v, gate/up) share their input, so their A are stacked and
        shrunk in one product; each slice is then expanded with its own B."""
        whole = self.one_adapter and x.shape[0] == self.batch
        rank = _stacked(lora_a[0]).shape[1]
        if len(lora_a) == 1:
            weights_a = _stacked(lora_a[0])
        else:  # [slots, slices * rank, in]
            weights_a = torch.cat([_stacked(a) for a in lora_a], 1)
        if whole:
            shrunk = x.to(torch.float32) @ weights_a[self.slots[0]].to(torch.float32).T
        elif self.padded:
            xs = x.index_select(0, self.rows).view(*self.shape, x.shape[-1]).to(torch.float32)
            shrunk = torch.bmm(xs, self._in_use(weights_a).to(torch.float32).transpose(1, 2))
        else:
            xs = x.index_select(0, self.tokens).to(torch.float32)
            shrunk = torch.cat([xs[start:end] @ weights_a[slot].to(torch.float32).T for slot, start, end in self.spans])
        if scale != 1.0:
            shrunk = shrunk * scale
        shrunk = shrunk.to(y.dtype)
        offset = 0
        for i, (b, size) in enumerate(zip(lora_b, output_slices)):
            target, part = y[:self.batch, offset:offset + size], shrunk[..., i * rank:(i + 1) * rank]
            offset += size
            weights_b = _stacked(b).to(y.dtype)  # [slots, out, rank]
            if whole:
                target.addmm_(part, weights_b[self.slots[0], :size].T)
                continue
            products = target.new_empty((self.products + 1, size))
            products[-1] = 0
            if self.padded:
                torch.bmm(part, self._in_use(weights_b[:, :size]).transpose(1, 2),
                          out=products[:-1].view(*self.shape, size))
            else:
                for slot, start, end in self.spans:
                    torch.mm(part[start:end], weights_b[slot, :size].T, out=products[start:end])
            target += products.index_select(0, self.source)

    def _in_use(self, weights: torch.Tensor) -> torch.Tensor:
        """[groups, rows, cols]: the stacked weights of the slots in use, in group order."""
        if len(self.slots) == weights.shape[0] and self.slots == list(range(weights.shape[0])):
            return weights
        return weights.index_select(0, self.slot_index)


def update_metadata(self, *args, **kwargs) -> None:
    """`PunicaWrapperCPU.update_metadata`, then the step's slot groups."""
    _STOCK["update_metadata"](self, *args, **kwargs)
    self.loradock_groups = SlotGroups(self.token_lora_indices)


def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                    lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                    *, buffer=None, **kwargs) -> None:
    """`PunicaWrapperCPU.add_lora_linear` (every LoRA linear layer, fused slices included), on the
    step's slot groups."""
    groups = getattr(self, "loradock_groups", None)
    if groups is None:
        groups = self.loradock_groups = SlotGroups(self.token_lora_indices)
    if groups.empty:
        return
    groups.add_lora(y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1]), lora_a_stacked, lora_b_stacked, scale,
                    output_slices)


_STOCK: dict = {}
WRAPPER_METHODS = {"update_metadata": update_metadata, "add_lora_linear": add_lora_linear}


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
    wrapper = punica_cpu.PunicaWrapperCPU
    for name, method in WRAPPER_METHODS.items():
        _STOCK.setdefault(name, getattr(wrapper, name))
        setattr(wrapper, name, method)
    logger.info("loradock's CPU LoRA ops installed in PunicaWrapperCPU (vLLM %s)", vllm.__version__)
    return True
