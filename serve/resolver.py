"""vLLM LoRA resolver: a request for `org/adapter[@revision]` that vLLM has not loaded is
resolved through the loradock registry (pulled, pinned to a commit, checked), then served.

Registered by loradock's vLLM plugin (`serve.plugin`) when `loradock serve` started this vLLM.
vLLM consults resolvers only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, which `loradock serve` sets.
"""

from loradock.errors import LoradockError, NotFound
from serve import runtime


def make_resolver():
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class RegistryResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            try:
                adapter = await runtime.fetch(lora_name)
            except NotFound:
                return None  # vLLM answers 404 with param "model"
            except LoradockError as e:
                raise ValueError(e.problem) from None  # vLLM answers a ValueError with a 400 carrying its text
            if adapter.soft_prompt:  # the middleware answers these on the two routes that take them
                raise ValueError(f"{lora_name} is a {adapter.info['method']} adapter: it answers on "
                                 "/v1/chat/completions and /v1/completions only")
            # vLLM replaces the id with its own counter; it only has to be positive here.
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(adapter.path))

    return RegistryResolver()


def register_resolver() -> None:
    from vllm.lora.resolver import LoRAResolverRegistry

    LoRAResolverRegistry.register_resolver("loradock registry", make_resolver())
