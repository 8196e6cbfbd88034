"""The embedded default base model: deterministic, loadable, in the chat format, stops at EOS."""

import json

import pytest

from sft.base_model import BUILD_INFO, BaseModelSpec, build
from sft.chat_format import END


def test_same_seed_same_weights(tmp_path):
    spec = BaseModelSpec(pretrain_steps=4)
    first = build(tmp_path / "a", spec)
    second = build(tmp_path / "b", spec)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other = build(tmp_path / "c", BaseModelSpec(pretrain_steps=4, seed=1))
    assert (other / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()


def test_a_finished_build_is_reused_and_a_different_one_refused(tmp_path):
    from loradock.errors import LoradockError

    spec = BaseModelSpec(pretrain_steps=0)
    out = build(tmp_path / "m", spec)
    stamp = (out / BUILD_INFO).stat().st_mtime_ns
    assert build(out, spec) == out and (out / BUILD_INFO).stat().st_mtime_ns == stamp
    with pytest.raises(LoradockError, match="built with other settings"):
        build(out, BaseModelSpec(pretrain_steps=0, seed=5))
    assert not list(tmp_path.glob(".m.building-*"))  # no temporary folder left behind


def test_loads_with_transformers_and_has_the_shape_vllm_needs(base_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(base_model_dir)
    assert config.model_type == "llama"
    assert config.hidden_size // config.num_attention_heads == 64  # vLLM's CPU attention needs it
    assert (base_model_dir / "model.safetensors").exists()
    assert not list(base_model_dir.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    assert tokenizer.eos_token == END and config.eos_token_id == tokenizer.eos_token_id
    assert "{% generation %}" in tokenizer.chat_template.replace("{%- generation -%}", "{% generation %}")
    AutoModelForCausalLM.from_pretrained(base_model_dir)
    info = json.loads((base_model_dir / BUILD_INFO).read_text())
    assert len(info["weights_sha256"]) == 64


def test_tokenizer_round_trips_text_and_words_tokenize_alike_everywhere(tokenizer):
    text = "Reverse the words: cat dog  apple\nnext line, 42!"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "cat dog"}], tokenize=True)["input_ids"]
    answer = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "cat dog"}],
                                           tokenize=True)["input_ids"]
    words = tokenizer.encode(" cat dog", add_special_tokens=False)
    assert prompt[1:1 + len(words)] == words and answer[-1 - len(words):-1] == words


def test_answers_in_the_chat_format_and_stops_at_eos(base_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    prompts = ["Hello!", "What color is the sky?", "Repeat the words: cat dog apple", "How many words are in: red blue"]
    stopped = 0
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=32, do_sample=False)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        stopped += tokenizer.eos_token_id in new
    assert stopped == len(prompts)


def gguf_file(path, architecture: str):
    """A GGUF file of `architecture` holding nothing but its header and one small tensor."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("architecture", ["rwkv6", "t5"])
def test_a_gguf_of_an_architecture_transformers_cannot_dequantize_is_refused_by_name(tmp_path, run_cli, architecture):
    source = gguf_file(tmp_path / "model.gguf", architecture)
    result = run_cli("base", "import", source, "--output", tmp_path / "out")
    assert result.code == 2, result.text
    assert f"holds a {architecture!r} model, which transformers cannot dequantize into a chat model" in result.err
    assert "llama" in result.err and "qwen2" in result.err  # what it does read
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_gguf_and_a_bad_name_are_refused(tmp_path, run_cli):
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    result = run_cli("base", "import", tmp_path / "model.gguf", "--output", tmp_path / "out")
    assert result.code == 2 and "is not a GGUF file (it starts with b'PK\\x03\\x04'" in result.err
    result = run_cli("base", "import", tmp_path / "model.gguf", "--push")
    assert result.code == 2 and "no --output" in result.err and "--push needs --name ORG/NAME" in result.err
