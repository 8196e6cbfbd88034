"""python tests/mixed_batch.py BASE_DIR ADAPTER_1 ADAPTER_2 [MAX_LORAS [prompt-logprobs]]: greedy answers of
vLLM's offline engine (max_loras 2 by default, so the second adapter holds the last slot) for base
requests alone, each adapter alone, and all three mixed in one batch, as JSON on stdout; with
`prompt-logprobs`, the mixed batch and the base alone again with `prompt_logprobs=1` (the logits of
every prompt position, computed request by request), their answers and prompt logprobs. Run by
tests/test_lora_ops.py in its own process: vLLM spawns its engine, which must not re-run a test
module."""

import json
import sys

PROMPTS = [f"Reverse the words: {' '.join(words)}" for words in
           (["red", "blue"], ["one", "two", "three"], ["cat", "dog", "fish"], ["a", "b", "c", "d"],
            ["sun", "moon"], ["left", "right", "up"], ["x", "y", "z"], ["tea", "milk", "honey", "jam"])]
MIX = [None, 1, 2, None, 1, None, 2, None]  # which adapter each prompt goes to in the mixed batch


def main(base: str, first: str, second: str, max_loras: str = "2", extra: str = "") -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=base, enable_lora=True, max_loras=int(max_loras), max_lora_rank=16, dtype="float32",
              max_model_len=256, enforce_eager=True)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    adapters = {1: LoRARequest("first", 1, first), 2: LoRARequest("second", 2, second)}

    def answers(requests, params=greedy):
        outputs = llm.generate(PROMPTS, params, lora_request=requests, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    result = {"base": answers(None), "mixed": answers([adapters.get(i) for i in MIX])}
    for i, adapter in adapters.items():
        result[f"adapter{i}"] = answers([adapter] * len(PROMPTS))
    if extra == "prompt-logprobs":
        params = SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=1)
        for name, requests in (("base", None), ("mixed", [adapters.get(i) for i in MIX])):
            outputs = llm.generate(PROMPTS, params, lora_request=requests, use_tqdm=False)
            result[f"{name}_with_prompt_logprobs"] = [list(o.outputs[0].token_ids) for o in outputs]
            result[f"{name}_prompt_logprobs"] = [[None if p is None else {str(k): v.logprob for k, v in p.items()}
                                                  for p in o.prompt_logprobs] for o in outputs]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:6])
