"""A tiny random causal LM built offline, for tests and benchmarks that exercise the machinery, not the model.

``build_tiny_llama(out, corpus)`` trains a byte-level BPE tokenizer on ``corpus`` (plus the prompt
templates), gives it a ChatML chat template, and saves a 2-layer Llama (hidden 128, head size 64 —
vLLM's CPU attention wants 64) next to it: a normal transformers folder that transformers, TRL and
vLLM all load, in about a second.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from sempa_train.core.templates import PARAPHRASE_TEMPLATES, PROMPTEOL_TEMPLATE

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_llama(out: Path, corpus: Iterable[str] = (), *, vocab_size: int = 600, seed: int = 0) -> Path:
    """Write a tiny Llama model and its tokenizer to ``out`` and return ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [*corpus, *PARAPHRASE_TEMPLATES.values(), *[PROMPTEOL_TEMPLATE] * 5]
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out
