"""loradock's vLLM plugin, registered through the `vllm.general_plugins` entry point (see
pyproject.toml). vLLM calls `register()` in each of its processes (API server, engine core,
workers), so it is cheap and only installs:

- the multi-LoRA ops of `serve.lora_ops` on the CPU, in place of the stock ones (which answer base
  requests in mixed batches wrongly), whenever `loradock serve` started this vLLM, or wherever
  LORADOCK_LORA_OPS=fast; LORADOCK_LORA_OPS=stock keeps vLLM's own (to compare them);
- the registry LoRA resolver (`serve.resolver`), only under `loradock serve` (its settings in the
  environment).
"""

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
