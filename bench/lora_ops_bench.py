"""python bench/lora_ops_bench.py [--rounds 3] [--prompts 64] [--tokens 64] [--work DIR]

Kernel speed of multi-LoRA on vLLM's CPU backend, without HTTP: offline `LLM.generate` on a
locally built, untrained Llama of hidden 512 x 6 layers (speed needs no trained weights) with
rank-8 adapters on every linear layer whose A and B are random and non-zero, so they do work.
For vLLM's stock torch ops and for loradock's (`serve/lora_ops.py`), each in its own engine
(`LORADOCK_LORA_OPS=stock|fast`), it times in rounds: the base alone, one adapter, and eight
distinct adapters round-robin (max_loras 8). Ratios are taken within a round, then the median
and range over rounds are printed. The tokenizer is the built-in tiny base model's
($LORADOCK_HOME/models/tiny-chat, built by `loradock base build`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, LAYERS, HEADS, RANK, ADAPTERS = 512, 6, 8, 8, 8
SCENARIOS = ("base", "one adapter", "8 adapters round-robin")


def build(work: Path, tokenizer_dir: Path) -> tuple[Path, list[Path]]:
    """The mid-size random model and eight random adapters, built once into `work`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir, adapters = work / "mid-model", [work / f"adapter-{i}" for i in range(ADAPTERS)]
    if all((a / "adapter_model.safetensors").exists() for a in adapters):
        return model_dir, adapters
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for seed, folder in enumerate(adapters):
        torch.manual_seed(100 + seed)
        peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir),
                                    LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear",
                                               init_lora_weights=False))
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.02)
        peft_model.save_pretrained(folder)
    return model_dir, adapters


def child(model_dir: str, adapters: list[str], rounds: int, prompts: int, tokens: int) -> dict:
    """In the engine's process: {scenario: [tokens/s per round]}."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=model_dir, enable_lora=True, max_loras=ADAPTERS, max_cpu_loras=ADAPTERS, max_lora_rank=RANK,
              dtype="float32", max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True)
    loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(adapters)]
    texts = [f"Reverse the words: word{i} other{i} third{i}" for i in range(prompts)]
    requests = {"base": None, "one adapter": [loras[0]] * prompts,
                "8 adapters round-robin": [loras[i % ADAPTERS] for i in range(prompts)]}
    llm.generate(texts[:8], params, lora_request=[loras[i] for i in range(8)], use_tqdm=False)  # load every slot
    figures = {name: [] for name in SCENARIOS}
    for _ in range(rounds):
        for name in SCENARIOS:
            started = time.perf_counter()
            outputs = llm.generate(texts, params, lora_request=requests[name], use_tqdm=False)
            generated = sum(len(o.outputs[0].token_ids) for o in outputs)
            figures[name].append(generated / (time.perf_counter() - started))
    return figures


def run_ops(ops: str, model_dir: Path, adapters: list[Path], args) -> dict:
    env = {**os.environ, "LORADOCK_LORA_OPS": ops, "VLLM_CPU_KVCACHE_SPACE": "2"}
    command = [sys.executable, __file__, "--child", str(model_dir), *map(str, adapters), "--rounds", str(args.rounds),
               "--prompts", str(args.prompts), "--tokens", str(args.tokens)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the {ops} engine failed:\n{done.stderr[-3000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(results: dict) -> None:
    print(f"\noffline LLM.generate, hidden {HIDDEN} x {LAYERS} layers, rank {RANK} on all linear layers, float32; "
          "median (range) over rounds")
    print(f"{'ops':<6} {'scenario':<24} {'tok/s':>22} {'x base (same round)':>22}")
    for ops, figures in results.items():
        for name in SCENARIOS:
            ratios = [s / b for s, b in zip(figures[name], figures["base"])]
            print(f"{ops:<6} {name:<24} {spread(figures[name], 0):>22} {spread(ratios):>22}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("LORADOCK_HOME", ".loradock")) / "bench-lora-ops")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], args.child[1:], args.rounds, args.prompts, args.tokens)))
        return 0
    tokenizer_dir = Path(os.environ.get("LORADOCK_HOME", ".loradock")) / "models" / "tiny-chat"
    if not (tokenizer_dir / "tokenizer.json").exists():
        sys.exit(f"no tokenizer in {tokenizer_dir}: build the base model first (`loradock base build`)")
    model_dir, adapters = build(args.work, tokenizer_dir)
    report({ops: run_ops(ops, model_dir, adapters, args) for ops in ("stock", "fast")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
