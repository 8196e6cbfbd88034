"""The forgetting guard: how much an adapter costs the base model at what it could do before tuning.

A fixed sample of general instructions ships with loradock (`sft/general/general.jsonl`: 48
hand-written questions of general knowledge, arithmetic, language and everyday advice, each with a
short reference answer). The guard is the perplexity of those answers, given their questions in the
model's chat template, with the adapter and without it on the same weights; `forgetting` is how
much higher the adapter's is than the base's (0.1: 10% higher; below 0: it does better). `loradock
train` records it in the run record, `loradock eval --adapter` reports it, the card and `loradock
lineage` show it, and `loradock promote --max-forgetting` holds a revision to it.
"""

import hashlib
import math
from pathlib import Path

GENERAL = Path(__file__).resolve().parent / "general" / "general.jsonl"
IGNORE_INDEX = -100


def general_sample(path: Path = GENERAL) -> list[tuple[list[dict], str]]:
    from sft.evaluate import load_heldout

    return load_heldout(str(path))[0]


def answer_tokens(tokenizer, conversation: list[dict], answer: str) -> tuple[list[int], int] | None:
    """(the whole exchange's token ids, where the answer begins), or None when the template renders the
    question differently once an answer follows it (its tokens would not be a prefix)."""
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    whole = tokenizer.apply_chat_template([*conversation, {"role": "assistant", "content": answer}], tokenize=False)
    if not whole.startswith(prompt):
        return None
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
    return (ids, len(prompt_ids)) if ids[:len(prompt_ids)] == prompt_ids and len(ids) > len(prompt_ids) else None


def perplexity(model, tokenizer, items: list[tuple[list[dict], str]], batch_size: int = 16) -> tuple[float, int]:
    """(perplexity of the answers' tokens, the rows scored): the exp of the mean negative log-likelihood
    over every answer token (the end-of-turn included), the questions' tokens not counted."""
    import torch

    rows = [r for r in (answer_tokens(tokenizer, c, a) for c, a in items) if r is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([[IGNORE_INDEX] * begin + ids[begin:] + [IGNORE_INDEX] * (width - len(ids))
                               for ids, begin in batch])
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)).logits
        logits = logits[:, -width:].float()  # a soft prompt's virtual positions come first
        shifted = labels[:, 1:].to(logits.device)
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shifted,
                                                   ignore_index=IGNORE_INDEX, reduction="sum")
        total += losses.item()
        count += int((shifted != IGNORE_INDEX).sum())
    return math.exp(total / max(count, 1)), len(rows)


def forgetting(model, tokenizer, path: Path = GENERAL) -> dict:
    """The guard's figures for a PEFT model: perplexity of the general sample with the adapter, and with
    it disabled (the base), and how much higher the first is."""
    items = general_sample(path)
    was_training = model.training
    model.eval()
    try:
        adapted, rows = perplexity(model, tokenizer, items)
        with model.disable_adapter():
            base, _ = perplexity(model, tokenizer, items)
    finally:
        model.train(was_training)
    return {"sample": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "rows": rows,
            "base_perplexity": round(base, 4), "perplexity": round(adapted, 4),
            "forgetting": round(adapted / base - 1, 4)}


def describe(figures: dict | None) -> str:
    if not figures:
        return "general ability: not measured"
    return (f"general ability: perplexity of {figures['rows']} general answers {figures['perplexity']:.3f} "
            f"with the adapter, {figures['base_perplexity']:.3f} without ({figures['forgetting']:+.1%})")
