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


# Logits for one request's prompt positions (prompt_logprobs, echo with logprobs): vLLM hands the
# logits ops these rows with the whole batch's per-request indices.
PROMPT_ROWS = 5


@pytest.mark.parametrize("kind", ["fast", "stock"])
@pytest.mark.parametrize("batch", [[2], [1, 1, 1], [-1, -1]])
def test_a_prompts_logits_rows_take_the_slot_the_batchs_requests_share(kind, batch):
    ops = ops_of(kind)
    torch.manual_seed(5)
    indices = torch.tensor(batch)
    x, a, b = torch.randn(PROMPT_ROWS, HIDDEN), weights(RANK, HIDDEN, True), weights(OUT, RANK, True)
    per_row = indices[:1].expand(PROMPT_ROWS)
    buffer, y = torch.zeros(PROMPT_ROWS, RANK), torch.zeros(PROMPT_ROWS, OUT)
    if kind == "stock" and len(batch) > 1:  # vLLM 0.32's torch ops: a shape error, and the engine is gone
        with pytest.raises(RuntimeError):
            ops.bgmv_shrink(x, a, buffer, indices, 1.0)
        return
    ops.bgmv_shrink(x, a, buffer, indices, 1.0)
    ops.bgmv_expand(buffer, b, y, indices, add_inputs=True)
    if kind == "stock" and batch == [-1, -1]:
        return  # the stock ops' -1 is the last slot (the mixed-batch bug), tested above
    torch.testing.assert_close(buffer, reference_shrink(x, a, per_row, 1.0))
    torch.testing.assert_close(y, reference_expand(buffer, b, per_row))


def test_a_prompts_logits_rows_in_a_batch_of_several_adapters_get_no_delta_and_a_warning(caplog):
    torch.manual_seed(6)
    indices = torch.tensor([0, -1, 2])
    x, a, b = torch.randn(PROMPT_ROWS, HIDDEN), weights(RANK, HIDDEN, True), weights(OUT, RANK, True)
    buffer, y = torch.full((PROMPT_ROWS, RANK), 7.0), torch.randn(PROMPT_ROWS, OUT)
    before = y.clone()
    lora_ops._warned.clear()
    with caplog.at_level(logging.WARNING, logger="loradock.lora_ops"):
        lora_ops.bgmv_shrink(x, a, buffer, indices, 1.0)
        lora_ops.bgmv_expand(buffer, b, y, indices, add_inputs=True)
        lora_ops.bgmv_expand_slice(buffer, b, y, indices, 0, OUT, add_inputs=True)
    assert torch.count_nonzero(buffer) == 0 and torch.equal(y, before)
    assert "5 rows for 3 requests of different adapters" in caplog.text


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

