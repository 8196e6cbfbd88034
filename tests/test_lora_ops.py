"""loradock's CPU multi-LoRA ops (`serve.lora_ops`) against a per-token reference, vLLM's stock
torch ops against the same reference (they fail it for tokens with no adapter), and the plugin's
install rules. Tensors only: no engine, no server."""

import logging

import pytest
import torch

from serve import lora_ops

SLOTS, RANK, HIDDEN, OUT = 3, 8, 64, 96


def reference_shrink(x, a, indices, scale):
    """Token by token: scale * x[t] @ A[slot].T, zero for a token with no adapter (-1)."""
    a = a.squeeze(1) if a.dim() == 4 else a
    return torch.stack([scale * x[t] @ a[i].T if i >= 0 else torch.zeros(a.shape[1]) for t, i in enumerate(indices)])


def reference_expand(x, b, indices):
    b = b.squeeze(1) if b.dim() == 4 else b
    return torch.stack([x[t] @ b[i].T if i >= 0 else torch.zeros(b.shape[1]) for t, i in enumerate(indices)])


def weights(rows: int, cols: int, four_d: bool) -> torch.Tensor:
    w = torch.randn(SLOTS, rows, cols)
    return w.unsqueeze(1) if four_d else w


# Tokens with no adapter (-1) mixed in, and the last slot in use: the case the stock ops get wrong.
INDICES = torch.tensor([-1, 0, 2, -1, 1, 2, -1, 0])


def ops_of(kind: str):
    from vllm.lora.ops import torch_ops

    return lora_ops if kind == "fast" else torch_ops


@pytest.mark.parametrize("four_d", [False, True])
def test_shrink_and_expand_match_the_per_token_reference(four_d):
    torch.manual_seed(0)
    x, a, b = torch.randn(len(INDICES), HIDDEN), weights(RANK, HIDDEN, four_d), weights(OUT, RANK, four_d)
    buffer = torch.full((len(INDICES), RANK), 7.0)  # stale values must be overwritten
    lora_ops.bgmv_shrink(x, a, buffer, INDICES, 0.5)
    torch.testing.assert_close(buffer, reference_shrink(x, a, INDICES, 0.5))
    y = torch.randn(len(INDICES), OUT)
    expected = y + reference_expand(buffer, b, INDICES)
    lora_ops.bgmv_expand(buffer, b, y, INDICES, add_inputs=True)
    torch.testing.assert_close(y, expected)


def test_expand_slice_writes_only_its_slice_like_fused_qkv():
    torch.manual_seed(1)
    x, b = torch.randn(len(INDICES), RANK), weights(32, RANK, True)
    y = torch.randn(len(INDICES), 96)
    expected = y.clone()
    expected[:, 40:72] += reference_expand(x, b, INDICES)
    lora_ops.bgmv_expand_slice(x, b, y, INDICES, 40, 32, add_inputs=True)
    torch.testing.assert_close(y, expected)
    lora_ops.bgmv_expand_slice(x, b, y, INDICES, 40, 32, add_inputs=False)
    torch.testing.assert_close(y[:, 40:72], reference_expand(x, b, INDICES))


def test_prefill_ops_give_each_sequence_its_slot():
    torch.manual_seed(2)
    seq_lens, seq_slots = torch.tensor([3, 1, 4]), torch.tensor([2, -1, 0])
    per_token = torch.repeat_interleave(seq_slots, seq_lens)
    x, a, b = torch.randn(8, HIDDEN), weights(RANK, HIDDEN, True), weights(OUT, RANK, True)
    meta = (torch.tensor([0, 3, 4]), seq_lens, seq_slots, 3, 4, 8)
    buffer = torch.zeros(8, RANK)
    lora_ops.sgmv_shrink(x, a, buffer, *meta, 2.0)
    torch.testing.assert_close(buffer, reference_shrink(x, a, per_token, 2.0))
    y = torch.zeros(8, OUT)
    lora_ops.sgmv_expand(buffer, b, y, *meta, add_inputs=True)
    torch.testing.assert_close(y, reference_expand(buffer, b, per_token))
    z = torch.zeros(8, OUT + 8)
    lora_ops.sgmv_expand_slice(buffer, b, z, *meta, 8, OUT, add_inputs=True)
    torch.testing.assert_close(z[:, 8:], reference_expand(buffer, b, per_token))


