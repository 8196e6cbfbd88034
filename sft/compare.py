"""loradock methods [compare --config sft/configs/reverse.yaml --methods lora,ia3 --steps N --output DIR]

`loradock methods` prints the method table of the adapter contract (`hub.adapter.METHODS`): what
each method trains, its PEFT config class and how `loradock serve` serves it. `compare` trains
every chosen method on the same data with the same step budget and seed, each in its own
`loradock train` process (so each peak-memory figure is its own), and tabulates cost and
held-out quality as markdown, JSON and a chart.
"""

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from hub.adapter import METHODS, SERVED_AS, UNSUPPORTED, WEIGHTS
from hub.adapter.records import RunRecord
from loradock.config import load_yaml
from loradock.errors import LoradockError
from loradock.procs import log_tail, loradock_command

# The learning rate each method is compared at, where the config's (tuned for LoRA) would starve it:
# soft prompts and rescaling vectors have few parameters and need larger steps (PEFT's examples
# and the methods' papers use 1e-2 to 3e-2). The lora family keeps the config's own.
LEARNING_RATES = {"ia3": 1e-2, "prompt-tuning": 3e-2, "p-tuning": 1e-2, "prefix-tuning": 1e-2, "llama-adapter": 1e-2}


@dataclass
class CompareArgs:
    """`--config` here is the training config the methods share, so these flags are written by hand
    rather than generated (a generated `--config` would read that file as these settings)."""

    config: str
    methods: str = ",".join(METHODS)
    steps: int = 200
    output: str = "methods-compare"
    eval_generations: int = 64

    @classmethod
    def add_flags(cls, parser) -> None:
        parser.add_argument("--config", required=True, metavar="FILE.yaml",
                            help="the training config every method starts from (data, held-out data, training settings)")
        parser.add_argument("--methods", default=cls.methods,
                            help="comma-separated methods to train (see `loradock methods`; default: all)")
        parser.add_argument("--steps", type=int, default=cls.steps, help=f"optimizer steps per method (default: {cls.steps})")
        parser.add_argument("--output", default=cls.output,
                            help=f"folder for methods.md, methods.json, methods.png and the adapters (default: {cls.output})")
        parser.add_argument("--eval-generations", type=int, default=cls.eval_generations,
                            help=f"held-out prompts each adapter answers for exact match and ROUGE-L "
                                 f"(default: {cls.eval_generations})")


def check_compare(args: CompareArgs) -> None:
    problems = []
    unknown = [m for m in args.methods.split(",") if m.strip() not in METHODS]
    if unknown:
        problems.append(f"--methods: unknown method {', '.join(unknown)} (methods: {', '.join(METHODS)})")
    if args.steps < 1:
        problems.append(f"--steps {args.steps} must be at least 1")
    if args.eval_generations < 1:
        problems.append(f"--eval-generations {args.eval_generations} must be at least 1")
    if problems:
        raise LoradockError("the method comparison has problems:\n  - " + "\n  - ".join(problems),
                            "change the flags named above")


def methods_table() -> str:
    """The method table as text: one block per method, then the methods loradock does not train."""
    lines = []
    for m in METHODS.values():
        lines += [f"{m.name:<14} {m.config_class} ({m.peft_type}): {m.trains}",
                  f"{'':<14} served: {SERVED_AS[m.served_by]}",
                  f"{'':<14} why: {m.why}" + (f"; bases: {', '.join(m.model_types)}" if m.model_types else ""), ""]
    lines.append("not trained by loradock:")
    lines += [f"{name:<14} {reason}" for name, reason in UNSUPPORTED.items()]
    return "\n".join(lines)


def method_config(base: dict, method: str, steps: int, output: Path, eval_generations: int) -> dict:
    """The training config of one method: the base config's data and training settings, the
    method's own PEFT fields (the lora family keeps the config's LoRA fields), one step budget."""
    config = {k: v for k, v in base.items() if k not in ("peft", "lora", "output", "resume", "overwrite")}
    peft_base = {**(base.get("lora") or {}), **(base.get("peft") or {})}
    peft_base.setdefault("method", "lora")
    keep_lora = METHODS[method].low_rank and METHODS[peft_base["method"]].low_rank
    config["peft"] = {**({k: v for k, v in peft_base.items() if k != "method"} if keep_lora else {}), "method": method}
    for key in ("use_dora", "use_rslora"):
        config["peft"].pop(key, None)  # the method decides them
    training = dict(base.get("training") or {})
    training.update(max_steps=steps, eval_strategy="no", save_strategy="no", disable_tqdm=True)
    training.pop("num_train_epochs", None)
    if method in LEARNING_RATES:
        training["learning_rate"] = LEARNING_RATES[method]
    config.update(training=training, output=str(output), overwrite=True, eval_generations=eval_generations)
    return config


