"""Prompt-tuning and p-tuning adapters, served through vLLM's prompt-embeddings input (the server
runs with `--enable-prompt-embeds`; `serve.middleware.soft_prompts` does the HTTP around this module).

PEFT saves both methods as one soft prompt, `prompt_embeddings` [num_virtual_tokens, hidden] (for
p-tuning, the prompt encoder's output computed at save time), and at generation puts it in front of
the embeddings of *every* input token, BOS included, at positions 0..n_virtual+len-1. A request for
such an adapter is therefore rendered and tokenized as vLLM would for the base (vLLM's own
/tokenize, with the adapter's chat template), embedded with the base's input embedding matrix,
prefixed with the soft prompt, and sent to vLLM's /v1/completions as `prompt_embeds` for the base
model. The answer is translated back into the endpoint the client called.

Here: the tensors, and the translation of request and response bodies (no web imports).
"""

import base64
import io
import json
from functools import lru_cache
from itertools import repeat
from pathlib import Path

from hub.adapter import WEIGHTS
from loradock.errors import InvalidRequest, LoradockError
from serve.routes import CHAT, COMPLETIONS

# Chat request fields that mean the same on /v1/completions (vLLM 0.32's two request schemas).
SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "seed", "n", "stream",
            "stream_options", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos",
            "logit_bias", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
            "return_token_ids", "user", "request_id", "priority", "response_format", "structured_outputs",
            "allowed_token_ids", "bad_words")
# Chat request fields that shape the rendered prompt (vLLM's TokenizeChatRequest takes them all).
RENDERING = ("messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
             "chat_template_kwargs", "tools")


# --- the tensors ----------------------------------------------------------------------------------

def local_folder(base_path: str) -> Path:
    """The base model's files: its folder, or the Hub cache vLLM already downloaded them into."""
    if Path(base_path).is_dir():
        return Path(base_path)
    from hub.client import public_model_files

    return public_model_files(base_path, ["*.json", "*.safetensors"])


def embedding_names(folder: Path) -> list[str]:
    """The checkpoint names the input embedding matrix may have: its own, then (tied embeddings,
    saved once) the output projection's. Found on a `meta` copy of the model, so no weights load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    module_names = {id(module): name for name, module in model.named_modules()}
    names = [module_names[id(model.get_input_embeddings())] + ".weight"]
    if getattr(config.get_text_config(), "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        names.append(module_names[id(model.get_output_embeddings())] + ".weight")
    return names


@lru_cache(maxsize=2)
def token_embeddings(base_path: str):
    """The base model's input embedding matrix [vocab, hidden], read alone from its safetensors."""
    from safetensors import safe_open

    folder = local_folder(base_path)
    names = embedding_names(folder)
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as weights:
            found = next((name for name in names if name in weights.keys()), None)
            if found:
                return weights.get_tensor(found)
    raise LoradockError(f"no input embedding matrix ({' or '.join(names)}) in the safetensors of {folder}",
                        "serve prompt-tuning adapters on a base model saved as safetensors")


@lru_cache(maxsize=64)
def _soft_prompt(weights: str, modified_ns: int):
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        return f.get_tensor("prompt_embeddings")


def soft_prompt(folder: Path):
    """The adapter's soft prompt [num_virtual_tokens, hidden], read once per version of the file."""
    weights = Path(folder) / WEIGHTS
    return _soft_prompt(str(weights), weights.stat().st_mtime_ns)


