"""loradock train --config sft/configs/NAME.yaml [--key value ...]

Runs one LoRA instruction-tuning job: check the data, train with TRL's SFTTrainer and a PEFT
LoraConfig, evaluate, and publish the adapter folder atomically.

Work happens in a hidden sibling of --output (`.NAME.loradock-run/`, holding the checkpoints that
--resume continues from); the finished folder is assembled there and renamed into place in one
step, so an interrupted run never leaves anything that looks like a finished adapter.
"""

import dataclasses
import json
import os
import random
import shutil
import time
from pathlib import Path

import yaml

from hub.adapter import METHODS, METRICS, REQUIRED_FILES, RUN_CONFIG
from hub.adapter.card import write_card
from loradock.errors import LoradockError
from sft.base_model import BUILD_INFO, resolve_base_model
from sft.chat_format import training_chat_template
from sft.config import ResolvedConfig
from sft.data import parse_columns
from sft.data_check import check_for_training, to_dataset


@dataclasses.dataclass
class RunPaths:
    output: Path  # where the finished adapter appears
    work: Path  # checkpoints and the folder being assembled

    @classmethod
    def for_output(cls, output: str) -> "RunPaths":
        out = Path(output)
        return cls(out, out.parent / f".{out.name}.loradock-run")

    @property
    def checkpoints(self) -> Path:
        return self.work / "checkpoints"

    def last_complete_checkpoint(self) -> Path | None:
        """The newest checkpoint whose trainer_state.json (saved last) is complete and readable."""
        candidates = sorted(self.checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        for checkpoint in reversed(candidates):
            try:
                json.loads((checkpoint / "trainer_state.json").read_text())
                return checkpoint
            except (OSError, ValueError):
                continue
        return None


def prepare_output(config: ResolvedConfig) -> tuple[RunPaths, Path | None]:
    """Decide where to write and what to resume from, before any work is done."""
    args = config.args
    paths = RunPaths.for_output(args.output)
    if paths.output.exists() and any(paths.output.iterdir()) and not args.overwrite:
        raise LoradockError(f"--output {args.output} already exists and is not empty",
                            "choose another --output, or pass --overwrite to replace it")
    if not args.resume:
        return paths, None
    checkpoint = paths.last_complete_checkpoint()
    if checkpoint is None:
        raise LoradockError(f"--resume: no complete checkpoint of an earlier run into {args.output}",
                            "run without --resume to start from the beginning")
    saved = yaml.safe_load((paths.work / RUN_CONFIG).read_text())
    now = comparable(config)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise LoradockError(f"--resume: the configuration differs from the interrupted run's in {', '.join(changed)}",
                            "resume with the same settings, or drop --resume to start over")
    return paths, checkpoint


def comparable(config: ResolvedConfig) -> dict:
    """The settings that must match for a resume to continue the same run."""
    flat = {**{f"lora.{k}": v for k, v in config.lora.items()}, **{f"training.{k}": v for k, v in config.training.items()}}
    flat.update({k: v for k, v in dataclasses.asdict(config.args).items() if k not in ("resume", "overwrite")})
    return json.loads(json.dumps(flat, default=str))


def load_tokenizer(base_path: str, chat_template_file: str | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if chat_template_file:
        try:
            tokenizer.chat_template = Path(chat_template_file).read_text(encoding="utf-8")
        except OSError as e:
            raise LoradockError(f"cannot read --chat-template {chat_template_file}: {e.strerror}",
                                "pass a readable .jinja file") from None
    tokenizer.chat_template = training_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_datasets(config: ResolvedConfig, tokenizer):
    """The data checks that gate training; returns (train report, train rows, eval rows, eval summary)."""
    args, max_length = config.args, config.training.get("max_length") or 1024
    columns = parse_columns(args.columns)
    train = check_for_training(args.data, tokenizer, tokenizer.chat_template, max_length, columns,
                               args.max_bad_fraction, "--data")
    print(train.render(), flush=True)
    if args.eval_data:
        held_out = check_for_training(args.eval_data, tokenizer, tokenizer.chat_template, max_length, columns,
                                      args.max_bad_fraction, "--eval-data")
        print(held_out.render(), flush=True)
        return train, train.kept, held_out.kept, held_out.summary()
    if args.eval_split:
        shuffled = train.kept[:]
        random.Random(config.training.get("seed", 42)).shuffle(shuffled)
        n_eval = max(1, round(len(shuffled) * args.eval_split))
        if n_eval >= len(shuffled):
            raise LoradockError(f"--eval-split {args.eval_split} leaves no training rows out of {len(shuffled)}",
                                "use a smaller --eval-split or pass --eval-data")
        return train, shuffled[n_eval:], shuffled[:n_eval], {"split_of": args.data, "rows": n_eval}
    return train, train.kept, [], None


def apply_device_defaults(config: ResolvedConfig) -> None:
    """Settings that depend on the machine, decided once and recorded with the rest."""
    import torch

    cuda = torch.cuda.is_available()
    config.training.setdefault("bf16", cuda and torch.cuda.is_bf16_supported())
    config.training.setdefault("gradient_checkpointing", cuda)  # on a CPU it only costs time
    config.training.setdefault("use_cpu", not cuda)


def training_arguments(config: ResolvedConfig, paths: RunPaths, has_eval: bool):
    """TRL's SFTConfig from the resolved settings."""
    from trl import SFTConfig

    training = dict(config.training)
    if not has_eval:
        training["eval_strategy"] = "no"
    # The data check has tokenized the rows and built the response-only masks with the chat
    # template's {% generation %} markers, so TRL takes them as they are.
    return SFTConfig(output_dir=str(paths.checkpoints), assistant_only_loss=False, **training)


def base_revision(base_path: str, model) -> str | None:
    """The base model's revision: the Hub commit it was loaded at, or the built model's weights hash."""
    info = Path(base_path) / BUILD_INFO
    if info.exists():
        return json.loads(info.read_text()).get("weights_sha256")
    return getattr(model.config, "_commit_hash", None)


def held_out_loss_before(trainer, paths: RunPaths) -> float:
    """The held-out loss of the untrained adapter, kept in the work folder so a resumed run reports it too."""
    saved = paths.work / "eval_loss_before.json"
    if saved.exists():
        return json.loads(saved.read_text())["eval_loss"]
    loss = trainer.evaluate()["eval_loss"]
    saved.write_text(json.dumps({"eval_loss": loss}))
    return loss


def run(config: ResolvedConfig) -> Path:
    """Train one adapter; returns the published folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from sft.trainer import LoradockSFTTrainer

    args = config.args
    apply_device_defaults(config)
    paths, checkpoint = prepare_output(config)
    base_path = resolve_base_model(args.base_model)
    tokenizer = load_tokenizer(base_path, args.chat_template)
    train_report, train_rows, eval_rows, eval_summary = check_datasets(config, tokenizer)
    sft_config = training_arguments(config, paths, has_eval=bool(eval_rows))

    if not args.resume and paths.work.exists():
        shutil.rmtree(paths.work)  # the leftovers of an interrupted run that is not being resumed
    paths.work.mkdir(parents=True, exist_ok=True)
    (paths.work / RUN_CONFIG).write_text(yaml.safe_dump(comparable(config), sort_keys=True))

    dtype = torch.bfloat16 if sft_config.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    trainer = LoradockSFTTrainer(
        model=model, args=sft_config, train_dataset=to_dataset(train_rows),
        eval_dataset=to_dataset(eval_rows) if eval_rows else None,
        processing_class=tokenizer, peft_config=METHODS["lora"].peft_config(config.lora),
    )
    started = time.perf_counter()
    eval_before = held_out_loss_before(trainer, paths) if eval_rows else None
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    eval_after = trainer.evaluate()["eval_loss"] if eval_rows else None

    metrics = {
        "base_model": args.base_model, "base_model_revision": base_revision(base_path, model),
        "dataset_sha256": train_report.sha256, "train_data": train_report.summary(), "eval_data": eval_summary,
        "train_loss": round(result.training_loss, 4), "eval_loss_before": eval_before, "eval_loss": eval_after,
        "steps": result.global_step, "epochs": round(trainer.state.epoch or 0, 3),
        "train_runtime_s": round(result.metrics["train_runtime"], 2),
        "total_runtime_s": round(time.perf_counter() - started, 2),
        "train_tokens": trainer._total_train_tokens,
        "tokens_per_second": round(trainer._total_train_tokens / max(result.metrics["train_runtime"], 1e-9), 1),
        "resumed_from_step": int(checkpoint.name.split("-")[-1]) if checkpoint else None,
        "log_history": trainer.state.log_history,
    }
    return publish(trainer, config, paths, metrics)


def publish(trainer, config: ResolvedConfig, paths: RunPaths, metrics: dict) -> Path:
    """Assemble the adapter folder beside the checkpoints and rename it into place."""
    staging = paths.work / "adapter"
    if staging.exists():
        shutil.rmtree(staging)
    peft_config = trainer.model.peft_config["default"]
    peft_config.base_model_name_or_path = config.args.base_model  # the name, never this machine's path
    # save_embedding_layers=False: LoRA here never trains embeddings, and "auto" would look the base
    # model's name up on the Hub to find out.
    trainer.model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
    trainer.processing_class.save_pretrained(staging)
    (staging / RUN_CONFIG).write_text(run_config_yaml(config))
    (staging / METRICS).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    write_card(staging)
    missing = [name for name in REQUIRED_FILES if not (staging / name).exists()]
    if missing:
        raise LoradockError(f"the adapter folder is missing {', '.join(missing)} after saving", "report this as a bug")
    if paths.output.exists():
        trash = paths.work / "replaced"
        os.replace(paths.output, trash)
    os.replace(staging, paths.output)
    shutil.rmtree(paths.work, ignore_errors=True)
    return paths.output


def run_config_yaml(config: ResolvedConfig) -> str:
    """The resolved configuration, loadable again with --config. Upstream fields that are not
    listed keep the defaults of the library versions named in its header."""
    import peft
    import transformers
    import trl

    body = config.to_yaml_dict()
    body["resume"] = body["overwrite"] = False
    versions = f"# versions: trl {trl.__version__}, peft {peft.__version__}, transformers {transformers.__version__}\n"
    header = "# The resolved configuration of this adapter's training run.\n"
    header += f"# Re-run it: loradock train --config {RUN_CONFIG} --output NEW_DIR\n"
    return header + versions + yaml.safe_dump(json.loads(json.dumps(body, default=str)), sort_keys=False)


def main(config: ResolvedConfig) -> int:
    output = run(config)
    metrics = json.loads((output / METRICS).read_text())
    before, after = metrics["eval_loss_before"], metrics["eval_loss"]
    summary = f"adapter written to {output}: train loss {metrics['train_loss']}"
    if after is not None:
        summary += f", eval loss {before:.4f} -> {after:.4f}" if before is not None else f", eval loss {after:.4f}"
    print(summary + f", {metrics['tokens_per_second']} tokens/s")
    return 0
