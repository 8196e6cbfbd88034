"""loradock eval --base-model M [--adapter DIR] --data HELDOUT.jsonl [--grader NAME[:ARG] ...]
loradock eval --base-url URL --model NAME [--model NAME ...] --data HELDOUT.jsonl [--grader NAME[:ARG] ...]

Greedy generation for every held-out prompt with the base model and, when given, with the
adapter on top of it (transformers + PEFT), scored against the reference answers. With
--base-url, the same through an OpenAI-compatible server (`loradock serve`, or vLLM on a GPU):
each --model (the base or an adapter name) answers every prompt as a chat completion. The answers
are scored by the graders named (`loradock.graders`; exact match and ROUGE-L when none is).
"""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hub.adapter import MODEL_HEADER
from loradock import graders
from loradock.errors import LoradockError
from sft.data import RowProblem, prompt_and_reference, read_rows, to_messages

METRICS = graders.BUILT_IN


def load_heldout(path: str, columns: dict | None = None, limit: int | None = None) -> tuple[list, int]:
    """(conversation to answer, reference answer) for each good row, and how many bad rows were skipped."""
    items, skipped = [], 0
    for row in read_rows(path):
        try:
            items.append(prompt_and_reference(to_messages(row.data, columns)))
        except RowProblem:
            skipped += 1
    if not items:
        raise LoradockError(f"{path} has no usable (prompt, response) rows", f"run `loradock data check {path}`")
    return (items[:limit] if limit else items), skipped


def parse_metrics(spec: str) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise LoradockError(f"--metrics {spec!r}: unknown metric {', '.join(unknown) or '(none)'}",
                            f"choose from {', '.join(METRICS)}, or name any grader with --grader")
    return names


def chosen_graders(metrics: str, named: list[str]) -> list[graders.Grader]:
    """The graders an evaluation scores with: those named (`--grader`, `graders:`), else `--metrics`'."""
    if not named:
        return graders.parse_all(parse_metrics(metrics))
    try:
        return graders.parse_all(named)
    except LoradockError as e:
        raise LoradockError(f"--grader: {e.problem}", e.fix) from None


def samples(answers: list[str], items: list[tuple[list[dict], str]]) -> list[graders.Sample]:
    return [graders.Sample(conversation[-1]["content"], answer, reference)
            for answer, (conversation, reference) in zip(answers, items)]


def score(predictions: list[str], references: list[str], named: list, prompts: list[str] | None = None
          ) -> dict[str, float]:
    """Mean of each grader's scores over the rows, in [0, 1] (`named`: graders or their names)."""
    chosen = [g if isinstance(g, graders.Grader) else graders.parse(g) for g in named]
    rows = [graders.Sample(prompt, p, r) for p, r, prompt in zip(predictions, references, prompts or [""] * len(references))]
    return {name: scores.mean for name, scores in graders.grade_all(chosen, rows).items()}


def greedy_token_ids(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int,
                     batch_size: int) -> list[list[int]]:
    """The greedy answer's token ids for each conversation, up to and including its end-of-turn
    token, batch by batch (left padding)."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers = []
    for start in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations[start:start + batch_size]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for row in out[:, inputs["input_ids"].shape[1]:].tolist():
            end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            answers.append(row[:end])
    return answers


def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers, decoded without special tokens (as a server decodes them for its clients)."""
    ids = greedy_token_ids(model, tokenizer, conversations, max_new_tokens, batch_size)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def adapter_base_model(adapter: str) -> str:
    from hub.adapter import CONFIG

    config_path = Path(adapter) / CONFIG
    if not config_path.exists():
        raise LoradockError(f"--adapter {adapter} is not a PEFT adapter folder (no {CONFIG})",
                            "pass the --output folder of `loradock train`")
    return json.loads(config_path.read_text())["base_model_name_or_path"]


