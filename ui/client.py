"""What the comparison screen asks of the OpenAI-compatible endpoint (`loradock serve`, or any vLLM
server): the models it lists, a chat answer streamed with its timings, and the exact prompt a
model received. No Streamlit here: `ui/app.py` draws what these functions return.

    from ui.client import Endpoint
    endpoint = Endpoint("http://127.0.0.1:8000/v1")
    for event in endpoint.stream_chat("alice/reverse@v1", [{"role": "user", "content": "a b"}], Sampling()):
        ...
"""

import time
from dataclasses import dataclass, field

import httpx2
import openai

from hub.adapter import COMMIT_HEADER, MODEL_HEADER


class EndpointDown(Exception):
    """The endpoint did not answer (not running, wrong URL, too slow)."""


@dataclass
class Sampling:
    """Settings every column shares, so the comparison is fair."""
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 128
    seed: int | None = 0


@dataclass
class ModelCard:
    """One entry of GET /v1/models: the base model (no parent) or an adapter on it."""
    id: str
    parent: str | None
    loradock: dict = field(default_factory=dict)  # repo_id, revision, commit, rank, metric (loradock serve only)

    @property
    def commit(self) -> str | None:
        return self.loradock.get("commit")


@dataclass
class Answer:
    """One model's answer to one turn. `error` set means it failed and is not part of the history."""
    model: str
    text: str = ""
    error: str | None = None
    first_token_s: float | None = None  # seconds from sending the request to the first text
    total_s: float | None = None
    completion_tokens: int | None = None
    prompt_token_ids: list[int] | None = None
    commit: str | None = None  # the commit that answered, as `loradock serve` says (X-Loradock-Commit)

    @property
    def tokens_per_s(self) -> float | None:
        if not self.completion_tokens or not self.total_s:
            return None
        return self.completion_tokens / self.total_s


class Endpoint:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120, connect_timeout: float = 3):
        self.base_url = base_url.rstrip("/")
        self.server_url = self.base_url.removesuffix("/v1")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx2.Timeout(timeout, connect=connect_timeout)
        self.openai = openai.OpenAI(base_url=self.base_url, api_key=api_key or "unused", timeout=self.timeout,
                                    max_retries=0)

    def models(self) -> list[ModelCard]:
        """The base model and the adapters the endpoint serves now.

        Raises:
            EndpointDown: no answer, or not an OpenAI-compatible one.
        """
        try:
            response = httpx2.get(f"{self.base_url}/models", headers=self.headers, timeout=httpx2.Timeout(5, connect=3))
        except httpx2.HTTPError as e:
            raise EndpointDown(f"no answer from {self.base_url} ({type(e).__name__}: {e})") from None
        if response.status_code != 200:
            raise EndpointDown(f"{self.base_url}/models answered {response.status_code}: {response.text[:200]}")
        try:
            data = response.json()["data"]
        except (ValueError, KeyError, TypeError):
            raise EndpointDown(f"{self.base_url}/models is not an OpenAI-compatible model list") from None
        return [ModelCard(m["id"], m.get("parent"), m.get("loradock") or {}) for m in data]

    def stream_chat(self, model: str, messages: list[dict], sampling: Sampling):
        """Yield the answer's text as it arrives, then return the finished `Answer` (StopIteration.value).

        A failure before or during the stream ends it with `Answer.error` set; nothing is raised.
        """
        answer, started = Answer(model), time.perf_counter()
        try:
            raw = self.openai.chat.completions.with_raw_response.create(
                model=model, messages=messages, stream=True, stream_options={"include_usage": True},
                temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                seed=sampling.seed, extra_body={"return_token_ids": True},
                extra_headers={MODEL_HEADER: model})  # for a load balancer's adapter affinity
            answer.commit = raw.headers.get(COMMIT_HEADER)
            for chunk in raw.parse():
                extra = chunk.model_extra or {}
                if extra.get("prompt_token_ids"):
                    answer.prompt_token_ids = extra["prompt_token_ids"]
                if chunk.usage:
                    answer.completion_tokens = chunk.usage.completion_tokens
                text = chunk.choices[0].delta.content if chunk.choices else None
                if text:
                    if answer.first_token_s is None:
                        answer.first_token_s = time.perf_counter() - started
                    answer.text += text
                    yield text
        except openai.APIConnectionError as e:
            answer.error = f"the endpoint {self.base_url} did not answer ({e.__cause__ or e}); it is retried on the next turn"
        except openai.APIStatusError as e:
            answer.error = f"{model} was refused ({e.status_code}): {error_message(e)}"
        except (openai.APIError, httpx2.HTTPError) as e:
            answer.error = f"the stream from {model} broke off: {getattr(e, 'message', None) or e}"
        answer.total_s = time.perf_counter() - started
        if answer.error is None and not answer.completion_tokens and answer.text:
            answer.error = f"the stream from {model} ended without its final usage chunk (cut off?)"
        return answer

    def rendered_prompt(self, model: str, token_ids: list[int]) -> str:
        """The prompt text the server built for `model` (its chat template applied), from the token
        ids it reported: what the model really read, not a client-side guess."""
        response = httpx2.post(f"{self.server_url}/detokenize", headers={**self.headers, MODEL_HEADER: model},
                               timeout=self.timeout,
                               json={"model": model, "tokens": token_ids})
        response.raise_for_status()
        return response.json()["prompt"]


def error_message(e: openai.APIStatusError) -> str:
    body = e.body if isinstance(e.body, dict) else {}
    inner = body.get("error", body) if isinstance(body.get("error", body), dict) else body
    return str(inner.get("message") or e.message)
