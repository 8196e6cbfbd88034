"""python bench/grpo_real.py [--parent-steps 6] [--steps 40] [--lr 1e-3] [--temperature 0.7] [--loradock-home DIR]

GRPO on the default base model, SmolLM2-135M-Instruct, end to end: a weak SFT parent of the demo's
commas task (`sft/configs/commas.yaml` stopped after --parent-steps steps) is pushed to an embedded
registry as bench/commas@v1; `loradock train --objective grpo --reward exact_match --init-adapter
bench/commas@v1` trains its child for --steps steps on the same task's prompts, rewarded by the
exact-match grader against the data's answers, and is pushed as @v2. `loradock serve` then answers
the 100 held-out prompts with each (`loradock eval --base-url`, greedy), and `loradock promote
bench/commas@v2 --tag prod` must move the tag on the recorded held-out evidence. Prints the parent's
and the child's exact match (through the endpoint, and in each run record on its held-out sample),
the steps and times, the reward over training, and promote's message.

The base model is copied from DIR/models with --loradock-home DIR, else installed from its wheel
into a temporary home.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.train_real import base_model  # noqa: E402  (copied from --loradock-home, else installed)
from loradock.home import SMOLLM2  # noqa: E402
from loradock.procs import Service, create_token, free_port, loradock_command, start_registry  # noqa: E402

TASK = REPO / "sft" / "assets" / "tasks" / "commas"
REPO_ID = "bench/commas"
LORA = ["--lora-r", "16", "--lora-alpha", "32"]  # the parent's shapes (sft/configs/commas.yaml)
QUIET = ["--training.save_strategy", "no", "--training.disable_tqdm", "true"]


def loradock(log: Path, *args) -> tuple[float, str]:
    """`loradock ARGS`, timed; its output kept in `log`, and returned."""
    started = time.monotonic()
    done = subprocess.run(loradock_command(*args), capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"loradock {' '.join(map(str, args[:3]))} failed (exit {done.returncode}); see {log}:\n"
                         + (done.stdout + done.stderr)[-3000:])
    return time.monotonic() - started, done.stdout


def pushed(log: Path, folder: Path, tag: str) -> str:
    _, out = loradock(log, "push", folder, REPO_ID, "--tag", tag)
    return re.search(r"commit ([0-9a-f]{40})", out).group(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--parent-steps", type=int, default=6, help="SFT steps of the weak parent (the demo trains 60)")
    parser.add_argument("--steps", type=int, default=40, help="GRPO steps of the child (8 answers a step: 2 prompts x 4)")
    parser.add_argument("--lr", default="1e-3", help="GRPO's learning rate (the parent's SFT used 2e-3)")
    parser.add_argument("--temperature", default="0.7", help="GRPO's sampling temperature (TRL's default is 1.0)")
    parser.add_argument("--loradock-home", type=Path, help="copy the installed base model from this home (only read)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loradock-grpo-real-") as tmp, ExitStack() as services:
        tmp = Path(tmp)
        os.environ.update(LORADOCK_HOME=str(tmp / "home"), HF_HOME=str(tmp / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
                          TOKENIZERS_PARALLELISM="false")
        os.environ.pop("LORADOCK_BASE_MODEL", None)
        base_model(args, tmp)
        port = free_port()
        services.enter_context(start_registry(tmp / "registry", port, tmp / "registry.log"))
        os.environ.update(LORADOCK_REGISTRY=f"http://127.0.0.1:{port}",
                          LORADOCK_TOKEN=create_token(tmp / "registry", "bench"))

        parent_s, _ = loradock(tmp / "parent.log", "train", "--config", REPO / "sft" / "configs" / "commas.yaml",
                               "--output", tmp / "parent", "--max-steps", args.parent_steps, "--eval-generations", "32",
                               "--training.eval_steps", args.parent_steps, *QUIET)
        v1 = pushed(tmp / "push-v1.log", tmp / "parent", "v1")
        child_s, _ = loradock(tmp / "child.log", "train", "--objective", "grpo", "--reward", "exact_match",
                              "--init-adapter", f"{REPO_ID}@v1", "--data", TASK / "train.jsonl",
                              "--eval-data", TASK / "heldout.jsonl", "--output", tmp / "child", "--max-steps", args.steps,
                              "--eval-generations", "32", "--lr", args.lr, "--training.temperature", args.temperature,
                              "--training.max_completion_length", "32",
                              "--training.logging_steps", "5", "--training.eval_steps", args.steps, *LORA, *QUIET)
        v2 = pushed(tmp / "push-v2.log", tmp / "child", "v2")

        serve_port = free_port()
        server = services.enter_context(Service("loradock serve", loradock_command(
            "serve", "--port", serve_port, "--base-model", SMOLLM2, "--max-lora-rank", "16", "--max-model-len", "512",
            "--webhook-url", "off"), tmp / "serve.log"))
        server.wait_healthy(f"http://127.0.0.1:{serve_port}/health", 900)
        report_path = tmp / "eval.json"
        eval_s, _ = loradock(tmp / "eval.log", "eval", "--base-url", f"http://127.0.0.1:{serve_port}/v1",
                             "--model", f"{REPO_ID}@v1", "--model", f"{REPO_ID}@v2", "--data", TASK / "heldout.jsonl",
                             "--grader", "exact_match", "--max-new-tokens", "32", "--output", report_path)
        served = json.loads(report_path.read_text())["metrics"]
        _, promoted = loradock(tmp / "promote.log", "promote", f"{REPO_ID}@v2", "--tag", "prod",
                               "--votes", tmp / "no-votes.sqlite")

        parent = json.loads((tmp / "parent" / "metrics.json").read_text())
        child = json.loads((tmp / "child" / "metrics.json").read_text())
        rewards = [log["reward"] for log in child["log_history"] if "reward" in log]
        print(f"\nSmolLM2-135M-Instruct, commas; parent {v1[:12]} (SFT, {args.parent_steps} steps), child {v2[:12]} "
              f"(GRPO, reward exact_match, {args.steps} steps of 2 prompts x 4 answers, learning rate {args.lr}, "
              f"temperature {args.temperature}):")
        print("| revision | steps | train s (loop) | run s (whole) | held-out exact match, served (100) | "
              "in its run record (32) |\n|---|---:|---:|---:|---:|---:|")
        for name, record, wall, tag in (("parent v1 (sft)", parent, parent_s, "v1"), ("child v2 (grpo)", child, child_s, "v2")):
            print(f"| {name} | {record['steps']} | {record['train_runtime_s']:.0f} | {wall:.0f} | "
                  f"{served[f'{REPO_ID}@{tag}']['exact_match']:.1%} | {record['eval_metrics']['exact_match']:.1%} |")
        print(f"\nGRPO reward (mean exact match of the sampled answers) per logged window of 5 steps: "
              f"{', '.join(f'{r:.2f}' for r in rewards)}")
        constant = {r["name"]: f"{r['constant_batches']} of {r['batches']}" for r in child["rewards"]}
        print(f"batches whose answers all scored the same: {constant}")
        for name, record in (("parent", parent), ("child", child)):
            general = record.get("general") or {}
            print(f"{name}: general-ability perplexity {general.get('perplexity')} against the base's "
                  f"{general.get('base_perplexity')} ({general.get('forgetting')})")
        print(f"served eval {eval_s:.0f} s; promote: {promoted.strip()}")
        better = served[f"{REPO_ID}@v2"]["exact_match"] > served[f"{REPO_ID}@v1"]["exact_match"]
        print(f"child beats parent through the endpoint: {better}")
        return 0 if better else 1


if __name__ == "__main__":
    sys.exit(main())