@pytest.mark.parametrize("kind", ["fast", "stock"])
def test_tokens_with_no_adapter_get_no_delta(kind):
    """A base request's tokens (index -1) batched with adapters: nothing may be added to them."""
    ops = ops_of(kind)
    torch.manual_seed(3)
    x, a, b = torch.randn(len(INDICES), HIDDEN), weights(RANK, HIDDEN, True), weights(OUT, RANK, True)
    buffer, y = torch.zeros(len(INDICES), RANK), torch.zeros(len(INDICES), OUT)
    ops.bgmv_shrink(x, a, buffer, INDICES, 1.0)
    ops.bgmv_expand(buffer, b, y, INDICES, add_inputs=True)
    base_rows = y[INDICES < 0]
    if kind == "stock":  # vLLM 0.32's torch ops: -1 indexes the last slot, so base tokens get its delta
        assert base_rows.abs().sum() > 0
    else:
        assert torch.count_nonzero(base_rows) == 0
        torch.testing.assert_close(y[INDICES >= 0], reference_expand(buffer, b, INDICES)[INDICES >= 0])


def reference_lora_linear(y, x, lora_a, lora_b, indices, scale, slices):
    """Token by token and slice by slice: what `add_lora_linear` must add to `y`."""
    y, offset = y.clone(), 0
    for a, b, size in zip(lora_a, lora_b, slices):
        y[:, offset:offset + size] += reference_expand(reference_shrink(x, a, indices, scale), b, indices)
        offset += size
    return y


class Wrapper:
    """What `add_lora_linear` reads of vLLM's `PunicaWrapperCPU`: the step's token indices."""

    def __init__(self, indices: torch.Tensor):
        self.token_lora_indices = indices


# Batches the layer path must get right: adapters round-robin with base tokens (padded groups), one
# adapter for every token, groups of very different sizes (each group on its own), a subset of the
# slots in no particular order, and base tokens only.
BATCHES = {
    "round-robin with base tokens": [-1, 0, 2, -1, 1, 2, -1, 0, 1],
    "one adapter for every token": [1] * 7,
    "one long prefill beside single tokens": [2] * 12 + [0, -1, 1],
    "a subset of the slots, unordered": [2, 2, 0, 0, -1, 2, 0],
    "base tokens only": [-1] * 5,
}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_the_layer_path_matches_the_per_token_reference_on_fused_slices(batch, scale):
    torch.manual_seed(4)
    indices = torch.tensor(BATCHES[batch])
    slices = (32, 16, 16)  # fused qkv-like: one input, three output slices with their own A and B
    x, y = torch.randn(len(indices), HIDDEN), torch.randn(len(indices), sum(slices))
    lora_a = tuple(weights(RANK, HIDDEN, True) for _ in slices)
    lora_b = tuple(weights(size, RANK, True) for size in slices)
    expected = reference_lora_linear(y, x, lora_a, lora_b, indices, scale, slices)
    lora_ops.add_lora_linear(Wrapper(indices), y, x, lora_a, lora_b, scale, slices)
    torch.testing.assert_close(y, expected)
    base = indices < 0
    assert torch.equal(y[base], expected[base])  # bit for bit: nothing at all was added to base tokens


