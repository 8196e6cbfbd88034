"""python bench/train_throughput.py [--rows N] [--batch-rows N] [--block N] [--seeds 0 1]

Trains the same data on the tiny base model with padded batches and with packed, padding-free
batches (TRL's `packing=True`, best-fit decreasing, with a block-diagonal attention mask so packed
rows do not see each other), one run after the other in this process, once per seed. Both modes
take optimizer steps of about the same number of real tokens, so they take the same number of
steps and their eval losses (on the same unpacked held-out set) are comparable. Prints tokens/s
(real tokens, padding excluded), the ratio, and the final eval losses with their seed-to-seed
spread. Target: >= 1.5x tokens/s at equal eval loss.

The data is the shipped instruction mix plus the three task sets: rows from about 10 to 100
tokens, the long-tailed mix that real instruction data has.
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sft.config import resolve  # noqa: E402
from sft.train import run  # noqa: E402

ASSETS = REPO / "sft" / "assets"


def mixed_rows(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    lines = (ASSETS / "generic_mix.jsonl").read_text().splitlines()
    for task in ("reverse", "sort", "json"):
        lines += (ASSETS / "tasks" / task / "train.jsonl").read_text().splitlines()
    random.Random(seed).shuffle(lines)
    return lines[:n], lines[n:n + 256]


def train_once(data: Path, held: Path, output: Path, packing: bool, batch_rows: int, block: int, epochs: float,
               seed: int) -> dict:
    values = {
        "data": str(data), "eval_data": str(held), "output": str(output), "lora_r": 16, "lr": 1e-3,
        "epochs": epochs, "max_length": block, "seed": seed,
        "training.logging_steps": 50, "training.save_strategy": "no", "training.eval_strategy": "no",
        "training.disable_tqdm": True,
    }
    if packing:
        # A micro-batch is one block of `block` tokens, and gradient accumulation makes an optimizer
        # step of about batch_rows * mean_len real tokens, as in the padded run. (Padding-free
        # flattens a micro-batch into one sequence; on a CPU, without a varlen attention kernel,
        # SDPA attends over all of it with a block-diagonal mask, so one block per micro-batch keeps
        # that quadratic cost down.) The held-out set is evaluated unpacked, as in the padded run.
        values.update({"packing": True, "batch_size": 1, "training.eval_packing": False,
                       "training.gradient_accumulation_steps": blocks_per_step(data, batch_rows, block)})
    else:
        values["batch_size"] = batch_rows
    run(resolve({}, values))
    return json.loads((output / "metrics.json").read_text())


def blocks_per_step(data: Path, batch_rows: int, block: int) -> int:
    from transformers import AutoTokenizer

    from loradock.home import DEFAULT_BASE_MODEL
    from sft.base_model import resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(DEFAULT_BASE_MODEL))
    rows = [json.loads(line) for line in data.read_text().splitlines()[:500]]
    chats = [r["messages"] if "messages" in r else
             [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}] for r in rows]
    mean_len = statistics.fmean(len(ids) for ids in tokenizer.apply_chat_template(chats, tokenize=True)["input_ids"])
    return max(1, round(batch_rows * mean_len / block))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-rows", type=int, default=128, help="rows per optimizer step of the padded run")
    parser.add_argument("--block", type=int, default=256, help="packed block length in tokens")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="each mode runs once per seed")
    args = parser.parse_args()
    runs = []  # (mode, seed, metrics)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_lines, held_lines = mixed_rows(args.rows)
        data, held = tmp / "train.jsonl", tmp / "held.jsonl"
        data.write_text("\n".join(train_lines) + "\n")
        held.write_text("\n".join(held_lines) + "\n")
        for seed in args.seeds:
            for mode in ("padded", "packed"):
                out = tmp / f"{mode}-{seed}"
                runs.append((mode, seed, train_once(data, held, out, mode == "packed", args.batch_rows, args.block,
                                                    args.epochs, seed)))
    print(f"\ntrain throughput, tiny base, {args.rows} rows x {args.epochs:g} epoch, LoRA r16, "
          f"{args.batch_rows} rows (padded) or {args.block}-token blocks (packed) per step, one process")
    print(f"  {'run':<8}{'seed':>5}{'tokens/s':>10}{'steps':>7}{'runtime s':>11}{'tokens':>9}{'eval loss':>11}")
    for mode, seed, m in runs:
        print(f"  {mode:<8}{seed:>5}{m['tokens_per_second']:>10.0f}{m['steps']:>7}{m['train_runtime_s']:>11.1f}"
              f"{m['train_tokens']:>9}{m['eval_loss']:>11.4f}")
    speed = {mode: statistics.fmean(m["tokens_per_second"] for k, _, m in runs if k == mode) for mode in ("padded", "packed")}
    loss = {mode: [m["eval_loss"] for k, _, m in runs if k == mode] for mode in ("padded", "packed")}
    ratio = speed["packed"] / speed["padded"]
    gap = statistics.fmean(loss["packed"]) - statistics.fmean(loss["padded"])
    spread = {mode: max(values) - min(values) for mode, values in loss.items()}
    print(f"  packed / padded tokens/s (mean over seeds): {ratio:.2f}x (target >= 1.5x) {'PASS' if ratio >= 1.5 else 'MISS'}")
    print(f"  eval loss, mean packed - mean padded: {gap:+.4f} ({gap / statistics.fmean(loss['padded']):+.1%}); "
          f"seed-to-seed spread: padded {spread['padded']:.4f}, packed {spread['packed']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
