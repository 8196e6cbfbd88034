"""python bench/train_throughput.py [--rows N] [--epochs E]

Trains the same data on the tiny base model twice, one run after the other in this process:
padded batches, then packed padding-free batches (TRL's `packing=True`, best-fit decreasing,
with a block-diagonal attention mask so packed rows do not see each other). Both runs see about
the same number of real tokens per optimizer step, so they take the same number of steps and
their eval losses are comparable. Prints tokens/s (real tokens, padding excluded), the ratio and
both final eval losses. Target: >= 1.5x tokens/s at equal eval loss.

The data is the shipped instruction mix plus the three task sets: rows from 10 to 100+ tokens,
the long-tailed mix that real instruction data has.
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


def train_once(data: Path, held: Path, output: Path, packing: bool, batch_rows: int, block: int, epochs: float) -> dict:
    values = {
        "data": str(data), "eval_data": str(held), "output": str(output), "lora_r": 16, "lr": 1e-3,
        "epochs": epochs, "max_length": block, "seed": 0,
        "training.logging_steps": 50, "training.save_strategy": "no", "training.eval_strategy": "no",
        "training.disable_tqdm": True,
    }
    if packing:
        # Each packed row is one block of `block` tokens: about batch_rows * mean_len tokens per step.
        values.update({"packing": True, "batch_size": batch_rows_packed(data, batch_rows, block)})
    else:
        values["batch_size"] = batch_rows
    run(resolve({}, values))
    return json.loads((output / "metrics.json").read_text())


def batch_rows_packed(data: Path, batch_rows: int, block: int) -> int:
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
    parser.add_argument("--batch-rows", type=int, default=32, help="rows per step of the padded run")
    parser.add_argument("--block", type=int, default=512, help="packed block length in tokens")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_lines, held_lines = mixed_rows(args.rows)
        data, held = tmp / "train.jsonl", tmp / "held.jsonl"
        data.write_text("\n".join(train_lines) + "\n")
        held.write_text("\n".join(held_lines) + "\n")
        results = {}
        for name, packing in (("padded", False), ("packed", True)):
            results[name] = train_once(data, held, tmp / name, packing, args.batch_rows, args.block, args.epochs)
    print(f"\ntrain throughput, tiny base, {args.rows} rows x {args.epochs:g} epoch, LoRA r16, same process")
    print(f"  {'run':<8}{'tokens/s':>12}{'steps':>8}{'runtime s':>12}{'tokens':>10}{'eval loss':>12}")
    for name, m in results.items():
        print(f"  {name:<8}{m['tokens_per_second']:>12.0f}{m['steps']:>8}{m['train_runtime_s']:>12.1f}"
              f"{m['train_tokens']:>10}{m['eval_loss']:>12.4f}")
    padded, packed = results["padded"], results["packed"]
    ratio = packed["tokens_per_second"] / padded["tokens_per_second"]
    gap = packed["eval_loss"] - padded["eval_loss"]
    print(f"  packed / padded tokens/s: {ratio:.2f}x (target >= 1.5x) {'PASS' if ratio >= 1.5 else 'MISS'}")
    print(f"  eval loss packed - padded: {gap:+.4f} ({gap / padded['eval_loss']:+.1%} of padded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