def random_lora(model_dir, folder, rank: int, seed: int, alpha: int, rslora: bool = False) -> str:
    """A LoRA adapter of rank `rank` on every linear layer, random non-zero A and B (with `rslora`,
    scaled by alpha/sqrt(rank) instead of alpha/rank)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False,
                                      use_rslora=rslora))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def random_adapters(base_model_dir, tmp_path_factory) -> list[str]:
    """Two LoRA adapters of the tiny base with random, non-zero A and B on every linear layer."""
    return [random_lora(base_model_dir, tmp_path_factory.mktemp(f"random-{seed}"), 8, seed, alpha=16) for seed in (1, 2)]


def mixed_batch_answers(base_model_dir, adapters, ops: str, max_loras: int = 2, *extra: str) -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "LORADOCK_LORA_OPS": ops, "VLLM_CPU_KVCACHE_SPACE": "1"}
    script = Path(__file__).with_name("mixed_batch.py")
    done = subprocess.run([sys.executable, str(script), str(base_model_dir), *map(str, adapters), str(max_loras), *extra],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.slow
def test_base_requests_in_a_mixed_batch_answer_as_the_base_alone(base_model_dir, random_adapters):
    from tests.mixed_batch import MIX

    got = mixed_batch_answers(base_model_dir, random_adapters, "fast", 2, "prompt-logprobs")
    for i, which in enumerate(MIX):
        expected = got["base"][i] if which is None else got[f"adapter{which}"][i]
        assert got["mixed"][i] == expected, (i, which)
    assert got["adapter1"] != got["base"] and got["adapter2"] != got["base"]  # the adapters do change answers
    # prompt_logprobs computes each request's prompt logits on its own, with the batch's adapter indices:
    # the engine lives, the answers are unchanged, and base requests' prompt logprobs are the base's own.
    assert got["mixed_with_prompt_logprobs"] == got["mixed"] and got["base_with_prompt_logprobs"] == got["base"]
    for i, which in enumerate(MIX):
        if which is None:
            mixed, alone = got["mixed_prompt_logprobs"][i], got["base_prompt_logprobs"][i]
            assert [None if p is None else sorted(p) for p in mixed] == [None if p is None else sorted(p) for p in alone]
            assert all(p is None or all(abs(p[k] - q[k]) < 1e-4 for k in p) for p, q in zip(mixed, alone)), i


@pytest.mark.slow
def test_the_stock_ops_fail_that_test(base_model_dir, random_adapters):
    """The check above tells the ops apart: vLLM's own give some base request an adapter's delta."""
    from tests.mixed_batch import MIX

    got = mixed_batch_answers(base_model_dir, random_adapters, "stock")
    base_in_mix = [got["mixed"][i] for i, which in enumerate(MIX) if which is None]
    assert base_in_mix != [got["base"][i] for i, which in enumerate(MIX) if which is None]


# --- parity: the fast ops, the stock ops and PEFT give the same greedy tokens --------------------

@pytest.fixture(scope="module")
def fused_model_dir(base_model_dir, tmp_path_factory):
    """A tiny Phi-3 (random weights, the tiny base's tokenizer): its checkpoint and its LoRA
    adapters hold q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`, so vLLM applies each
    as a single slice, unlike Llama's three and two."""
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("tiny-phi3")
    Phi3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def peft_answers(model_dir, adapters: list[str]) -> dict:
    """Greedy answers of transformers + PEFT (float32), as `mixed_batch.py` gives vLLM's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.mixed_batch import PROMPTS

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      adapters[0], adapter_name="adapter1")
    model.load_adapter(adapters[1], adapter_name="adapter2")
    model.eval()

    def greedy(prompt: str) -> list[int]:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        return out[0, ids["input_ids"].shape[1]:].tolist()

    answers = {}
    for name in ("adapter1", "adapter2"):
        model.set_adapter(name)
        answers[name] = [greedy(p) for p in PROMPTS]
    with model.disable_adapter():
        answers["base"] = [greedy(p) for p in PROMPTS]
    return answers


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "fused"])
def test_fast_ops_answer_as_the_stock_ops_and_peft(model, base_model_dir, fused_model_dir, tmp_path):
    """Mixed batches of base requests and adapters of ranks 8 and 16 (the second rsLoRA: scale
    4/sqrt(16) = 1 where plain LoRA's would be 4/16), prefill and decode: the fast ops' greedy
    tokens equal PEFT's and the stock ops' (given a free last slot, where the stock ops are right)
    token for token, float32."""
    from tests.mixed_batch import MIX

    model_dir = base_model_dir if model == "llama" else fused_model_dir
    adapters = [random_lora(model_dir, tmp_path / "rank8", 8, 1, alpha=8),
                random_lora(model_dir, tmp_path / "rank16", 16, 2, alpha=4, rslora=True)]
    fast = mixed_batch_answers(model_dir, adapters, "fast")
    stock = mixed_batch_answers(model_dir, adapters, "stock", max_loras=3)  # the last slot stays empty
    reference = peft_answers(model_dir, adapters)
    assert reference["adapter1"] != reference["base"] and reference["adapter2"] != reference["base"]
    for key in ("base", "adapter1", "adapter2"):
        assert fast[key] == reference[key] == stock[key], key
    expected = [reference["base" if which is None else f"adapter{which}"][i] for i, which in enumerate(MIX)]
    assert fast["mixed"] == expected == stock["mixed"]


def test_the_plugin_logs_each_slot_swap(monkeypatch):
    """Under `loradock serve`, vLLM moving an adapter into a slot is one log line (how the serving
    benchmark counts swaps); an adapter already in a slot is none."""
    from vllm.lora.model_manager import LRUCacheLoRAModelManager

    from serve import plugin

    moved = {1: True, 2: False}
    monkeypatch.setattr(LRUCacheLoRAModelManager, "activate_adapter", lambda self, lora_id: moved[lora_id])
    plugin.log_slot_swaps()
    plugin.log_slot_swaps()  # a second plugin load must not log twice
    manager = LRUCacheLoRAModelManager.__new__(LRUCacheLoRAModelManager)
    manager.lora_config = type("LoRAConfig", (), {"max_loras": 8})()
    records, handler, logger = [], logging.Handler(logging.INFO), logging.getLogger("vllm.loradock")
    handler.emit = records.append
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # what `loradock serve --log-level info` sets through vLLM
    try:
        assert LRUCacheLoRAModelManager.activate_adapter(manager, 1) is True
        assert LRUCacheLoRAModelManager.activate_adapter(manager, 2) is False
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.getMessage() for r in records] == [f"{plugin.SWAP_LINE}: adapter 1 into a slot (8 slots)"]
