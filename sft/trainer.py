"""TRL's SFTTrainer, DPOTrainer and GRPOTrainer with the guards and figures loradock adds.

One small subclass of each, because the checks belong to the loss computation itself: a batch whose
labels are all masked or a loss that is NaN/Inf stops the run (TRL would clamp the first to a
silent zero and log the second), and each step's trained-token fraction and tokens/s are logged.
Each evaluation also answers a fixed sample of held-out prompts (greedy) and scores the answers
with the run's graders (exact match and ROUGE-L unless it names others), logged beside the loss as
`eval_NAME` (`HeldOutGenerations`, shared by the three trainers; for DPO the reference answer is the
chosen one). GRPO's rewards are graders' scores (`GraderReward`), which say when a batch gives no
learning signal.
"""

import sys
import time

import torch
from trl import DPOTrainer, GRPOTrainer, SFTTrainer

from loradock import graders as grading
from loradock.errors import LoradockError

IGNORE_INDEX = -100


class TrainingAborted(LoradockError):
    """The run cannot go on; no adapter is written."""


class HeldOutGenerations:
    """Each evaluation also answers `held_out` (greedy) and scores the answers with `graders`."""

    def __init__(self, *args, held_out: list[tuple[list[dict], str]] = (), graders: list = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.held_out = list(held_out)  # (conversation, reference) pairs answered at each evaluation
        self.graders = list(graders)  # loradock.graders.Grader: what scores the answers

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.held_out:
            for name, value in self.generation_scores().items():
                output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output

    def generation_scores(self) -> dict[str, float]:
        """Each grader's mean score of greedy answers to the held-out sample, in [0, 1]."""
        from sft.evaluate import generate, score

        tokenizer = self.processing_class
        references = [reference for _, reference in self.held_out]
        longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
        was_training, padding_side = self.model.training, tokenizer.padding_side
        self.model.eval()
        try:
            answers = generate(self.model, tokenizer, [c for c, _ in self.held_out], longest + 8,
                               self.args.per_device_eval_batch_size)
        finally:
            self.model.train(was_training)
            tokenizer.padding_side = padding_side
        return score(answers, references, self.graders, [c[-1]["content"] for c, _ in self.held_out])


def check_finite(loss, mode: str, step: int, learning_rate: float) -> None:
    if not torch.isfinite(loss).all():
        raise TrainingAborted(
            f"the {mode} loss became {loss.item()} at step {step + 1}",
            f"lower the learning rate (--lr, now {learning_rate:g}), or check the data for "
            "extreme rows; no adapter was written",
        )


class LoradockDPOTrainer(HeldOutGenerations, DPOTrainer):
    """DPO of a PEFT model that already holds the parent adapter: TRL copies it into a frozen adapter
    named "ref" and computes the reference log-probabilities with that one active."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        check_finite(result[0] if return_outputs else result, "train" if self.model.training else "eval",
                     self.state.global_step, self.args.learning_rate)
        return result


class LoradockSFTTrainer(HeldOutGenerations, SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._window_start = (time.perf_counter(), 0)  # (time, cumulative tokens) at the last log
        adapted = getattr(self.model, "base_model", None)
        if type(adapted).__name__ == "AdaptionPromptModel":
            # PEFT's llama-adapter keeps the model's forward as it was when wrapped, before TRL gave
            # the model its fused LM head; point it at the current one.
            adapted.forward = adapted.model.forward

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
        check_finite(result[0] if return_outputs else result, mode, self.state.global_step, self.args.learning_rate)
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


class GraderReward:
    """A grader as a GRPO reward function: each sampled answer's score, with the data's response as the
    reference. A batch whose answers all score the same gives GRPO nothing to learn from (every
    advantage is zero): the first is warned about, every one is counted, as are answers the grader
    could not score (rewarded 0)."""

    def __init__(self, grader: grading.Grader):
        self.grader, self.__name__ = grader, grader.spec  # TRL logs rewards/NAME/mean
        self.batches = self.constant_batches = self.failures = 0

    def __call__(self, prompts, completions, reference=None, **kwargs) -> list[float]:
        answers = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        asked = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        scores = self.grader.grade([grading.Sample(q, a, r) for q, a, r in
                                    zip(asked, answers, reference or [None] * len(answers))])
        self.batches += 1
        if scores.failures:
            if not self.failures:
                print(f"warning: reward {self.grader.spec} could not score {scores.failures} of {len(answers)} answers "
                      f"(rewarded 0): {scores.first_failure}", file=sys.stderr, flush=True)
            self.failures += scores.failures
        if len(set(scores.values)) == 1:
            if not self.constant_batches:
                print(f"warning: reward {self.grader.spec} gave every answer of a batch {scores.values[0]}: no learning "
                      "signal from it there. A reward that is always 0 or 1 needs an easier or harder task, more "
                      "--training.num_generations or a higher --training.temperature; counted in the run record",
                      file=sys.stderr, flush=True)
            self.constant_batches += 1
        return scores.values

    def record(self) -> dict:
        return {**self.grader.settings, "name": self.grader.spec, "batches": self.batches,
                "constant_batches": self.constant_batches, "failures": self.failures}


class LoradockGRPOTrainer(HeldOutGenerations, GRPOTrainer):
    """GRPO of a PEFT adapter, rewarded by graders. An evaluation is the held-out sample's greedy
    answers scored by the run's graders (GRPO has no held-out loss of its own worth reporting)."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        from transformers import Trainer

        scores = self.generation_scores() if self.held_out else {}
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in scores.items()}
        # Trainer's own log: GRPOTrainer's would fold its running training averages into these figures.
        Trainer.log(self, metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