def evaluate(base_model: str, data: str, adapter: str | None = None, metrics: list = METRICS,
             max_new_tokens: int | None = None, limit: int | None = None, batch_size: int = 16) -> dict:
    """Score the base model and the adapter on the same prompts; returns the report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.base_model import resolve_base_model

    if adapter and adapter_base_model(adapter) != base_model:
        raise LoradockError(f"--adapter {adapter} was trained on {adapter_base_model(adapter)!r}, "
                            f"not on --base-model {base_model!r}",
                            f"pass --base-model {adapter_base_model(adapter)}")
    items, skipped = load_heldout(data, limit=limit)
    conversations, references = [c for c, _ in items], [r for _, r in items]
    base_path = resolve_base_model(base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if max_new_tokens is None:  # room for the longest reference, and a little more
        max_new_tokens = min(512, max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + 16)
    model = AutoModelForCausalLM.from_pretrained(base_path).eval()
    sides = {"base": generate(model, tokenizer, conversations, max_new_tokens, batch_size)}
    source = {"base_model": base_model, "adapter": adapter}
    if adapter:
        from peft import PeftModel

        from sft.forgetting import forgetting

        model = PeftModel.from_pretrained(model, adapter).eval()
        adapter_tokenizer = AutoTokenizer.from_pretrained(adapter)  # with the chat template it was trained with
        sides["adapter"] = generate(model, adapter_tokenizer, conversations, max_new_tokens, batch_size)
        source["general"] = forgetting(model, adapter_tokenizer)
    return build_report(source, data, items, skipped, max_new_tokens, sides, metrics)


def build_report(source: dict, data: str, items: list, skipped: int, max_new_tokens: int, sides: dict[str, list[str]],
                 metrics: list) -> dict:
    """The eval report: what answered (`source`), each grader's mean on each side, the graders' settings,
    the rows each grader could not score (scored 0) per side, and every example side by side."""
    chosen = [g if isinstance(g, graders.Grader) else graders.parse(g) for g in metrics]
    scored = {side: graders.grade_all(chosen, samples(answers, items)) for side, answers in sides.items()}
    failures = {side: {name: {"rows": s.failures, "first": s.first_failure} for name, s in by_grader.items() if s.failures}
                for side, by_grader in scored.items()}
    return {
        **source, "data": data, "rows": len(items), "rows_skipped": skipped, "max_new_tokens": max_new_tokens,
        "metrics": {side: {name: s.mean for name, s in by_grader.items()} for side, by_grader in scored.items()},
        "graders": [g.settings | {"name": g.spec} for g in chosen],
        "grader_failures": {side: f for side, f in failures.items() if f},
        "examples": [
            {"prompt": c[-1]["content"], "reference": r, **{side: sides[side][i] for side in sides}}
            for i, (c, r) in enumerate(items)
        ],
    }


def evaluate_endpoint(endpoint: str, models: list[str], data: str, metrics: list = METRICS,
                      max_new_tokens: int | None = None, limit: int | None = None, api_key: str | None = None,
                      concurrency: int = 16) -> dict:
    """Score each served model on the same prompts, through the OpenAI API (temperature 0); the
    server applies each model's chat template. Requests go `concurrency` at a time."""
    import openai

    items, skipped = load_heldout(data, limit=limit)
    conversations, references = [c for c, _ in items], [r for _, r in items]
    if max_new_tokens is None:  # a token is at least one character: room for the longest reference, and more
        max_new_tokens = min(512, max(len(r) for r in references) + 16)
    client = openai.OpenAI(base_url=endpoint.rstrip("/"), api_key=api_key or "unused", max_retries=0, timeout=600)

    def answer(model: str, conversation: list[dict]) -> str:
        reply = client.chat.completions.create(model=model, messages=conversation, temperature=0, max_tokens=max_new_tokens,
                                               extra_headers={MODEL_HEADER: model})  # a balancer's adapter affinity
        return reply.choices[0].message.content or ""  # scored as the client received it

    sides = {}
    with ThreadPoolExecutor(concurrency) as pool:
        for model in models:
            try:
                first = answer(model, conversations[0])  # alone: a model that is refused fails fast
                sides[model] = [first, *pool.map(lambda c: answer(model, c), conversations[1:])]
            except openai.APIConnectionError as e:
                raise LoradockError(f"cannot reach --base-url {endpoint} ({e.__cause__ or e})",
                                    "start the server (`loradock serve`) or pass the right --base-url") from None
            except openai.APIStatusError as e:
                raise LoradockError(f"--model {model}: the server answered {e.status_code}: {_server_message(e)}",
                                    _status_fix(e.status_code, endpoint)) from None
    return build_report({"endpoint": endpoint, "models": models}, data, items, skipped, max_new_tokens, sides, metrics)


def _server_message(error) -> str:
    body = error.body if isinstance(error.body, dict) else {}
    return str((body.get("error") or body).get("message") or body.get("message") or error.message)


def _status_fix(status: int, endpoint: str) -> str:
    if status == 401:
        return "pass the server's key with --api-key (or set LORADOCK_API_KEY)"
    if status == 404:
        return f"pass a model that {endpoint}/models lists, or an adapter name in the server's registry"
    return "fix the model named in the message (see the server's log for more)"


def render(report: dict, n_examples: int = 3, width: int = 28) -> str:
    sides = list(report["metrics"])
    names = list(report["metrics"][sides[0]])
    skipped = f", {report['rows_skipped']} bad rows skipped" if report["rows_skipped"] else ""
    via = f" via {report['endpoint']}" if report.get("endpoint") else ""
    lines = [f"eval: {report['data']}{via} ({report['rows']} rows{skipped}, greedy, max {report['max_new_tokens']} new tokens)"]
    label_width = max(10, *(len(side) + 2 for side in sides))
    widths = [max(14, len(name) + 2) for name in names]
    lines.append(f"  {'model':<{label_width}}" + "".join(f"{name:>{w}}" for name, w in zip(names, widths)))
    for side in sides:
        lines.append(f"  {side:<{label_width}}" + "".join(f"{report['metrics'][side][name]:>{w}.3f}"
                                                          for name, w in zip(names, widths)))
    for side, failed in report.get("grader_failures", {}).items():
        for name, failure in failed.items():
            lines.append(f"  {side}: {name} could not score {failure['rows']} of {report['rows']} rows (scored 0); "
                         f"first: {failure['first']}")
    if report.get("general"):
        from sft.forgetting import describe

        lines.append(f"  {describe(report['general'])}")
    columns = ["prompt", "reference", *sides]
    lines += ["", "  " + " | ".join(f"{c:<{width}}" for c in columns)]
    for example in report["examples"][:n_examples]:
        lines.append("  " + " | ".join(f"{_clip(example[c], width):<{width}}" for c in columns))
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text[: width - 1] + "…" if len(text) > width else text
