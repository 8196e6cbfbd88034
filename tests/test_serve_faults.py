"""`loradock serve` under what careless clients and failing neighbours do: every sampling option of the
OpenAI routes through the base, a LoRA and a prompt-tuning adapter (the engine must live), the same
text on every path, a frozen registry, an engine killed under it (`--restart-engine`) and a
`loradock serve` killed by SIGKILL during streams. Clients: the official `openai` package and plain HTTP."""

import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest
import yaml

from tests.conftest import ASSETS, ServeProcess
from tests.test_procs import alive

BASE = "loradock/tiny-chat"
PROMPTS = [json.loads(line)["prompt"] for line in (ASSETS / "tasks" / "reverse" / "heldout.jsonl").read_text().splitlines()[:8]]
LORA, PROMPT_TUNING, BY_PATH = "alice/faults-lora", "alice/faults-prompt-tuning", "faults-by-path"


@pytest.fixture(scope="module")
def adapters(base_model_dir, tmp_path_factory) -> dict[str, Path]:
    from peft import PromptTuningConfig

    from tests.test_lora_ops import random_lora
    from tests.test_prompt_serving import finish_lora, soft_prompt_adapter

    out = tmp_path_factory.mktemp("fault-adapters")
    return {
        "lora": finish_lora(random_lora(base_model_dir, out / "lora", 8, seed=11, alpha=32), base_model_dir),
        "by-path": finish_lora(random_lora(base_model_dir, out / "by-path", 8, seed=12, alpha=32), base_model_dir),
        "prompt-tuning": soft_prompt_adapter(base_model_dir, out / "prompt-tuning", PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=8), steps=10),
    }


def serve_args(registry, config: Path, *extra) -> list[str]:
    return ["--config", str(config), "--registry", registry.url, "--token", registry.write_token,
            "--adapter-namespace", "alice", *extra]


@pytest.fixture(scope="module")
def settings(registry, adapters, tmp_path_factory) -> Path:
    """The LoRA adapter at start-up, the prompt-tuning one hot-loaded by name; prefills chunked at 32
    tokens, so long prompts are split and batched with other requests' decode steps."""
    from hub.client import Registry

    Registry(registry.url, registry.write_token).push(str(adapters["lora"]), LORA)
    Registry(registry.url, registry.write_token).push(str(adapters["prompt-tuning"]), PROMPT_TUNING)
    path = tmp_path_factory.mktemp("fault-settings") / "serve.yaml"
    path.write_text(yaml.safe_dump({"adapter": [LORA], "max_lora_rank": 8, "max_model_len": 256, "max_loras": 2,
                                    "vllm": {"max_num_batched_tokens": 32}}))
    return path


@pytest.fixture(scope="module")
def served(registry, settings, tmp_path_factory):
    server = ServeProcess(serve_args(registry, settings), tmp_path_factory.mktemp("faults") / "serve.log",
                          {**os.environ, "HF_HUB_DISABLE_XET": "1"}).start()
    yield server
    if server.service.process.poll() is None:
        server.stop()


def post(url: str, path: str, body: dict, timeout: float = 120) -> httpx2.Response:
    return httpx2.post(f"{url}{path}", json=body, timeout=timeout)


# --- every sampling option, every route -------------------------------------------------------------

def sampling_options(rng: random.Random) -> dict:
    """A random mix of the OpenAI routes' sampling and output options (vLLM's extras included), with
    the values at and past their edges that clients send."""
    choices = {
        "temperature": [0, 0.7, 2.0], "top_p": [0.1, 1.0], "top_k": [-1, 1, 5], "min_p": [0.0, 0.2],
        "max_tokens": [1, 4, 16], "min_tokens": [0, 3], "n": [1, 2], "seed": [0, 7],
        "presence_penalty": [-2.0, 0.5], "frequency_penalty": [0.0, 2.0], "repetition_penalty": [1.0, 1.3],
        "stop": [None, ["z"], "the"], "ignore_eos": [True, False], "logit_bias": [None, {"5": 10, "7": -100}],
        "prompt_logprobs": [None, 0, 1, 3], "include_stop_str_in_output": [True, False],
        "skip_special_tokens": [True, False], "return_token_ids": [True, False], "stream": [False, True],
    }
    return {key: rng.choice(values) for key, values in choices.items() if rng.random() < 0.5}


