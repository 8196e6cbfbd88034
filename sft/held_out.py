"""The held-out figures a training run reports: the fixed sample of held-out prompts answered at
every evaluation and its fingerprint, the untrained adapter's figures (kept in the run's work
folder, so a resumed run reports them too) and the trained one's, and the generation scores
(each grader's mean) among them. `sft.train` calls these; the scoring itself is `sft.evaluate`'s."""

import hashlib
import json
import random
from pathlib import Path
from typing import Callable

from sft.distributed import is_main


EVAL_BEFORE = "eval_before.json"


def held_out_before(trainer, work: Path, saved: dict | None) -> dict:
    """The untrained adapter's held-out figures: `saved` (read by `sft.train.prepare_run` from the work folder, where
    an interrupted run kept them), else evaluated now by every process and kept by the main one."""
    if saved is not None:
        return saved
    figures = trainer.evaluate()
    if is_main():
        (work / EVAL_BEFORE).write_text(json.dumps(figures))
    return figures


def untrained_figures(trainer, work: Path, saved: dict | None) -> Callable[[], dict]:
    """What gives the untrained adapter's held-out figures once `trainer.train()` has begun.

    One process evaluates before training. Several evaluate when training begins instead: an
    evaluation before `train()` marks the model prepared (accelerate 1.15, transformers 5.19), and
    the Trainer then leaves it out of DDP, so each process would train its own copy unsynchronised.
    """
    if saved is not None or trainer.args.world_size == 1:
        figures = held_out_before(trainer, work, saved)
        return lambda: figures
    from transformers import TrainerCallback

    taken = {}

    class AtTrainBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            taken.update(held_out_before(trainer, work, None))  # the model is wrapped for its processes now

    trainer.add_callback(AtTrainBegin())
    return lambda: taken


def final_evaluation(trainer) -> dict:
    """The held-out figures after training: the evaluation at the last step when there was one."""
    last = trainer.state.log_history[-2:-1] or [{}]  # the entry before the train summary
    if last[0].get("step") == trainer.state.global_step and any(key.startswith("eval_") for key in last[0]):
        return last[0]
    return trainer.evaluate()


def held_out_sample(eval_rows: list, n: int, seed: int) -> list[tuple[list[dict], str]]:
    """(conversation to answer, reference) for up to `n` held-out rows, the same rows at every evaluation."""
    from sft.data import prompt_and_reference

    rows = eval_rows[:]
    random.Random(seed).shuffle(rows)
    # a preference pair's reference is its chosen answer
    return [(row.prompt, row.chosen) if hasattr(row, "chosen") else prompt_and_reference(row.messages)
            for row in rows[:n]]


def held_out_fingerprint(held_out: list[tuple[list[dict], str]]) -> str | None:
    """sha256 of the prompts and references the held-out figures were scored on, whatever file
    form they came in (an SFT file and a preference file of the same rows agree): two runs'
    figures compare only when this is equal. None when nothing was scored."""
    if not held_out:
        return None
    canonical = sorted(json.dumps([prompt, reference], sort_keys=True, ensure_ascii=False)
                       for prompt, reference in held_out)
    return hashlib.sha256("\n".join(canonical).encode()).hexdigest()


def generation_scores(figures: dict, names: list[str]) -> dict | None:
    """{grader name: mean score} from an evaluation's figures, in the graders' order; None when it
    generated nothing."""
    scores = {name: figures[f"eval_{name}"] for name in names if f"eval_{name}" in figures}
    return scores or None
