"""loradock's vLLM plugin, registered through the `vllm.general_plugins` entry point (see
pyproject.toml). vLLM calls `register()` in each of its processes (API server, engine core,
workers), so it is cheap and only installs:

- the multi-LoRA ops of `serve.lora_ops` on the CPU, in place of the stock ones (which answer base
  requests in mixed batches wrongly), whenever `loradock serve` started this vLLM, or wherever
  LORADOCK_LORA_OPS=fast; LORADOCK_LORA_OPS=stock keeps vLLM's own (to compare them);
- the registry LoRA resolver (`serve.resolver`), only under `loradock serve` (its settings in the
  environment);
- one log line each time vLLM moves an adapter into one of its `--max-loras` slots (a slot swap),
  only under `loradock serve`: how a server with more adapters than slots is seen to be swapping;
- the token embedding without its LoRA delta, only under `loradock serve` (`plain_embedding`).
"""

import logging
import os

from serve.config import ENVIRONMENT

OPS_ENVIRONMENT = "LORADOCK_LORA_OPS"  # fast | stock


def register() -> None:
    under_loradock = bool(os.environ.get(ENVIRONMENT))
    if os.environ.get(OPS_ENVIRONMENT, "fast" if under_loradock else "stock") == "fast":
        from serve.lora_ops import install

        install()
    if under_loradock:
        from serve.resolver import register_resolver

        register_resolver()
        log_slot_swaps()
        plain_embedding()


SWAP_LINE = "loradock: LoRA slot swap"


def log_slot_swaps() -> None:
    from vllm.lora.model_manager import LRUCacheLoRAModelManager

    stock = LRUCacheLoRAModelManager.activate_adapter
    if getattr(stock, "logs_swaps", False):
        return
    logger = logging.getLogger("vllm.loradock")  # vLLM's handler and level (`loradock serve --log-level`)

    def activate_adapter(self, lora_id: int) -> bool:
        moved = stock(self, lora_id)
        if moved:
            logger.info("%s: adapter %d into a slot (%d slots)", SWAP_LINE, lora_id, self.lora_slots)
        return moved

    activate_adapter.logs_swaps = True
    LRUCacheLoRAModelManager.activate_adapter = activate_adapter


def plain_embedding() -> None:
    """The embedding layer's LoRA wrapper answers with the base embedding alone.

    With `--enable-prompt-embeds`, a batch that mixes a `prompt_embeds` request (a prompt-tuning
    adapter's) with token requests embeds only the token positions, while the wrapper indexes the
    whole batch's adapter mapping: the worker dies (IndexError, mask [22] vs tensor [1, 8], vLLM
    0.32 CPU). Nothing is lost: the adapter check refuses embedding LoRA, so every slot's embedding
    delta is zero.
    """
    from vllm.lora.layers import VocabParallelEmbeddingWithLoRA

    def forward(self, x):
        return self.base_layer.forward(x)

    VocabParallelEmbeddingWithLoRA.forward = forward