def train_one(method: str, config: dict, folder: Path) -> dict:
    """One method trained in its own `loradock train` process; its row of the table."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path, log = folder / f"{method}.yaml", folder / f"{method}.log"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(loradock_command("train", "--config", config_path), stdout=out, stderr=subprocess.STDOUT)
    wall = round(time.perf_counter() - started, 1)
    row = {"method": method, "config_class": METHODS[method].config_class,
           "served": SERVED_AS[METHODS[method].served_by], "log": str(log)}
    if done.returncode != 0:
        return {**row, "error": log_tail(log, 3).strip().splitlines()[-1] if log.exists() else "no output"}
    adapter = Path(config["output"])
    run = RunRecord.read(adapter)
    trainable, rest = run.trainable_parameters, run.base_parameters
    return {**row, "trainable_parameters": trainable, "trainable_percent": round(100 * trainable / rest, 4),
            "adapter_bytes": (adapter / WEIGHTS).stat().st_size, "train_runtime_s": run.train_runtime_s,
            "wall_s": wall, "tokens_per_second": run.tokens_per_second, "peak_memory": run.peak_memory,
            "learning_rate": config["training"].get("learning_rate"), "eval_loss": run.eval_loss,
            "exact_match": run.eval_metrics.get("exact_match"), "rouge_l": run.eval_metrics.get("rouge_l")}


COLUMNS = ("method", "PEFT config", "trainable params", "% of base", "adapter size", "train time", "tokens/s",
           "peak memory", "held-out exact match", "held-out ROUGE-L", "served")


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if "error" in r:
            cells = [r["method"], r["config_class"], *(["-"] * 8), f"not trained: {r['error']}"]
        else:
            cells = [r["method"], r["config_class"], f"{r['trainable_parameters']:,}", f"{r['trainable_percent']:.2f}%",
                     f"{r['adapter_bytes'] / 1024:.1f} KiB", f"{r['train_runtime_s']:.1f} s", f"{r['tokens_per_second']:.0f}",
                     f"{r['peak_memory']['mib']:.0f} MiB", percent(r["exact_match"]), percent(r["rouge_l"]), r["served"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if "error" not in r]
    names = [r["method"] for r in trained]
    fig, (quality, cost) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110)
    x = range(len(names))
    quality.bar([i - 0.2 for i in x], [100 * (r["exact_match"] or 0) for r in trained], 0.4, label="exact match")
    quality.bar([i + 0.2 for i in x], [100 * (r["rouge_l"] or 0) for r in trained], 0.4, label="ROUGE-L")
    quality.set(title="held-out quality", ylabel="%", ylim=(0, 100))
    quality.legend(fontsize=8)
    cost.bar(list(x), [r["trainable_parameters"] for r in trained], 0.6, color="tab:gray")
    cost.set(title="trainable parameters", yscale="log")
    for axis in (quality, cost):
        axis.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare(args: CompareArgs) -> dict:
    """Train each method, write methods.md / methods.json / methods.png into args.output."""
    base, out = load_yaml(args.config), Path(args.output)
    if not base.get("eval_data") and not (base.get("eval_split") or 0):
        raise LoradockError(f"{args.config} has no held-out data (eval_data or eval_split)",
                            "add eval_data: to the config: the comparison scores each method on held-out prompts")
    rows = []
    for method in [m.strip() for m in args.methods.split(",")]:
        config = method_config(base, method, args.steps, out / "adapters" / method, args.eval_generations)
        rows.append(train_one(method, config, out / "runs"))
        print(f"{method}: " + (f"not trained ({rows[-1]['error']})" if "error" in rows[-1] else
                               f"exact match {percent(rows[-1]['exact_match'])} in {rows[-1]['wall_s']} s"), flush=True)
    table = markdown(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods.md").write_text(table + "\n")
    (out / "methods.json").write_text(json.dumps({"config": args.config, "steps": args.steps, "rows": rows}, indent=2) + "\n")
    chart(rows, out / "methods.png")
    return {"rows": rows, "markdown": table}