def fuzzed_request(rng: random.Random) -> tuple[str, dict]:
    model = rng.choice([BASE, LORA, PROMPT_TUNING])
    options = sampling_options(rng)
    prompt = rng.choice(PROMPTS) + (" and again" * rng.choice([0, 0, 20]))  # some prompts are chunked
    route = rng.choice(["chat", "completions", "batch"])
    if route == "chat":
        if rng.random() < 0.5:
            options.update(logprobs=True, top_logprobs=rng.choice([0, 2, 5]))
        if rng.random() < 0.3:
            options.update(echo=True, add_generation_prompt=False)
        return "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": prompt}], **options}
    if route == "completions":
        if rng.random() < 0.5:
            options["logprobs"] = rng.choice([0, 1, 5])
        if rng.random() < 0.4:
            options["echo"] = True
        return "/v1/completions", {"model": model, "prompt": f"<|user|>{prompt}<|end|><|assistant|>", **options}
    options.pop("stream", None)
    return "/v1/chat/completions/batch", {"model": model, "messages": [[{"role": "user", "content": p}]
                                                                      for p in rng.sample(PROMPTS, 2)], **options}


def test_no_sampling_option_on_any_route_or_path_brings_the_server_down(served):
    """Fuzzed: 150 requests, 8 at a time, each a random mix of options on a random route and model.
    A 4xx is a fair answer to a nonsensical mix; a 5xx, a dropped connection or an engine that dies
    (every later request failing) is not. `prompt_logprobs`, and `echo` with logprobs, once killed
    the engine: loradock's CPU LoRA ops took one request's prompt rows for the whole batch's."""
    rng = random.Random(20261207)
    requests = [fuzzed_request(rng) for _ in range(150)]
    requests.insert(0, ("/v1/completions", {"model": LORA, "prompt": "a b c", "max_tokens": 2, "prompt_logprobs": 1}))
    requests.insert(1, ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "a b"}],
                                                 "max_tokens": 2, "echo": True, "logprobs": True,
                                                 "add_generation_prompt": False}))
    # A seed and a prefill split over steps (the prompt is longer than a step's 32 tokens): vLLM
    # rewinds the seeded generator of a request still in prefill, which only CUDA's generators can.
    seeded = {"model": LORA, "prompt": "a b c d e f g h " * 8, "max_tokens": 6, "temperature": 1.0, "seed": 3}
    requests[2:2] = [("/v1/completions", seeded)] * 2

    def send(request):
        path, body = request
        try:
            response = post(served.url, path, body)
        except httpx2.TransportError as e:
            return path, body, f"no answer ({type(e).__name__})"
        return path, body, response.status_code

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, requests))
    failed = [(path, body, status) for path, body, status in answers if not (isinstance(status, int) and status < 500)]
    assert not failed, failed[:5]
    assert sum(status == 200 for _, _, status in answers) > 100  # most mixes are valid, and answered
    again = [post(served.url, "/v1/completions", seeded).json()["choices"][0]["text"] for _ in range(2)]
    assert again[0] == again[1]  # a seed gives one answer, however its prefill was split
    assert post(served.url, "/v1/completions", {"model": LORA, "prompt": "a b", "max_tokens": 4,
                                                "prompt_logprobs": 2}).json()["choices"][0]["prompt_logprobs"]
    assert httpx2.get(f"{served.url}/health").status_code == 200


# --- the same text on every path --------------------------------------------------------------------