def prompt_embeds(base_path: str, folder: Path, token_ids: list[int]) -> str:
    """The soft prompt followed by the tokens' embeddings, [n_virtual + tokens, hidden], in the
    format vLLM's server loads: base64 of a `torch.save`d tensor (`vllm.renderers.embed_utils`).
    The wider of the two dtypes is kept; vLLM casts to the served dtype."""
    import torch

    matrix, prompt = token_embeddings(base_path), soft_prompt(folder)
    dtype = torch.promote_types(matrix.dtype, prompt.dtype)
    embeds = torch.cat([prompt.to(dtype), matrix[torch.tensor(token_ids, dtype=torch.long)].to(dtype)])
    buffer = io.BytesIO()
    torch.save(embeds.contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode()


# --- the request ----------------------------------------------------------------------------------

def tokenize_body(body: dict, path: str, base: str, template: str | None) -> dict:
    """The body for vLLM's /tokenize that renders and tokenizes the prompt as the endpoint would:
    chat with the adapter's template and no special tokens added on top of it (vLLM's chat
    default), text with the tokenizer's default special tokens (vLLM's completion default)."""
    if path == COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InvalidRequest(f"a prompt-tuning adapter answers one text prompt per request, not {prompt!r:.80}; "
                                 "send `prompt` as a string")
        return {"model": base, "prompt": prompt, "add_special_tokens": body.get("add_special_tokens", True)}
    rendering = {key: body[key] for key in RENDERING if key in body}
    return {"model": base, **rendering, **({"chat_template": template} if template else {})}


def requested_max_tokens(body: dict, path: str) -> int | None:
    value = body.get("max_completion_tokens") if path == CHAT else None
    return value if value is not None else body.get("max_tokens")


def check_length(n_virtual: int, n_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    needed = n_virtual + n_tokens + (max_tokens if isinstance(max_tokens, int) else 1)
    if needed > max_model_len:
        asked = f" + max_tokens {max_tokens}" if isinstance(max_tokens, int) else " + at least 1 new token"
        raise InvalidRequest(f"this request needs {n_virtual} soft-prompt vectors + {n_tokens} prompt tokens{asked} "
                             f"= {needed} positions, over the model's context length {max_model_len}; "
                             "shorten the prompt or lower max_tokens")


def completion_body(body: dict, path: str, base: str, embeds: str) -> dict:
    """vLLM's /v1/completions body: the base model, the embeddings, the client's sampling settings."""
    if path == COMPLETIONS:
        rest = {k: v for k, v in body.items() if k not in ("model", "prompt", "add_special_tokens")}
    else:
        rest = {key: body[key] for key in SAMPLING if key in body}
        if requested_max_tokens(body, path) is not None:
            rest["max_tokens"] = requested_max_tokens(body, path)
        if body.get("logprobs"):  # chat: a flag and a count; completions: the count
            rest["logprobs"] = body.get("top_logprobs") or 0
    return {**rest, "model": base, "prompt_embeds": embeds}


# --- the response ---------------------------------------------------------------------------------

def chat_logprobs(logprobs: dict | None) -> dict | None:
    """A completion's logprobs (tokens, token_logprobs, top_logprobs) in the chat shape."""
    if not logprobs:
        return None

    def entry(token: str, logprob) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in (top or {}).items()]}
                        for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                                       logprobs.get("top_logprobs") or repeat(None))]}


def chat_choice(choice: dict, message_key: str) -> dict:
    message = {"role": "assistant", "content": choice.get("text", "")}
    translated = {"index": choice["index"], message_key: message, "logprobs": chat_logprobs(choice.get("logprobs")),
                  "finish_reason": choice.get("finish_reason"), "stop_reason": choice.get("stop_reason")}
    if choice.get("token_ids") is not None:
        translated["token_ids"] = choice["token_ids"]
    return translated


def chat_response(completion: dict, name: str, prompt_token_ids: list[int] | None) -> dict:
    """A text_completion from vLLM as the chat.completion the client asked for."""
    response = {"id": f"chat{completion['id']}", "object": "chat.completion", "created": completion["created"],
                "model": name, "choices": [chat_choice(c, "message") for c in completion["choices"]],
                "usage": completion.get("usage")}
    if prompt_token_ids is not None:
        response["prompt_token_ids"] = prompt_token_ids
    return response


def chat_chunks(chunk: dict, name: str, started: set[int]) -> list[dict]:
    """One streamed completion chunk as chat.completion.chunk deltas; a choice's first delta carries
    the role alone, as vLLM's and OpenAI's chat streams do."""
    head = {"id": f"chat{chunk['id']}", "object": "chat.completion.chunk", "created": chunk["created"], "model": name}
    usage = {"usage": chunk["usage"]} if chunk.get("usage") is not None else {}
    if not chunk.get("choices"):
        return [{**head, "choices": [], **usage}]
    out = []
    for choice in chunk["choices"]:
        if choice["index"] not in started:
            started.add(choice["index"])
            out.append({**head, "choices": [{"index": choice["index"], "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        delta = chat_choice(choice, "delta")
        delta["delta"] = {"content": delta["delta"]["content"]}
        out.append({**head, "choices": [delta], **usage})
    return out


class Translation:
    """How vLLM's completion of embeddings goes back to the client: as the endpoint it called, with
    the adapter's name as `model`."""

    def __init__(self, path: str, name: str, prompt_token_ids: list[int] | None):
        self.path, self.name, self.prompt_token_ids = path, name, prompt_token_ids
        self.started: set[int] = set()

    def body(self, completion: dict) -> dict:
        if self.path == CHAT:
            return chat_response(completion, self.name, self.prompt_token_ids)
        return {**completion, "model": self.name}

    def event(self, data: str) -> list[str]:
        """One server-sent event's data (a JSON chunk, an error or [DONE]) as the data to send."""
        try:
            chunk = json.loads(data)
        except ValueError:
            return [data]  # [DONE]
        if not isinstance(chunk, dict) or "error" in chunk:
            return [data]
        if self.path == CHAT:
            return [json.dumps(c) for c in chat_chunks(chunk, self.name, self.started)]
        return [json.dumps({**chunk, "model": self.name})]
