"""Tiny local models for tests and the demo: nothing is downloaded.

The tokenizer is byte-level with no merges (any text encodes, nothing to train), plus the
ChatML special tokens and <think>/</think>. Models are random Qwen2 or Llama with head size
64, the smallest head vLLM's CPU attention kernel accepts.

    python -m pipeline tiny --output_dir DIR [--arch qwen2|llama] [--hidden_size 128] [--num_layers 2] ...
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pipeline.config import require, setting
from pipeline.prompts import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
HEAD_DIM = 64


def build_tokenizer(merges_from: list[str] | None = None, vocab_size: int = 400):
    """A byte-level tokenizer with a ChatML template; EOS is <|im_end|>, PAD <|endoftext|>.
    `merges_from`: BPE merges learnt from these texts (up to `vocab_size`) and special tokens
    first, for a tokenizer that really differs from the default (cross-tokenizer tests). Save it
    beside a llama model: transformers reloads one in a qwen2 folder as Qwen2Tokenizer, whose
    pre-tokenizer changes the ids of a tokenizer with merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]) if merges_from is None else models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=merges_from is not None)
    if merges_from is not None:
        backend.train_from_iterator(merges_from, trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=alphabet, special_tokens=SPECIAL_TOKENS[:3], show_progress=False))
    backend.decoder = decoders.ByteLevel()
    # <think> tags are added as normal (not special) tokens so decoding keeps them in the text.
    backend.add_special_tokens(SPECIAL_TOKENS[:3])
    backend.add_tokens(SPECIAL_TOKENS[3:])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=4096,
    )


def build_model(out_dir: str | Path, arch: str = "qwen2", hidden_size: int = 128, num_layers: int = 2,
                intermediate_size: int | None = None, max_position_embeddings: int = 4096,
                seed: int = 0, num_heads: int | None = None, tokenizer=None, pad_vocab: bool = True,
                vocab_size: int | None = None) -> Path:
    """Save a random `arch` model and the tiny tokenizer to `out_dir`; return the path.
    Heads are hidden_size / 64 unless num_heads is given (llama only: vLLM's Qwen2 derives
    the head size from hidden_size / heads, Llama reads it from the config). `tokenizer`: another
    than build_tokenizer()'s; pad_vocab: False gives one logit per token (no padding rows);
    vocab_size: this many logits instead (a real model's, e.g. Qwen2.5's 151,936)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    heads = num_heads or hidden_size // HEAD_DIM
    if heads < 1:
        raise ValueError(f"hidden_size must be at least {HEAD_DIM} (head size), got {hidden_size}")
    if heads * HEAD_DIM != hidden_size and arch != "llama":
        raise ValueError(f"{arch}: hidden_size must be heads x {HEAD_DIM} (head size), got {hidden_size} with "
                         f"{heads} heads; arch llama takes any number of heads")
    tokenizer = tokenizer or build_tokenizer()
    common = dict(
        # padded like real checkpoints
        vocab_size=vocab_size or (-(-len(tokenizer) // 64) * 64 if pad_vocab else len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common))
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@dataclass
class TinyConfig:
    output_dir: str | None = setting(None, "where the model and tokenizer are saved")
    arch: Literal["qwen2", "llama"] = setting("qwen2", "model class")
    hidden_size: int = setting(128, "width; heads are hidden_size / 64 unless num_heads is set")
    num_layers: int = setting(2, "decoder layers")
    intermediate_size: int | None = setting(None, "MLP size (unset: 4 x hidden_size)")
    num_heads: int | None = setting(None, "attention heads of size 64 (llama only may differ from hidden_size / 64)")
    seed: int = setting(0, "torch seed of the random init")
    RENAMED: ClassVar[dict[str, str]] = {"hidden": "hidden_size", "layers": "num_layers",
                                         "intermediate": "intermediate_size", "heads": "num_heads"}

    def __post_init__(self) -> None:
        require(self, "output_dir")


def main(cfg: TinyConfig) -> Path:
    import logging

    out = build_model(cfg.output_dir, cfg.arch, cfg.hidden_size, cfg.num_layers, cfg.intermediate_size,
                      seed=cfg.seed, num_heads=cfg.num_heads)
    logging.getLogger(__name__).info(f"saved {out}")
    return out

