"""`loradock serve` with prompt-tuning and p-tuning adapters (vLLM's prompt-embeddings input): PEFT's
greedy tokens, streamed and whole, hot-swapped among LoRA and base requests, listed in /v1/models;
and the adapters it refuses. One server for the module; clients: `openai` and plain HTTP."""

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest

from tests.conftest import ASSETS, ServeProcess

BASE = "loradock/tiny-chat"
TASK = ASSETS / "tasks" / "reverse"
HELDOUT = [json.loads(line)["prompt"] for line in (TASK / "heldout.jsonl").read_text().splitlines()[:12]]
MAX_TOKENS = 24


# --- adapters built with PEFT directly ------------------------------------------------------------

def finish(model, base_dir: Path, folder: Path) -> Path:
    """Saved as PEFT saves it, recording the base by its served name, with the base's tokenizer."""
    model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": BASE}))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(base_dir / name, folder / name)
    return folder


def soft_prompt_adapter(base_dir: Path, folder: Path, peft_config, steps: int = 40, seed: int = 0) -> Path:
    """A prompt-learning adapter trained a few Adam steps on 16 rows of the reverse task."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), peft_config)
    rows = [json.loads(line) for line in (TASK / "train.jsonl").read_text().splitlines()[:16]]
    batch = tokenizer.apply_chat_template([[{"role": "user", "content": r["prompt"]}, {"role": "assistant",
                                            "content": r["response"]}] for r in rows],
                                          padding=True, return_dict=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return finish(model.eval(), base_dir, folder)


def prefix_tuning_adapter(base_dir: Path, folder: Path) -> Path:
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    return finish(model, base_dir, folder)


def narrow_copy(source: Path, folder: Path, width: int = 64) -> Path:
    """A prompt-tuning adapter whose soft prompt is `width` wide: trained on another model."""
    import torch
    from safetensors.torch import save_file

    shutil.copytree(source, folder)
    save_file({"prompt_embeddings": torch.randn(8, width)}, folder / "adapter_model.safetensors")
    return folder


@pytest.fixture(scope="module")
def adapters(base_model_dir, tmp_path_factory) -> dict[str, Path]:
    from peft import PromptEncoderConfig, PromptTuningConfig

    from tests.test_lora_ops import random_lora

    out = tmp_path_factory.mktemp("prompt-adapters")
    folders = {
        "prompt-tuning": soft_prompt_adapter(base_model_dir, out / "prompt-tuning", PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=8)),
        "p-tuning": soft_prompt_adapter(base_model_dir, out / "p-tuning", PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_hidden_size=64), seed=1),
        "lora": finish_lora(random_lora(base_model_dir, out / "lora", 8, seed=3, alpha=64), base_model_dir),
        "prefix-tuning": prefix_tuning_adapter(base_model_dir, out / "prefix-tuning"),
    }
    folders["narrow"] = narrow_copy(folders["prompt-tuning"], out / "narrow")
    return folders


def finish_lora(folder: str, base_dir: Path) -> Path:
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    (Path(folder) / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": BASE}))
    shutil.copy(base_dir / "chat_template.jinja", Path(folder) / "chat_template.jinja")
    return Path(folder)


@pytest.fixture(scope="module")
def served(registry, adapters, tmp_path_factory):
    """alice/{prompt-tuning,p-tuning,lora} (tag v1) and bad/{prefix-tuning,narrow} in the registry; a
    server with the p-tuning and LoRA adapters at start-up, the prompt-tuning one hot-loaded by name."""
    from huggingface_hub import HfApi

    from hub.client import Registry

    for name in ("prompt-tuning", "p-tuning", "lora"):
        Registry(registry.url, registry.write_token).push(str(adapters[name]), f"alice/{name}", tag="v1")
    api = HfApi(endpoint=registry.url, token=registry.write_token)
    for name in ("prefix-tuning", "narrow"):
        api.create_repo(f"bad/{name}", exist_ok=True)
        api.upload_folder(folder_path=adapters[name], repo_id=f"bad/{name}")
    env = {**os.environ, "HF_HUB_DISABLE_XET": "1"}
    server = ServeProcess(["--adapter", "alice/p-tuning@v1", "--adapter", "alice/lora@v1", "--registry", registry.url,
                           "--token", registry.write_token, "--adapter-namespace", "alice", "--adapter-namespace", "bad",
                           "--max-lora-rank", "8", "--max-model-len", "256", "--max-loras", "2"],
                          tmp_path_factory.mktemp("serve") / "serve.log", env).start()
    yield server
    server.stop()


def chat(url: str, model: str, content: str, **extra) -> dict:
    response = httpx2.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
        "max_tokens": MAX_TOKENS, "return_token_ids": True, **extra})
    return {"status": response.status_code, **response.json()}


def answer(url: str, model: str, content: str) -> str:
    reply = chat(url, model, content)
    assert reply["status"] == 200, reply
    return reply["choices"][0]["message"]["content"]


# --- served ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_prompt_and_p_tuning_answer_with_pefts_greedy_tokens(served, adapters, base_model_dir, tokenizer):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_answers = [answer(served.url, BASE, p) for p in HELDOUT]
    for kind, name in (("prompt-tuning", "alice/prompt-tuning"), ("p-tuning", "alice/p-tuning@v1")):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32),
                                          adapters[kind]).eval()
        tuned = []
        for prompt in HELDOUT:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)[0, ids["input_ids"].shape[1]:]
            out = out.tolist()
            expected = out[:out.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in out else out
            reply = chat(served.url, name, prompt)
            assert reply["status"] == 200 and reply["model"] == name, reply
            assert reply["prompt_token_ids"] == ids["input_ids"][0].tolist()
            assert reply["choices"][0]["token_ids"] == expected, (kind, prompt)
            assert reply["usage"]["prompt_tokens"] == 8 + len(reply["prompt_token_ids"])  # the soft prompt counts
            tuned.append(reply["choices"][0]["message"]["content"])
        assert sum(t != b for t, b in zip(tuned, base_answers)) >= 3, (kind, tuned, base_answers)


@pytest.mark.slow
def test_streamed_answers_are_the_whole_answers_under_the_adapters_name(served):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    name, prompt = "alice/prompt-tuning", HELDOUT[1]
    whole = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=MAX_TOKENS)
    assert whole.object == "chat.completion" and whole.model == name and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                 temperature=0, max_tokens=MAX_TOKENS, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and {c.model for c in chunks} == {name}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # /v1/completions of the rendered chat: the same tokens, whole and streamed
    rendered = f"<|user|>{prompt}<|end|><|assistant|>"
    text = client.completions.create(model=name, prompt=rendered, temperature=0, max_tokens=MAX_TOKENS)
    assert text.object == "text_completion" and text.model == name
    assert text.choices[0].text == whole.choices[0].message.content
    streamed = list(client.completions.create(model=name, prompt=rendered, temperature=0, max_tokens=MAX_TOKENS,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text and {c.model for c in streamed} == {name}


@pytest.mark.slow
def test_base_lora_and_prompt_tuning_requests_interleaved_answer_as_each_alone(served):
    models, prompts = (BASE, "alice/lora@v1", "alice/prompt-tuning"), HELDOUT[:6]
    alone = {(m, p): answer(served.url, m, p) for m in models for p in prompts}
    assert len({tuple(alone[m, p] for p in prompts) for m in models}) == 3  # three different models
    jobs = [(m, p) for p in prompts for m in models] * 2
    with ThreadPoolExecutor(max_workers=9) as pool:
        together = list(pool.map(lambda job: answer(served.url, *job), jobs))
    assert together == [alone[job] for job in jobs]


@pytest.mark.slow
def test_v1_models_lists_prompt_tuning_adapters_with_their_method(served):
    assert chat(served.url, "alice/prompt-tuning", HELDOUT[0])["status"] == 200  # hot-loaded by now
    cards = {card["id"]: card for card in httpx2.get(f"{served.url}/v1/models").json()["data"]}
    lora = cards["alice/lora@v1"]
    for name, method in (("alice/p-tuning@v1", "p-tuning"), ("alice/prompt-tuning", "prompt-tuning"),
                         ("alice/lora@v1", "lora")):
        card = cards[name]
        assert card["object"] == "model" and card["parent"] == BASE and Path(card["root"]).is_dir()
        assert card["owned_by"] == lora["owned_by"] and set(card) == set(lora)
        assert card["loradock"]["method"] == method and card["loradock"]["revision"] in ("v1", "main")
        assert card["loradock"]["commit"]


@pytest.mark.slow
def test_a_prompt_tuning_folder_loads_and_unloads_by_path(served, adapters):
    loaded = httpx2.post(f"{served.url}/v1/load_lora_adapter", json={"lora_name": "local-pt",
                                                                      "lora_path": str(adapters["prompt-tuning"])})
    assert loaded.status_code == 200, loaded.text
    assert answer(served.url, "local-pt", HELDOUT[2]) == answer(served.url, "alice/prompt-tuning", HELDOUT[2])
    assert "local-pt" in [m["id"] for m in httpx2.get(f"{served.url}/v1/models").json()["data"]]
    unloaded = httpx2.post(f"{served.url}/v1/unload_lora_adapter", json={"lora_name": "local-pt"})
    assert unloaded.status_code == 200, unloaded.text
    assert chat(served.url, "local-pt", HELDOUT[2])["status"] == 404
    assert "local-pt" not in [m["id"] for m in httpx2.get(f"{served.url}/v1/models").json()["data"]]


@pytest.mark.slow
def test_refusals_name_the_widths_the_eval_command_and_the_context_length(served, adapters):
    for how, reply in (("by name", chat(served.url, "bad/narrow", HELDOUT[0])),
                       ("by path", load(served.url, "narrow", adapters["narrow"]))):
        assert reply["status"] == 400, (how, reply)
        assert "shape [8, 64]" in reply["error"]["message"] and "128 wide" in reply["error"]["message"], (how, reply)
    for how, reply in (("by name", chat(served.url, "bad/prefix-tuning", HELDOUT[0])),
                       ("by path", load(served.url, "prefix", adapters["prefix-tuning"]))):
        assert reply["status"] == 400, (how, reply)
        assert "prefix-tuning adapter" in reply["error"]["message"] and "loradock eval" in reply["error"]["message"]
    too_long = chat(served.url, "alice/prompt-tuning", HELDOUT[0], max_tokens=250)
    assert too_long["status"] == 400 and "8 soft-prompt vectors" in too_long["error"]["message"], too_long
    assert "max_tokens 250" in too_long["error"]["message"] and "context length 256" in too_long["error"]["message"]
    assert chat(served.url, "alice/prompt-tuning", HELDOUT[0], temperature=-1)["status"] == 400  # vLLM's own check
    assert httpx2.get(f"{served.url}/health").status_code == 200


def load(url: str, name: str, folder: Path) -> dict:
    response = httpx2.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)})
    return {"status": response.status_code, **(response.json() if response.status_code != 200 else {})}


# --- the pieces, without a server -----------------------------------------------------------------

def test_startup_prompt_tuning_adapters_are_not_lora_modules(tmp_path):
    from serve.config import ServeConfig
    from serve.launcher import vllm_command

    folders = {}
    for name, config in (("a/lora", {"peft_type": "LORA", "r": 8}),
                         ("a/pt", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}),
                         ("a/ptune", {"peft_type": "P_TUNING", "num_virtual_tokens": 8})):
        folders[name] = tmp_path / name.replace("/", "-")
        folders[name].mkdir()
        (folders[name] / "adapter_config.json").write_text(json.dumps(config))
    config = ServeConfig(base_path="/models/base", startup_adapters={k: str(v) for k, v in folders.items()})
    command = vllm_command(config, on_gpu=False, vllm_config=None)
    assert "--enable-prompt-embeds" in command and "--enable-lora" in command
    assert [command[i + 1] for i, arg in enumerate(command) if arg == "--lora-modules"] == [f"a/lora={folders['a/lora']}"]


@pytest.mark.parametrize("config, method, served_by", [
    ({"peft_type": "LORA", "r": 8}, "lora", "vllm-lora"),
    ({"peft_type": "LORA", "r": 8, "use_rslora": True}, "rslora", "vllm-lora"),
    ({"peft_type": "LORA", "r": 8, "use_dora": True}, "dora", "merge"),
    ({"peft_type": "IA3"}, "ia3", "merge"),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}, "prompt-tuning", "prompt-embeds"),
    ({"peft_type": "P_TUNING", "num_virtual_tokens": 8}, "p-tuning", "prompt-embeds"),
    ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8}, "prefix-tuning", "eval"),
    ({"peft_type": "ADAPTION_PROMPT"}, "llama-adapter", "eval"),
])
def test_every_method_is_described_with_its_name_and_route(tmp_path, config, method, served_by):
    from serve.runtime import describe

    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": BASE}))
    adapter = describe("alice/x@v1", tmp_path)
    assert adapter.info["method"] == method and adapter.served_by == served_by
    assert adapter.soft_prompt == (served_by == "prompt-embeds")


def test_a_completion_becomes_the_chat_answer_and_chunks_the_endpoint_called():
    from serve.soft_prompt import CHAT, Translation

    completion = {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": BASE, "usage": {"prompt_tokens": 9},
                  "choices": [{"index": 0, "text": "b a", "finish_reason": "stop", "stop_reason": None,
                               "token_ids": [4, 7], "logprobs": {"tokens": ["b", " a"], "token_logprobs": [-0.5, -0.1],
                                                                  "top_logprobs": [{"b": -0.5}, {" a": -0.1}]}}]}
    whole = Translation(CHAT, "alice/pt", [1, 2]).body(completion)
    assert whole["object"] == "chat.completion" and whole["model"] == "alice/pt" and whole["prompt_token_ids"] == [1, 2]
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "b a"} and whole["usage"] == completion["usage"]
    assert whole["choices"][0]["logprobs"]["content"][1] == {"token": " a", "logprob": -0.1, "bytes": [32, 97],
                                                             "top_logprobs": [{"token": " a", "logprob": -0.1,
                                                                               "bytes": [32, 97]}]}
    stream = Translation(CHAT, "alice/pt", None)
    first, second = stream.event(json.dumps({**completion, "usage": None})), stream.event(json.dumps(completion))
    assert [json.loads(c)["choices"][0]["delta"] for c in first] == [{"role": "assistant", "content": ""},
                                                                     {"content": "b a"}]
    assert [json.loads(c)["choices"][0]["delta"] for c in second] == [{"content": "b a"}]  # the role once
    assert stream.event("[DONE]") == ["[DONE]"] and stream.event('{"error": {"code": 400}}') == ['{"error": {"code": 400}}']
    usage = json.loads(stream.event(json.dumps({**completion, "choices": []}))[0])
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 9} and usage["object"] == "chat.completion.chunk"


def test_the_length_bound_names_every_number():
    from loradock.errors import InvalidRequest
    from serve.soft_prompt import check_length

    check_length(8, 40, 208, 256)
    with pytest.raises(InvalidRequest, match=r"8 soft-prompt vectors \+ 40 prompt tokens \+ max_tokens 209 = 257 "
                                             r"positions, over the model's context length 256"):
        check_length(8, 40, 209, 256)
    with pytest.raises(InvalidRequest, match="at least 1 new token"):
        check_length(8, 248, None, 256)
