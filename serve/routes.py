"""Which of vLLM's routes each of loradock's middleware pieces (`serve.middleware`) applies to: the
one table they all read, so that a route is added to, or taken from, a concern on one line.

The paths are vLLM 0.32's OpenAI server's. No web imports: `serve.soft_prompt` reads it too.
"""

from dataclasses import dataclass

HEALTH = "/health"
MODELS = "/v1/models"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
TOKENIZE = "/tokenize"
LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"
WEBHOOK = "/loradock/webhook"  # loradock's own: the registry's deliveries, signed

# Answered without the API key: load balancers and `loradock serve` poll /health; a webhook
# delivery carries its own credential (its signature).
OPEN = frozenset({HEALTH, WEBHOOK})
GENERATION = frozenset({CHAT, COMPLETIONS})  # the routes that answer as an adapter named by `model`


@dataclass(frozen=True)
class Routes:
    """The requests one concern applies to: an HTTP method (None: any) on a path of `paths` (None:
    any path) that is not one of `unless`."""

    method: str | None = None
    paths: frozenset[str] | None = None
    unless: frozenset[str] = frozenset()

    def __contains__(self, scope: dict) -> bool:
        path = scope["path"]
        return ((self.method is None or scope["method"] == self.method)
                and (self.paths is None or path in self.paths) and path not in self.unless)


# The concerns, in the order a request meets them (`serve.middleware.PIECES`).
AUTHENTICATED = Routes(unless=OPEN)  # vLLM itself guards only /v1, /v2, /inference and /cohere
TEMPLATE_CHECKED = Routes()  # any route whose request has a body: vLLM reads templates on many, and on new ones
FOLLOWED = Routes("POST", GENERATION | {UNLOAD})  # a moving name is pinned to a commit before anything else reads it
LISTED = Routes("GET", frozenset({MODELS}))
ADMITTED = Routes("POST", GENERATION | {LOAD})  # an adapter is named (generation) or a folder offered (load)
DRAINED = Routes("POST", GENERATION | {UNLOAD})
SOFT_PROMPTED = Routes("POST", GENERATION | {LOAD, UNLOAD})
RECORDED = Routes("POST", frozenset({LOAD, UNLOAD}))