def test_slot_groups_pad_balanced_batches_and_split_unbalanced_ones():
    balanced = lora_ops.SlotGroups(torch.tensor(BATCHES["round-robin with base tokens"]))
    assert balanced.padded and balanced.slots == [0, 1, 2] and balanced.active == 6
    unbalanced = lora_ops.SlotGroups(torch.tensor(BATCHES["one long prefill beside single tokens"]))
    assert not unbalanced.padded and [slot for slot, _, _ in unbalanced.spans] == [0, 1, 2]
    assert lora_ops.SlotGroups(torch.tensor(BATCHES["base tokens only"])).empty


def test_the_plugin_installs_them_on_the_cpu_of_a_checked_vllm(monkeypatch):
    from vllm.lora.punica_wrapper import punica_cpu

    wrapper = punica_cpu.PunicaWrapperCPU
    for name in lora_ops.OPS:
        monkeypatch.setattr(punica_cpu, name, getattr(punica_cpu, name))  # restored after the test
    for name in lora_ops.WRAPPER_METHODS:
        monkeypatch.setattr(wrapper, name, getattr(wrapper, name))
    assert lora_ops.install()
    assert all(getattr(punica_cpu, name) is getattr(lora_ops, name) for name in lora_ops.OPS)
    assert all(getattr(wrapper, name) is method for name, method in lora_ops.WRAPPER_METHODS.items())


def test_an_unchecked_vllm_or_a_gpu_keeps_the_stock_ops_and_says_why(monkeypatch, caplog):
    import vllm
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.platforms import current_platform

    stock = {name: getattr(punica_cpu, name) for name in lora_ops.OPS}
    stock_methods = {name: getattr(punica_cpu.PunicaWrapperCPU, name) for name in lora_ops.WRAPPER_METHODS}
    with caplog.at_level(logging.INFO, logger="loradock.lora_ops"):
        monkeypatch.setattr(vllm, "__version__", "9.9.9")
        assert not lora_ops.install()
        assert "checked against vLLM 0.32.0, this is 9.9.9" in caplog.text
        monkeypatch.undo()
        monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
        assert not lora_ops.install()
        assert "not the CPU" in caplog.text
    assert {name: getattr(punica_cpu, name) for name in lora_ops.OPS} == stock
    assert {name: getattr(punica_cpu.PunicaWrapperCPU, name) for name in lora_ops.WRAPPER_METHODS} == stock_methods


# --- through vLLM's engine ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_adapters(base_model_dir, tmp_path_factory) -> list[str]:
    """Two LoRA adapters of the tiny base with random, non-zero A and B on every linear layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model_dir),
                               LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
        folder = tmp_path_factory.mktemp(f"random-{seed}")
        model.save_pretrained(folder)
        folders.append(str(folder))
    return folders


def mixed_batch_answers(base_model_dir, adapters, ops: str) -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "LORADOCK_LORA_OPS": ops, "VLLM_CPU_KVCACHE_SPACE": "1"}
    script = Path(__file__).with_name("mixed_batch.py")
    done = subprocess.run([sys.executable, str(script), str(base_model_dir), *adapters], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.slow
def test_base_requests_in_a_mixed_batch_answer_as_the_base_alone(base_model_dir, random_adapters):
    from tests.mixed_batch import MIX

    got = mixed_batch_answers(base_model_dir, random_adapters, "fast")
    for i, which in enumerate(MIX):
        expected = got["base"][i] if which is None else got[f"adapter{which}"][i]
        assert got["mixed"][i] == expected, (i, which)
    assert got["adapter1"] != got["base"] and got["adapter2"] != got["base"]  # the adapters do change answers


@pytest.mark.slow
def test_the_stock_ops_fail_that_test(base_model_dir, random_adapters):
    """The check above tells the ops apart: vLLM's own give some base request an adapter's delta."""
    from tests.mixed_batch import MIX

    got = mixed_batch_answers(base_model_dir, random_adapters, "stock")
    base_in_mix = [got["mixed"][i] for i, which in enumerate(MIX) if which is None]
    assert base_in_mix != [got["base"][i] for i, which in enumerate(MIX) if which is None]
