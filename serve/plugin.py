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
- the token embedding and the logits without their LoRA deltas, only under `loradock serve`
  (`plain_embedding`, `plain_logits`);
- one log line when an engine core process dies while vLLM is not stopping it, with its exit status
  or signal (`log_engine_deaths`), only under `loradock serve`: vLLM's API server then shuts down
  with status 0, and `loradock serve` reads this line to say what happened;
- seeded sampling that survives a chunked prefill on the CPU (`seeded_sampling_on_cpu`), only under
  `loradock serve`.
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
        log_engine_deaths()
        plain_embedding()
        plain_logits()
        seeded_sampling_on_cpu()


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


ENGINE_DEATH_LINE = "loradock: engine process died"


def log_engine_deaths() -> None:
    """When vLLM's API server shuts its engine core processes down while it was not stopping them
    already (it does so once `monitor_engine_liveness` sees one gone), log each one that had ended:
    `ENGINE_DEATH_LINE: NAME pid PID exit CODE` (a negative CODE is the signal that killed it, as
    `multiprocessing` reports it). The others are still alive at that moment: vLLM stops them next."""
    from multiprocessing import connection

    from vllm.v1.engine.utils import CoreEngineProcManager

    stock = CoreEngineProcManager.shutdown
    if getattr(stock, "logs_deaths", False):
        return
    logger = logging.getLogger("vllm.loradock")

    def shutdown(self, *args, **kwargs) -> None:
        if not self.manager_stopped.is_set():
            ended = connection.wait([proc.sentinel for proc in self.processes], timeout=0)
            for proc in self.processes:
                if proc.sentinel in ended:
                    proc.join(timeout=2)  # its pipe closes as it exits, a moment before its status is there
                if proc.exitcode not in (None, 0):
                    logger.error("%s: %s pid %s exit %s", ENGINE_DEATH_LINE, proc.name, proc.pid, proc.exitcode)
        return stock(self, *args, **kwargs)

    shutdown.logs_deaths = True
    CoreEngineProcManager.shutdown = shutdown


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


def plain_logits() -> None:
    """The LM head's LoRA wrapper answers with the base logits alone.

    Every adapter `loradock serve` loads passed the adapter check, which refuses LoRA on the LM head
    (`hub.adapter.checks.weight_problems`), so every slot's logits delta is zero: skipping it changes
    no answer and saves a [tokens, vocab] product per step. It also keeps prompt logprobs (and
    `echo` with logprobs) off a path where vLLM hands the logits ops one request's prompt rows with the
    whole batch's adapter indices (`serve.lora_ops._per_row`).
    """
    from vllm.lora.layers import LogitsProcessorWithLoRA

    def _get_logits(self, hidden_states, lm_head, embedding_bias=None, skip_gather=False):
        return self.base_layer._get_logits(hidden_states, getattr(lm_head, "base_layer", lm_head), embedding_bias,
                                           skip_gather)

    LogitsProcessorWithLoRA._get_logits = _get_logits


def seeded_sampling_on_cpu() -> None:
    """A request with a `seed` whose prefill is split over steps (a long prompt, or one that shares
    a step's token budget) no longer stops the engine on the CPU.

    vLLM samples a token for every request of a step, then discards it for a request still in
    prefill and rewinds that request's random generator with `set_offset`, which only CUDA's
    generators have: on the CPU, `RuntimeError: CPU Generator does not use offset` kills the engine
    (vLLM 0.32). Here each such generator's state is kept before sampling, the rewind skips it, and
    the state is put back: the same effect, so a seeded answer does not depend on how its prefill
    was split.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    stock_sample, stock_bookkeeping = GPUModelRunner._sample, GPUModelRunner._bookkeeping_sync
    if getattr(stock_sample, "keeps_seeded_state", False):
        return

    def in_prefill(runner) -> dict:
        """{request index: its generator} for the requests whose sampled token this step discards."""
        mask = runner.discard_request_mask.np[:runner.input_batch.num_reqs]
        return {int(i): gen for i in mask.nonzero()[0] if (gen := runner.input_batch.generators.get(int(i)))}

    def _sample(self, *args, **kwargs):
        self.loradock_seeded_states = {i: gen.get_state() for i, gen in in_prefill(self).items()}
        return stock_sample(self, *args, **kwargs)

    def _bookkeeping_sync(self, *args, **kwargs):
        states = getattr(self, "loradock_seeded_states", {})
        held = {i: self.input_batch.generators.pop(i) for i in states if i in self.input_batch.generators}
        try:
            return stock_bookkeeping(self, *args, **kwargs)
        finally:
            for i, gen in held.items():
                gen.set_state(states[i])
                self.input_batch.generators[i] = gen
            self.loradock_seeded_states = {}

    _sample.keeps_seeded_state = True
    GPUModelRunner._sample, GPUModelRunner._bookkeeping_sync = _sample, _bookkeeping_sync
