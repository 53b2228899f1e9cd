"""The model card of a trained adapter: ``adapter/README.md`` in the Hugging Face convention.

An adapter folder with this card can be pushed to a hub as is (``huggingface-cli upload USER/NAME
adapter/``): the YAML header names the base model and the library (peft), the body says what the
adapter was trained on (dataset path, rows, data hash), with which recipe, which step and scale were
selected, how to embed with it (the PromptEOL template, last token, no normalisation) and how to load
it. The train stage writes the card without results; the evaluate stage writes it again beside the
adapter it evaluated (``eval/adapter``) with the STS and retention numbers of its ``summary.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sempa_train.core.io import read_json, write_text
from sempa_train.core.templates import PROMPTEOL_TEMPLATE

# Hub ids of the built-in models (the card's ``base_model``: a hub links the adapter to it).
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
RECIPE_FIELDS = ("loss_type", "loss_weights", "beta", "learning_rate", "lr_scheduler", "warmup_ratio", "max_steps",
                 "batch_size", "gradient_accumulation_steps", "max_length", "lora_r", "lora_alpha",
                 "lora_target_modules", "seed")


def hub_id(model: str) -> str:
    """The Hub id of a built-in model name; other names (hub ids, folders) as given."""
    return HUB_IDS.get(model.lower(), model)


def render_model_card(model_dir: Path, *, evaluation: Path | None = None, scale: float = 1.0,
                      base_model: str | None = None) -> str:
    """The card of the adapter in the train output ``model_dir`` (its manifest and metrics), with the results of
    the evaluation folder ``evaluation`` when given; ``scale`` is the factor applied to the adapter's update,
    ``base_model`` the model when ``model_dir`` is not a sempa train output."""
    manifest_file = Path(model_dir) / "manifest.json"  # a folder sempa train wrote; else the card says less
    manifest = read_json(manifest_file) if manifest_file.is_file() else {}
    metrics_file = Path(model_dir) / "metrics.json"
    metrics = read_json(metrics_file) if metrics_file.is_file() else {}
    config = manifest.get("config", {})
    base = manifest.get("base_model", config.get("model", base_model or "?"))
    lines = [
        "---",
        f"base_model: {hub_id(str(base))}",
        "library_name: peft",
        "pipeline_tag: feature-extraction",
        "tags: [sempa, dpo, lora, sentence-embeddings, prompteol, trl]",
        "---",
        "",
        f"# SemPA LoRA adapter for {base}",
        "",
        "Sentence embeddings from a generative model: a LoRA adapter trained with sentence-level DPO (SemPA) so that "
        "the model's PromptEOL embedding improves on semantic similarity while it keeps generating. Made with "
        f"sempa {manifest.get('code_version', '?')}.",
        "",
        "## Training data",
        "",
        f"- preference dataset: `{manifest.get('data', '?')}` ({manifest.get('triples', '?')} pairs)",
        f"- data sha256: `{manifest.get('data_sha256', '?')}`",
        "",
        "## Recipe",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {name} | {_value(config[name])} |" for name in RECIPE_FIELDS if name in config],
    ]
    if metrics.get("selected_step") is not None:
        lines.append(f"| selected checkpoint | step {metrics['selected_step']} x{metrics.get('selected_scale', 1.0):g} "
                     "(best STS probe within the gates) |")
    if scale != 1.0:
        lines.append(f"| scale of the update in this folder | x{scale:g} |")
    lines += ["", "## Results", ""]
    lines += _results(evaluation) if evaluation is not None else [
        "Not evaluated yet: `sempa run --stages evaluate --adapter THIS_FOLDER` writes a card with results."]
    lines += [
        "",
        "## Embeddings",
        "",
        f"PromptEOL: the sentence goes into `{PROMPTEOL_TEMPLATE}` after PromptEOL's clean-up (whitespace collapsed, "
        "double quotes made single, a final `?` made `.`, a final `.` added: `preprocess_sentence`); the "
        "embedding is the final layer's hidden state (after the norm) of the last token; vectors are not "
        "normalised. Compare them with cosine similarity.",
        "",
        "## Load",
        "",
        "```python",
        "from sempa_train.stages.embedding import load_encoder",
        f'encoder = load_encoder("{base}", adapter="PATH/TO/THIS/FOLDER")',
        'vectors = encoder.encode(["A man is playing a guitar.", "Someone plays an instrument."])',
        "",
        "# or with transformers + peft directly (then apply the template and take the last token yourself)",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{hub_id(str(base))}"), '
        '"PATH/TO/THIS/FOLDER")',
        "```",
        "",
        "`sempa export --model BASE --adapter THIS_FOLDER --out MERGED` writes a merged model folder that vLLM's "
        "pooling runner serves.",
    ]
    return "\n".join(lines) + "\n"


def _value(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _results(evaluation: Path) -> list[str]:
    """STS (with paired-bootstrap intervals) and retention of an evaluation folder, as markdown lines."""
    from sempa_train.stages.assessment import Evaluation

    ev = Evaluation.load(evaluation)
    intervals = ev.delta_intervals() or {}
    lines = ["STS: Spearman x 100 of cosine similarity, base model against this adapter (95 % paired-bootstrap "
             "interval of the change):", "", "| task | base | tuned | change |", "|---|---:|---:|---|"]
    for task, tuned in ev.sts.items():
        low_high = intervals.get(task)
        interval = f" [{low_high[0]:+.2f}, {low_high[1]:+.2f}]" if low_high else ""
        lines.append(f"| {task} | {ev.sts_base[task]:.2f} | {tuned:.2f} | {tuned - ev.sts_base[task]:+.2f}"
                     f"{interval} |")
    lines += ["", f"Split: {ev.split} (dev splits select and tune; test splits report)."]
    if ev.perplexity_ratio is not None:
        lines += ["", "Generation kept: perplexity ratio (tuned / base) on held-out text "
                  f"{ev.perplexity_ratio:.3f}; greedy-paraphrase similarity change "
                  f"{_signed(ev.paraphrase_similarity_delta)}; gates {'passed' if ev.gates_passed else 'failed'}."]
    return lines


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def write_model_card(adapter_dir: Path, model_dir: Path, *, evaluation: Path | None = None,
                     scale: float = 1.0, base_model: str | None = None) -> Path:
    """Write ``adapter_dir/README.md`` (atomically) and return its path."""
    path = Path(adapter_dir) / "README.md"
    write_text(path, render_model_card(model_dir, evaluation=evaluation, scale=scale, base_model=base_model))
    return path


def card_metadata(card: str) -> dict[str, Any]:
    """The YAML header of a card as a mapping (for tests and tools)."""
    import yaml

    if not card.startswith("---\n"):
        return {}
    header = card.split("---\n", 2)[1]
    values = yaml.safe_load(header)
    return values if isinstance(values, dict) else {}
