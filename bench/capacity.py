"""A capacity model for serving many LoRA adapters of one base on a GPU with vLLM: bytes per adapter
from the shapes, what the KV cache keeps, and when to shard the base. Pure arithmetic, nothing
downloaded or run on a GPU:

    python bench/capacity.py [--gpu-gib 80] [--utilization 0.9] [--max-loras 16] [--context 4096]

The shapes are those of each model's published config.json (hidden size, layers, heads, KV heads,
head dim, MLP size, vocabulary). Assumptions, stated where they are used:
- weights, adapters and KV cache in bf16 (2 bytes);
- vLLM takes `--gpu-memory-utilization` of the GPU, keeps the weights, an activation reserve
  (ACTIVATION_GIB: what its profiling run measures varies with batch and model; 2 GiB here), and
  `--max-loras` adapter slots of `--max-lora-rank` for every target module, preallocated; the
  rest is KV cache;
- the tensor parallel size shown is the smallest of 1, 2, 4, 8 that leaves a quarter of each GPU
  for the KV cache (below that, batches stay small and the GPU waits on weights);
- adapters beyond the slots wait in host memory (`--max-cpu-loras`), then on disk (the pulled
  copies), and are swapped into a slot when a request names one.
"""

import argparse
from dataclasses import dataclass

GIB = 2**30
BYTES = 2  # bf16
ACTIVATION_GIB = 2.0


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    tied: bool  # the LM head shares the embedding matrix

    def modules(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear module of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.mlp), "up_proj": (self.hidden, self.mlp),
                "down_proj": (self.mlp, self.hidden)}

    def parameters(self) -> int:
        per_layer = sum(i * o for i, o in self.modules().values()) + 2 * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def lora_bytes(self, rank: int, targets: tuple[str, ...]) -> int:
        """One adapter: A (rank x in) and B (out x rank) per target module per layer."""
        return self.layers * sum(rank * (i + o) for m, (i, o) in self.modules().items() if m in targets) * BYTES

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * BYTES


MODELS = (
    Shape("Qwen/Qwen2.5-0.5B-Instruct", 896, 24, 14, 2, 64, 4864, 151936, tied=True),
    Shape("meta-llama/Llama-3.1-8B-Instruct", 4096, 32, 32, 8, 128, 14336, 128256, tied=False),
    Shape("Qwen/Qwen2.5-7B-Instruct", 3584, 28, 28, 4, 128, 18944, 152064, tied=False),
    Shape("mistralai/Mistral-7B-Instruct-v0.3", 4096, 32, 32, 8, 128, 14336, 32768, tied=False),
    Shape("meta-llama/Llama-3.1-70B-Instruct", 8192, 80, 64, 8, 128, 28672, 128256, tied=False),
)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = (*ATTENTION, "gate_proj", "up_proj", "down_proj")


def kv_budget(shape: Shape, gpu_gib: float, utilization: float, tensor_parallel: int, max_loras: int,
              max_rank: int, targets: tuple[str, ...]) -> float:
    """Bytes of KV cache per GPU left when the base is sharded over `tensor_parallel` GPUs (weights,
    adapter slots and KV heads split evenly)."""
    weights = shape.parameters() * BYTES / tensor_parallel
    slots = max_loras * shape.lora_bytes(max_rank, targets) / tensor_parallel
    return gpu_gib * GIB * utilization - weights - ACTIVATION_GIB * GIB - slots


def table(args) -> list[str]:
    lines = [f"GPU {args.gpu_gib:g} GiB at --gpu-memory-utilization {args.utilization}, --max-loras {args.max_loras}, "
             f"context {args.context} tokens, bf16, activation reserve {ACTIVATION_GIB:g} GiB",
             "", "| base | params | weights GiB | targets | adapter MiB at r 8 / 16 / 64 | adapters per GiB of host RAM (r 16) "
             "| tensor parallel | KV cache GiB per GPU | sequences of full context |",
             "|---|---|---|---|---|---|---|---|---|"]
    for shape in MODELS:
        for targets, label in ((ATTENTION, "attention"), (ALL_LINEAR, "all-linear")):
            sizes = " / ".join(f"{shape.lora_bytes(r, targets) / 2**20:.1f}" for r in (8, 16, 64))
            per_gib = GIB // shape.lora_bytes(16, targets)
            tp = next((t for t in (1, 2, 4, 8) if kv_budget(shape, args.gpu_gib, args.utilization, t, args.max_loras,
                                                              args.max_lora_rank, targets) > 0.25 * args.gpu_gib * GIB),
                      8)
            kv = kv_budget(shape, args.gpu_gib, args.utilization, tp, args.max_loras, args.max_lora_rank, targets)
            sequences = kv * tp / (shape.kv_bytes_per_token() * args.context)  # over the tp GPUs, KV heads split
            lines.append(f"| {shape.name} | {shape.parameters() / 1e9:.2f} B | {shape.parameters() * BYTES / GIB:.1f} | "
                         f"{label} | {sizes} | {per_gib} | {tp} | {kv / GIB:.1f} | {sequences:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-gib", type=float, default=80, help="memory of one GPU (80: H100/A100 80GB)")
    parser.add_argument("--utilization", type=float, default=0.9, help="vLLM's --gpu-memory-utilization")
    parser.add_argument("--max-loras", type=int, default=16, help="adapter slots on the GPU (vLLM's --max-loras)")
    parser.add_argument("--max-lora-rank", type=int, default=16, help="the slots' rank (vLLM's --max-lora-rank)")
    parser.add_argument("--context", type=int, default=4096, help="tokens per sequence (prompt and answer)")
    print("\n".join(table(parser.parse_args())))


if __name__ == "__main__":
    main()
