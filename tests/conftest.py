"""Shared fixtures: a tiny Llama model with a byte-level BPE tokenizer, built offline once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failing hub lookup would otherwise wait ~50 s
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_NLI = REPO / "data" / "nli_sample.jsonl"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    from sempa_train.templates import PARAPHRASE_TEMPLATES, PROMPTEOL_TEMPLATE

    lines = [json.loads(line) for line in SAMPLE_NLI.read_text().splitlines()]
    texts = [r["premise"] for r in lines] + [r["hypothesis"] for r in lines]
    return texts + list(PARAPHRASE_TEMPLATES.values()) + [PROMPTEOL_TEMPLATE] * 5


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 128, head size 64) and a 600-token byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sample_prefs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gold preference dataset of the built-in NLI sample."""
    from sempa_train.config import PrepareConfig
    from sempa_train.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "sample"
    return prepare(PrepareConfig(source=str(SAMPLE_NLI)), out).preferences_dir


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
