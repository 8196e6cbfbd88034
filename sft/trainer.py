"""TRL's SFTTrainer with the guards and figures loradock adds.

One small subclass, because the checks belong to the loss computation itself: a batch whose
labels are all masked or a loss that is NaN/Inf stops the run (TRL would clamp the first to a
silent zero and log the second), and each step's trained-token fraction and tokens/s are logged.
"""

import time

import torch
from trl import SFTTrainer

from loradock.errors import LoradockError

IGNORE_INDEX = -100


class TrainingAborted(LoradockError):
    """The run cannot go on; no adapter is written."""


class LoradockSFTTrainer(SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._window_start = (time.perf_counter(), 0)  # (time, cumulative tokens) at the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        trained = int((labels != IGNORE_INDEX).sum())
        if trained == 0 and mode == "train":
            raise TrainingAborted(
                f"a training batch at step {self.state.global_step + 1} has every label masked: "
                "there is no response token to learn from",
                "check that each row has a non-empty response that fits in --max-length (run `loradock data check`)",
            )
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if not torch.isfinite(loss).all():
            raise TrainingAborted(
                f"the {mode} loss became {loss.item()} at step {self.state.global_step + 1}",
                f"lower the learning rate (--lr, now {self.args.learning_rate:g}), or check the data for "
                "extreme rows; no adapter was written",
            )
        if mode == "train":
            tokens = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else labels.numel()
            self._metrics[mode]["trained_token_fraction"].append(trained / max(tokens, 1))
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: tokens/s over the window since the previous one
            now, tokens = time.perf_counter(), self._total_train_tokens
            then, tokens_then = self._window_start
            if now > then and tokens > tokens_then:
                logs["tokens_per_second"] = round((tokens - tokens_then) / (now - then), 1)
            self._window_start = (now, tokens)
        super().log(logs, start_time)
