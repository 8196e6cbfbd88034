"""`loradock serve`: vLLM's OpenAI server with the tiny base, two trained adapters from the registry,
and every kind of adapter it must refuse. Clients: the official `openai` package and plain HTTP."""

import asyncio
import itertools
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx2
import pytest
import yaml
from openai import OpenAI

from loradock.procs import loradock_command
from tests.conftest import ASSETS, ServeProcess, run_loradock, variant

BASE = "loradock/tiny-chat"
PROMPTS = {task: [json.loads(line)["prompt"] for line in (ASSETS / "tasks" / task / "heldout.jsonl").read_text().splitlines()[:10]]
           for task in ("reverse", "sort")}


def bad_adapters(good: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """{repo name: (folder, words the refusal must contain)}"""
    import torch

    pickled = variant(good, tmp / "pickle")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    missing = variant(good, tmp / "missing")
    (missing / "adapter_model.safetensors").unlink()
    a, b = first_lora_pair(good)
    return {
        "other-base": (variant(good, tmp / "other", {"base_model_name_or_path": "someone/other-model"}),
                       "trained on base model 'someone/other-model'"),
        "rank-32": (variant(good, tmp / "r32", {"r": 32}), "rank 32 is above --max-lora-rank 16 (restart with --max-lora-rank 32)"),
        "modules-to-save": (variant(good, tmp / "mts", {"modules_to_save": ["lm_head"]}), "modules_to_save"),
        "pickle": (pickled, "adapter_model.bin would be unpickled"),
        "missing-weights": (missing, "no adapter_model.safetensors"),
        "unknown-module": (variant(good, tmp / "unknown", weights=lambda w: {
            k.replace("q_proj", "qq_proj"): v for k, v in w.items()}), "which the base model does not have"),
        "embedding": (variant(good, tmp / "embed", weights=lambda w: {
            **w, "base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(16, 2048),
            "base_model.model.model.embed_tokens.lora_B.weight": torch.zeros(128, 16)}), "embedding/lm_head LoRA"),
        "wrong-size": (variant(good, tmp / "size", weights=lambda w: {
            k: torch.zeros(v.shape[0], 256) if "lora_A" in k else v for k, v in w.items()}), "a model of another size"),
        "nan": (variant(good, tmp / "nan", weights=lambda w: {**w, b: w[b].index_fill(0, torch.tensor([0]), float("nan"))}),
                f"{b} holds 16 NaN values"),  # row 0 of B (out x rank 16)
        "rank-mismatch": (variant(good, tmp / "rank", weights=lambda w: {**w, a: w[a][:8].clone()}),
                          f"{a} has rank 8 but {b} has rank 16"),
    }


def damaged_records(good: Path, tmp: Path) -> dict[str, Path]:
    """{repo name: folder} of sound adapters whose optional files are damaged: each is served all the same."""
    folders = {name: variant(good, tmp / name) for name in ("metrics-list", "metrics-text-loss", "run-config-types",
                                                           "card-tags")}
    (folders["metrics-list"] / "metrics.json").write_text('{"eval_metrics": [1, 2]}')
    (folders["metrics-text-loss"] / "metrics.json").write_text('{"eval_loss": "x"}')
    (folders["run-config-types"] / "run_config.yaml").write_text("data: 7\nparent: alice/x\ntraining: [1]\n")
    readme = folders["card-tags"] / "README.md"
    _, front, body = readme.read_text().split("---\n", 2)
    readme.write_text(f"---\n{yaml.safe_dump({**yaml.safe_load(front), 'tags': 7})}---\n{body}")
    return folders


def first_lora_pair(folder: Path) -> tuple[str, str]:
    """The names of the first LoRA A/B pair of a trained adapter."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        a = sorted(name for name in f.keys() if ".lora_A." in name)[0]
    return a, a.replace(".lora_A.", ".lora_B.")


@pytest.fixture(scope="module")
def served(registry, trained_adapters, tmp_path_factory):
    """The registry with both adapters (tag v1) and the bad ones, and a server with reverse@v1 at start-up."""
    from huggingface_hub import HfApi

    from hub.client import Registry

    tmp = tmp_path_factory.mktemp("serve")
    commits = {task: Registry(registry.url, registry.write_token).push(str(folder), f"alice/{task}", tag="v1").commit
               for task, folder in trained_adapters.items()}
    api = HfApi(endpoint=registry.url, token=registry.write_token)
    # The bad adapters live in an organisation alice writes to (the registry refuses a namespace nobody owns).
    subprocess.run(loradock_command("hub", "org", "add", "bad", "--member", "alice:write", "--root", registry.root),
                   check=True, capture_output=True)
    bad = bad_adapters(trained_adapters["reverse"], tmp)
    bad_commits = {}
    for name, (folder, _) in bad.items():  # as a careless third party would: no loradock push checks
        api.create_repo(f"bad/{name}", exist_ok=True)
        bad_commits[name] = api.upload_folder(folder_path=folder, repo_id=f"bad/{name}").oid
    damaged = damaged_records(trained_adapters["reverse"], tmp)
    with pytest.MonkeyPatch.context() as patch:  # the card too: as a client that skips validate-yaml would
        patch.setattr(HfApi, "_validate_yaml", lambda self, *args, **kwargs: None)
        for name, folder in damaged.items():
            api.create_repo(f"bad/{name}", exist_ok=True)
            api.upload_folder(folder_path=folder, repo_id=f"bad/{name}")
    env = {**os.environ, "HF_HUB_DISABLE_XET": "1"}
    server = ServeProcess(["--adapter", "alice/reverse@v1", "--registry", registry.url, "--token", registry.write_token,
                           "--adapter-namespace", "alice", "--adapter-namespace", "bad", "--max-lora-rank", "16", "--max-model-len", "256", "--max-loras", "2"], tmp / "serve.log",
                          env).start()  # two slots: two adapters in flight fill them, the last one included
    server.commits, server.bad, server.bad_commits, server.env, server.registry = commits, bad, bad_commits, env, registry
    server.damaged = damaged
    yield server
    server.stop()


def chat(url: str, model: str, content: str, **extra) -> dict:
    response = httpx2.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 24,
        "return_token_ids": True, **extra})
    return {"status": response.status_code, **response.json()}


def test_base_and_adapters_answer_and_the_adapters_differ_on_their_task(served):
    client = OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    for task in ("reverse", "sort"):
        base = [client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": p}], temperature=0,
                                               max_tokens=24).choices[0].message.content for p in PROMPTS[task]]
        tuned = [client.chat.completions.create(model=f"alice/{task}", messages=[{"role": "user", "content": p}],
                                                temperature=0, max_tokens=24).choices[0].message.content
                 for p in PROMPTS[task]]
        assert sum(bool(answer.strip()) for answer in tuned) == len(tuned), tuned  # the adapters always answer
        assert sum(b != t for b, t in zip(base, tuned)) >= 8, (task, base, tuned)


def test_base_answers_are_the_bases_own_while_adapters_stream_in_the_same_batches(served):
    """The comparison screen's traffic: one prompt to the base and to each adapter at the same moment,
    streamed. The base's answers must be what the base says alone (vLLM's stock CPU ops give base
    tokens the last slot's adapter once both slots are in use)."""
    from openai import AsyncOpenAI

    prompts = PROMPTS["reverse"][:6] + PROMPTS["sort"][:6]
    alone = [chat(served.url, BASE, p)["choices"][0]["message"]["content"] for p in prompts]

    async def stream(client, model: str, prompt: str) -> str:
        chunks = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                      temperature=0, max_tokens=24, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    async def together() -> list[str]:
        client = AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
        models = (BASE, "alice/reverse@v1", "alice/sort@v1")
        answers = await asyncio.gather(*[stream(client, m, p) for p in prompts for m in models])
        return answers[::len(models)]  # the base's

    assert asyncio.run(together()) == alone


def test_vllm_greedy_tokens_equal_transformers_peft_greedy_tokens(served, trained_adapters, base_model_dir, tokenizer):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for task, folder in trained_adapters.items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32), folder).eval()
        name = "alice/reverse@v1" if task == "reverse" else f"alice/{task}@{served.commits[task]}"
        for prompt in PROMPTS[task]:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=24, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
            expected = out[:out.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in out else out
            answer = chat(served.url, name, prompt)
            assert answer["status"] == 200 and answer["prompt_token_ids"] == ids["input_ids"][0].tolist()
            assert answer["choices"][0]["token_ids"] == expected, (task, prompt)


def test_hot_load_by_name_tag_and_sha_with_the_sha_in_v1_models(served):
    sha = served.commits["sort"]
    for name in ("alice/sort", "alice/sort@v1", f"alice/sort@{sha}"):
        assert chat(served.url, name, PROMPTS["sort"][0])["status"] == 200
    cards = {m["id"]: m for m in httpx2.get(f"{served.url}/v1/models").json()["data"]}
    for name, revision in (("alice/sort", "main"), ("alice/sort@v1", "v1"), (f"alice/sort@{sha}", sha)):
        assert cards[name]["parent"] == BASE
        assert cards[name]["loradock"]["commit"] == sha and cards[name]["loradock"]["revision"] == revision
        assert cards[name]["loradock"]["rank"] == 16 and cards[name]["loradock"]["metric"]["name"] == "eval loss"
    assert cards["alice/reverse@v1"]["loradock"]["commit"] == served.commits["reverse"]


def test_damaged_records_and_cards_do_not_stop_a_sound_adapter(served):
    """metrics.json, run_config.yaml or the card damaged: the adapter answers, and /v1/models lists it
    without the figure that could not be read."""
    for name in served.damaged:
        answer = chat(served.url, f"bad/{name}", PROMPTS["reverse"][0])
        assert answer["status"] == 200, (name, answer)
    cards = {m["id"]: m for m in httpx2.get(f"{served.url}/v1/models").json()["data"]}
    for name in served.damaged:
        info = cards[f"bad/{name}"]["loradock"]
        assert (info["method"], info["rank"], info["base_model"]) == ("lora", 16, BASE), (name, info)
        assert (info["metric"] is None) == name.startswith("metrics"), (name, info)


def test_refused_adapters_get_400s_while_other_traffic_carries_on(served):
    failures, good_done, stop = [], [], threading.Event()

    def steady(model: str, prompt: str):
        while not stop.is_set():
            answer = chat(served.url, model, prompt)
            (good_done if answer["status"] == 200 else failures).append(answer)

    workers = [threading.Thread(target=steady, args=(m, PROMPTS["reverse"][0])) for m in (BASE, "alice/reverse@v1")]
    for w in workers:
        w.start()
    refused = 0
    try:
        for _ in range(3):
            for name, (folder, words) in served.bad.items():
                answer = chat(served.url, f"bad/{name}", "Reverse the words: a b")
                assert answer["status"] == 400 and words in answer["error"]["message"], (name, answer)
                loaded = httpx2.post(f"{served.url}/v1/load_lora_adapter", json={"lora_name": f"local-{name}",
                                                                                  "lora_path": str(folder)})
                assert loaded.status_code == 400 and words in loaded.json()["error"]["message"], (name, loaded.text)
                refused += 2
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert refused >= 20 and not failures and len(good_done) >= 4
    assert httpx2.get(f"{served.url}/health").status_code == 200


def test_an_adapter_is_served_with_its_own_chat_template(served, trained_adapters, tmp_path):
    templated = variant(trained_adapters["reverse"], tmp_path / "templated")
    template = (templated / "chat_template.jinja").read_text()
    (templated / "chat_template.jinja").write_text("{{- '<|system|>Reverse carefully.<|end|>' -}}" + template)
    loaded = httpx2.post(f"{served.url}/v1/load_lora_adapter", json={"lora_name": "templated", "lora_path": str(templated)})
    assert loaded.status_code == 200, loaded.text
    plain = chat(served.url, "alice/reverse@v1", PROMPTS["reverse"][0])
    own = chat(served.url, "templated", PROMPTS["reverse"][0])
    assert own["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    preamble = served_tokens("<|system|>Reverse carefully.<|end|>")
    assert own["prompt_token_ids"][:len(preamble)] == preamble and plain["prompt_token_ids"][:len(preamble)] != preamble
    sneaky = chat(served.url, BASE, "hi", chat_template="{{ 'pwned' }}")
    assert sneaky["status"] == 400 and "chat_template cannot be set by the client" in sneaky["error"]["message"]


CLIENT_TEMPLATE = "{{ '<|user|>client template<|end|><|assistant|>' }}"
MESSAGES = [{"role": "user", "content": "Reverse the words: a b"}]
# Every route of vLLM's server that renders a chat template, with a body it answers 200 without one.
TEMPLATED_ROUTES = {
    "/v1/chat/completions": {"model": BASE, "messages": MESSAGES, "max_tokens": 2},
    "/v1/completions": {"model": BASE, "prompt": "hi", "max_tokens": 2},
    "/invocations": {"model": BASE, "messages": MESSAGES, "max_tokens": 2},
    "/tokenize": {"model": BASE, "messages": MESSAGES},
    "/v1/responses": {"model": BASE, "input": "Reverse the words: a b", "max_output_tokens": 2},
    "/v1/chat/completions/render": {"model": BASE, "messages": MESSAGES},
    "/v1/messages": {"model": BASE, "messages": MESSAGES, "max_tokens": 2},
    "/v1/chat/completions/batch": {"model": BASE, "messages": [MESSAGES, MESSAGES], "max_tokens": 2},
}


@pytest.mark.parametrize("path", TEMPLATED_ROUTES)
def test_no_route_takes_a_chat_template_from_the_client(served, path):
    """The server trusts request templates (the middleware sets each adapter's own); a client's own
    is refused on every route, in the body itself or inside chat_template_kwargs."""
    body = TEMPLATED_ROUTES[path]
    plain = httpx2.post(served.url + path, json=body, timeout=120)
    # The render routes answer only with vLLM's --enable-scale-out; the refusal comes before that.
    off = path.endswith("/render") and plain.status_code == 403 and "--enable-scale-out" in plain.text
    assert plain.status_code == 200 or off, (path, plain.text[:300])
    for field, sent in (("chat_template", {**body, "chat_template": CLIENT_TEMPLATE}),
                        ("chat_template_kwargs.chat_template", {**body, "chat_template_kwargs": {
                            "chat_template": CLIENT_TEMPLATE, "add_generation_prompt": True}})):
        answer = httpx2.post(served.url + path, json=sent, timeout=120)
        assert answer.status_code == 400, (path, field, answer.status_code, answer.text[:300])
        error = answer.json()["error"]
        assert (error["type"], error["code"], error["param"]) == ("BadRequestError", 400, field), (path, error)
        assert f"{field} cannot be set by the client" in error["message"], (path, error)


def test_a_template_is_refused_wherever_it_is_nested_and_a_null_one_passes(served):
    nested = {**TEMPLATED_ROUTES["/invocations"], "metadata": {"wrapped": [{"chat_template": CLIENT_TEMPLATE}]}}
    answer = httpx2.post(f"{served.url}/invocations", json=nested, timeout=120)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "metadata.wrapped[0].chat_template"
    unset = httpx2.post(f"{served.url}/v1/chat/completions", timeout=120,
                        json={**TEMPLATED_ROUTES["/v1/chat/completions"], "chat_template": None})
    assert unset.status_code == 200, unset.text


def test_broken_weights_are_refused_on_hot_load_naming_the_tensor(served):
    """NaN weights and a LoRA pair whose ranks disagree: a 400 naming the tensor, by registry name at a
    commit and by path, before vLLM sees them; the server keeps serving."""
    for name in ("nan", "rank-mismatch"):
        folder, words = served.bad[name]
        answer = chat(served.url, f"bad/{name}@{served.bad_commits[name]}", "Reverse the words: a b")
        assert answer["status"] == 400 and words in answer["error"]["message"], (name, answer)
        loaded = httpx2.post(f"{served.url}/v1/load_lora_adapter", json={"lora_name": f"path-{name}",
                                                                          "lora_path": str(folder)})
        assert loaded.status_code == 400 and words in loaded.json()["error"]["message"], (name, loaded.text)
    listed = [m["id"] for m in httpx2.get(f"{served.url}/v1/models").json()["data"]]
    assert not [m for m in listed if "nan" in m or "rank-mismatch" in m], listed
    assert chat(served.url, "alice/reverse@v1", PROMPTS["reverse"][0])["status"] == 200


def test_a_broken_adapter_named_at_start_up_is_a_start_up_error(served):
    from loradock.procs import free_port

    _, words = served.bad["nan"]
    result = run_loradock("serve", "--port", free_port(), "--adapter", f"bad/nan@{served.bad_commits['nan']}",
                          "--registry", served.registry.url, "--token", served.registry.write_token,
                          env=served.env, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert words in result.stderr and "drop this --adapter" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def served_tokens(text: str) -> list[int]:
    from transformers import AutoTokenizer

    from sft.base_model import resolve_base_model

    return AutoTokenizer.from_pretrained(resolve_base_model(BASE)).encode(text, add_special_tokens=False)


def test_openai_api_surface(served):
    client = OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    completion = client.completions.create(model="alice/reverse@v1", prompt="<|user|>Reverse the words: a b<|end|><|assistant|>",
                                           max_tokens=8, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="alice/reverse@v1", messages=[{"role": "user", "content": PROMPTS["reverse"][1]}],
                                            max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].usage.prompt_tokens > 0
    text_stream = list(client.completions.create(model=BASE, prompt="<|user|>Hello!<|end|><|assistant|>", max_tokens=8,
                                                 stream=True, temperature=0))
    assert "".join(c.choices[0].text for c in text_stream).strip()
    unknown = chat(served.url, "alice/nothing", "hi")  # a namespace it hot-loads from, a name it lacks
    assert unknown["status"] == 404 and unknown["error"]["param"] == "model"
    assert chat(served.url, BASE, "hi", temperature=-1)["status"] == 400
    assert chat(served.url, BASE, "hi", max_tokens=-5)["status"] == 400
    too_long = chat(served.url, BASE, "cat " * 400)
    assert too_long["status"] == 400 and "maximum context length" in too_long["error"]["message"]
    assert httpx2.get(f"{served.url}/health").status_code == 200


def test_eval_through_the_endpoint_scores_each_served_model(served, tmp_path):
    heldout, report_path = ASSETS / "tasks" / "reverse" / "heldout.jsonl", tmp_path / "report.json"
    result = run_loradock("eval", "--base-url", f"{served.url}/v1", "--model", BASE, "--model", "alice/reverse@v1",
                          "--data", heldout, "--limit", "24", "--output", report_path, env=served.env, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["rows"] == 24 and list(report["metrics"]) == [BASE, "alice/reverse@v1"]
    assert report["metrics"]["alice/reverse@v1"]["rouge_l"] > report["metrics"][BASE]["rouge_l"] + 0.2
    assert all(example[BASE] != example["alice/reverse@v1"] for example in report["examples"][:5])
    assert f"via {served.url}/v1" in result.stdout and "alice/reverse@v1" in result.stdout
    missing = run_loradock("eval", "--base-url", f"{served.url}/v1", "--model", "alice/nothing", "--data", heldout,
                           env=served.env, timeout=120)
    assert missing.returncode == 2 and "--model alice/nothing: the server answered 404" in missing.stderr
    assert f"pass a model that {served.url}/v1/models lists" in missing.stderr


def test_unload_while_requests_are_in_flight(served):
    results, started = [], [threading.Event() for _ in range(6)]

    def ask(first_token: threading.Event):
        body = {"model": "alice/sort@v1", "messages": [{"role": "user", "content": PROMPTS["sort"][1]}],
                "max_tokens": 128, "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx2.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            text = "".join(itertools.islice(lines, 1))  # the first chunk: vLLM has the request
            first_token.set()
            text += "".join(lines)
        results.append((response.status_code, "[DONE]" in text and '"error"' not in text))

    assert chat(served.url, "alice/sort@v1", "warm up")["status"] == 200
    threads = [threading.Thread(target=ask, args=(event,)) for event in started]
    for t in threads:
        t.start()
    # All six are generating before the unload: none may fail, and the adapter is gone afterwards. The
    # window the middleware's gate closes (a request between vLLM's name check and its adapter lookup)
    # is too narrow to hit on purpose; the gate's own test below covers it.
    assert all(event.wait(60) for event in started)
    unloaded = httpx2.post(f"{served.url}/v1/unload_lora_adapter", json={"lora_name": "alice/sort@v1"})
    for t in threads:
        t.join()
    assert unloaded.status_code == 200 and results == [(200, True)] * 6
    assert "alice/sort@v1" not in [m["id"] for m in httpx2.get(f"{served.url}/v1/models").json()["data"]]
    assert chat(served.url, "alice/sort@v1", PROMPTS["sort"][1])["status"] == 200  # resolved again from the registry


def test_hot_loading_outside_the_served_namespaces_is_refused_before_the_registry_is_asked(served):
    assert "hot-loading from alice, bad" in served.log.read_text()
    for name in ("loradock/reverse", "eve/anything@v1"):
        answer = chat(served.url, name, "hello")
        assert answer["status"] == 403 and answer["error"]["type"] == "PermissionDeniedError", answer
        assert "not in a namespace this server hot-loads adapters from (alice, bad)" in answer["error"]["message"]
        assert f"--adapter-namespace {name.split('/')[0]}" in answer["error"]["message"]
    assert chat(served.url, "alice/sort@v1", PROMPTS["sort"][0])["status"] == 200


def stalled_stream(url: str, model: str) -> socket.socket:
    """A streaming request whose client reads nothing: its answer (32 choices of 200 tokens, each
    with 20 logprobs: megabytes) outgrows the socket buffers, so vLLM's response, and with it the
    request, stays in flight until the socket is closed."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPTS["sort"][2]}], "n": 32,
                       "max_tokens": 200, "ignore_eos": True, "logprobs": True, "top_logprobs": 20, "stream": True})
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect((host, int(port)))
    client.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    assert client.recv(15).startswith(b"HTTP/1.1 200"), "the stalled stream did not start"
    return client


def settled(url: str, timeout: float = 180) -> None:
    """Wait until vLLM's engine runs no request (its Prometheus gauge) and the API process answers a
    one-token request for the base within a second: the engine can finish a request long before the
    API process has turned its outputs (here, tens of thousands of logprobs) into chunks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gauges = [line for line in httpx2.get(f"{url}/metrics", timeout=60).text.splitlines()
                  if line.startswith("vllm:num_requests_running")]
        if gauges and sum(float(line.rsplit(" ", 1)[1]) for line in gauges) == 0:
            began = time.monotonic()
            answer = chat(url, BASE, "ping", max_tokens=1)
            if answer["status"] == 200 and time.monotonic() - began < 1:
                return
        time.sleep(0.2)
    raise AssertionError(f"the server was still busy after {timeout} s")


def test_an_unload_held_past_its_drain_deadline_is_a_409_and_requests_go_on(served):
    """The served fixture runs with the default --unload-drain-timeout of 5 s."""
    assert chat(served.url, "alice/sort@v1", "warm up")["status"] == 200
    stalled = stalled_stream(served.url, "alice/sort@v1")
    try:
        # The server finishes generating it (the answer then waits on the socket), so the timings
        # below measure the drain, not requests competing for the engine or the API process.
        settled(served.url)
        outcome = {}

        def unload():
            began = time.monotonic()
            outcome["unload"] = httpx2.post(f"{served.url}/v1/unload_lora_adapter", json={"lora_name": "alice/sort@v1"},
                                            timeout=60)
            outcome["unload_s"] = time.monotonic() - began

        unloading = threading.Thread(target=unload)
        unloading.start()
        time.sleep(1)  # the unload is draining: a new request for the adapter is held back...
        began = time.monotonic()
        late = chat(served.url, "alice/sort@v1", PROMPTS["sort"][0])
        late_s = time.monotonic() - began
        unloading.join()
        assert outcome["unload"].status_code == 409, outcome["unload"].text
        error = outcome["unload"].json()["error"]
        assert error["type"] == "ConflictError" and "after the 5 s drain deadline: nothing was unloaded" in error["message"]
        assert "--unload-drain-timeout" in error["message"]
        assert 5 <= outcome["unload_s"] < 15
        assert late["status"] == 200 and late_s < 15  # ...until the deadline, not past it
        assert chat(served.url, "alice/sort@v1", PROMPTS["sort"][0])["status"] == 200  # still served
    finally:
        stalled.close()
    deadline = time.monotonic() + 60  # the stalled request ends once vLLM sees its client gone
    while (unloaded := httpx2.post(f"{served.url}/v1/unload_lora_adapter", json={"lora_name": "alice/sort@v1"},
                                   timeout=60)).status_code == 409 and time.monotonic() < deadline:
        pass
    assert unloaded.status_code == 200, unloaded.text
    assert httpx2.get(f"{served.url}/health").status_code == 200


def test_restart_brings_back_the_command_line_adapters_and_the_api_key_closes_every_route(served, tmp_path):
    """Restarted from a --config file this time, whose `vllm:` section must reach vLLM's engine."""
    assert served.stop() == 0  # SIGTERM: a clean stop
    key = "s3cret-key"
    settings = tmp_path / "serve.yaml"
    settings.write_text(yaml.safe_dump({"adapter": ["alice/reverse@v1"], "max_lora_rank": 16, "max_model_len": 256,
                                        "log_level": "info", "vllm": {"max_cpu_loras": 6}}))
    again = ServeProcess(["--config", str(settings), "--registry", served.registry.url, "--token",
                          served.registry.write_token, "--api-key", key], tmp_path / "serve.log", served.env).start()
    try:
        auth = {"Authorization": f"Bearer {key}"}
        models = httpx2.get(f"{again.url}/v1/models", headers=auth).json()["data"]
        pinned = f"alice/reverse@{served.commits['reverse']}"  # vLLM holds the commit; the name is followed
        assert [m["id"] for m in models] == [BASE, pinned, "alice/reverse@v1"]
        assert models[2]["loradock"]["commit"] == served.commits["reverse"] and models[2]["root"] == models[1]["root"]
        assert httpx2.get(f"{again.url}/health").status_code == 200
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/invocations"),
                             ("POST", "/adapters"), ("POST", "/tokenize"), ("GET", "/metrics"), ("GET", "/version"),
                             ("GET", "/openapi.json"), ("POST", "/v1/load_lora_adapter")]:
            response = httpx2.request(method, again.url + path, json={})
            assert response.status_code == 401, (path, response.status_code)
            assert response.json()["error"]["type"] == "AuthenticationError"
        assert chat_with(again.url, auth)["choices"][0]["message"]["content"].strip()
        assert chat_with(again.url, {"Authorization": f"bearer {key}"})["choices"][0]["message"]["content"].strip()
        vllm_log = Path(os.environ["LORADOCK_HOME"]) / "logs" / f"serve-{again.port}.log"
        for log_text in ((tmp_path / "serve.log").read_text(), vllm_log.read_text()):
            assert key not in log_text and served.registry.write_token not in log_text
        non_default = next(line for line in vllm_log.read_text().splitlines() if "non-default args" in line)
        assert "'max_cpu_loras': 6" in non_default and "'max_model_len': 256" in non_default
    finally:
        assert again.stop() == 0
    served.start()  # leave the module's server running for any test after this one


def chat_with(url: str, headers: dict) -> dict:
    return httpx2.post(f"{url}/v1/chat/completions", headers=headers, timeout=120, json={
        "model": "alice/reverse@v1", "messages": [{"role": "user", "content": PROMPTS["reverse"][0]}], "max_tokens": 16}).json()


def test_an_unload_waits_for_the_requests_using_the_adapter_and_holds_new_ones():
    from serve.inflight import InFlight

    async def scenario():
        gate, events = InFlight(drain_timeout=5), []

        async def request(name: str, tag: str, seconds: float):
            async with gate.using(name):
                events.append(f"{tag} start")
                await asyncio.sleep(seconds)
                events.append(f"{tag} end")

        async def unload(name: str):
            async with gate.unloading(name):
                events.append(f"unload {name}")
                await asyncio.sleep(0.05)

        first = asyncio.create_task(request("a", "first", 0.1))
        other = asyncio.create_task(request("b", "other", 0.02))
        await asyncio.sleep(0.01)
        unloading = asyncio.create_task(unload("a"))
        await asyncio.sleep(0.01)
        late = asyncio.create_task(request("a", "late", 0))
        await asyncio.gather(first, other, unloading, late)
        return events

    events = asyncio.run(scenario())
    assert events.index("first end") < events.index("unload a") < events.index("late start")
    assert events.index("other end") < events.index("first end")  # another adapter is not held back


def test_an_unload_past_its_drain_deadline_is_busy_and_lets_the_held_requests_go():
    from loradock.errors import Busy
    from serve.inflight import InFlight

    async def scenario():
        gate, loop, events = InFlight(drain_timeout=0.3), asyncio.get_running_loop(), {}
        start = loop.time()

        async def request(tag: str, seconds: float):
            async with gate.using("a"):
                events[f"{tag} start"] = loop.time() - start
                await asyncio.sleep(seconds)
            events[f"{tag} end"] = loop.time() - start

        async def unload():
            try:
                async with gate.unloading("a"):
                    events["unloaded"] = loop.time() - start
            except Busy as e:
                events["busy"], events["why"] = loop.time() - start, e.problem

        long = asyncio.create_task(request("long", 1.5))
        await asyncio.sleep(0.05)
        unloading = asyncio.create_task(unload())
        await asyncio.sleep(0.05)
        late = asyncio.create_task(request("late", 0))
        await asyncio.gather(unloading, late)
        second_unload_while_long_runs = asyncio.create_task(unload())
        await asyncio.gather(long, second_unload_while_long_runs)
        await unload()  # nothing in flight: it goes through at once
        return events

    events = asyncio.run(scenario())
    assert "adapter 'a' is still answering 1 request(s) after the 0.3 s drain deadline" in events["why"]
    assert 0.3 <= events["busy"] < 1.0 and 0.3 <= events["late start"] < 1.0  # held up to the deadline, not past it
    assert events["late start"] < events["long end"]
    assert events["unloaded"] >= events["long end"]  # the third unload, after the long request ended