def test_every_path_answers_the_text_of_its_tokens_with_no_leading_space(served, tokenizer):
    """Base, LoRA and prompt-tuning, chat and completions, whole and streamed: what a client reads is
    the model's tokens decoded, the way transformers decodes them, and never starts with a space (the
    tiny base's tokenizer puts one before the first word of an answer, which its decoder takes away)."""
    seen = []
    for model in (BASE, LORA, PROMPT_TUNING):
        for prompt in PROMPTS[:3]:
            common = {"model": model, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
            chat = {**common, "messages": [{"role": "user", "content": prompt}]}
            whole = post(served.url, "/v1/chat/completions", chat).json()["choices"][0]
            text, ids = whole["message"]["content"], whole["token_ids"]
            streamed = streamed_chat(served.url, chat)
            completion = post(served.url, "/v1/completions", {**common, "prompt": f"<|user|>{prompt}<|end|><|assistant|>"})
            seen.append((model, text))
            assert text == tokenizer.decode(ids, skip_special_tokens=True), (model, text, ids)
            assert streamed == text, (model, streamed, text)
            if model != PROMPT_TUNING:  # its soft prompt is not in a plain completion's prompt
                assert completion.json()["choices"][0]["text"] == text, (model, completion.json(), text)
    assert all(text and not text[0].isspace() for _, text in seen), seen


def streamed_chat(url: str, body: dict) -> str:
    text = []
    with httpx2.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += [choice["delta"].get("content") or "" for choice in json.loads(line[6:])["choices"]]
    return "".join(text)


# --- a frozen registry --------------------------------------------------------------------------------

def test_a_frozen_registry_is_a_503_within_seconds_and_serving_resumes_when_it_answers(served, registry, adapters):
    """SIGSTOP: the registry's socket accepts connections and never answers. A request for an adapter
    not loaded yet must not wait for it longer than a few seconds; the others go on."""
    from hub.client import Registry

    Registry(registry.url, registry.write_token).push(str(adapters["by-path"]), "alice/faults-later")
    body = {"model": "alice/faults-later", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 4}
    os.kill(registry.process.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        frozen = post(served.url, "/v1/chat/completions", body)
        waited = time.monotonic() - began
        assert frozen.status_code == 503, frozen.text
        assert waited < 10, waited  # the registry's silence is bounded at hub.timeouts.READ_S (5 s)
        assert "did not answer" in frozen.json()["error"]["message"], frozen.json()
        loaded = post(served.url, "/v1/chat/completions", {**body, "model": LORA})
        assert loaded.status_code == 200  # what is loaded already does not need the registry
    finally:
        os.kill(registry.process.pid, signal.SIGCONT)
    assert post(served.url, "/v1/chat/completions", body).status_code == 200


# --- loradock serve killed during streams -------------------------------------------------------------

def test_nothing_of_a_server_killed_during_streams_outlives_it_and_its_streams_end(served):
    """SIGKILL to `loradock serve` while clients stream: vLLM's API server would wait for their
    connections to close; within a few seconds every process of it is gone and every stream ends."""
    group = served.service.process.pid
    vllm = [pid for pid in descendants(group) if pid != group]
    assert vllm, "no vLLM process under loradock serve"
    ended, started = [], threading.Semaphore(0)

    def stream():
        body = {"model": BASE, "messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 240,
                "ignore_eos": True, "stream": True}
        try:
            with httpx2.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=120) as response:
                for _ in response.iter_lines():
                    started.release()
        except httpx2.TransportError:
            pass
        ended.append(time.monotonic())

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert started.acquire(timeout=120), "the streams did not start"
    served.service.process.send_signal(signal.SIGKILL)
    served.service.process.wait()
    killed = time.monotonic()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a client's stream hangs"
    assert all(end - killed < 15 for end in ended), [end - killed for end in ended]
    while any(alive(pid) for pid in vllm) and time.monotonic() - killed < 30:
        time.sleep(0.1)
    assert not [pid for pid in vllm if alive(pid)], "vLLM outlived loradock serve"
    assert time.monotonic() - killed < 10
    with pytest.raises(httpx2.TransportError):
        httpx2.get(f"{served.url}/health", timeout=5)


# --- an engine killed under the server -----------------------------------------------------------

def engine_processes(server: ServeProcess) -> list[int]:
    """The pids of vLLM's engine core processes under `server` (vLLM names them VLLM::EngineCore)."""
    found = []
    for pid in descendants(server.service.process.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"EngineCore" in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(parent, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        below = children.get(queue.pop(), [])
        found += below
        queue += below
    return sorted(found)


def wait_for_line(log: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return log.read_text()
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {log} after {timeout} s:\n{log.read_text()[-3000:]}")


def test_a_killed_engine_is_restarted_with_its_adapters_then_reported_by_its_signal(registry, settings, adapters,
                                                                                    tmp_path):
    log = tmp_path / "serve.log"
    server = ServeProcess(serve_args(registry, settings, "--restart-engine", "1"), log,
                          {**os.environ, "HF_HUB_DISABLE_XET": "1"}).start()
    try:
        loaded = post(server.url, "/v1/load_lora_adapter", {"lora_name": BY_PATH, "lora_path": str(adapters["by-path"])})
        assert loaded.status_code == 200, loaded.text
        chat = lambda model: post(server.url, "/v1/chat/completions", {  # noqa: E731
            "model": model, "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 8, "temperature": 0})
        before = {model: chat(model).json()["choices"][0]["message"]["content"] for model in (BASE, LORA, BY_PATH)}
        engines = engine_processes(server)
        assert len(engines) == 1, engines
        os.kill(engines[0], signal.SIGKILL)
        text = wait_for_line(log, "starting vLLM again (1 of --restart-engine 1)", 120)
        assert f"vLLM's engine process EngineCore (pid {engines[0]}) was killed by signal SIGKILL" in text
        server.service.wait_healthy(f"{server.url}/health", 600)
        listed = [m["id"] for m in httpx2.get(f"{server.url}/v1/models").json()["data"]]
        assert {BASE, LORA, BY_PATH} <= set(listed), listed
        assert {model: chat(model).json()["choices"][0]["message"]["content"] for model in before} == before
        engines = engine_processes(server)
        os.kill(engines[0], signal.SIGKILL)  # the one restart allowed is spent
        assert server.service.process.wait(timeout=120) == 2
        text = log.read_text()
        assert f"(pid {engines[0]}) was killed by signal SIGKILL, and then vLLM's API server exited" in text
        assert "loradock serve stops too (vLLM was restarted 1 time, --restart-engine 1)" in text
        assert "out-of-memory killer" in text and "vLLM exited with status 0" not in text
    finally:
        if server.service.process.poll() is None:
            server.stop()
