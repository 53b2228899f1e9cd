"""One config dataclass per stage, with defaults, help strings and validation.

Every field has a default and a help string; ``__post_init__`` rejects bad values with a message that
quotes them. The same classes drive the ``sempa`` command-line flags (``add_arguments``), YAML/JSON
config files (``load``), the Prefect flow parameters, and the ``config.json`` written beside every
output.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Self, TypeVar

from sempa_train.core.io import read_config_file
from sempa_train.core.templates import resolve_template

C = TypeVar("C", bound="StageConfig")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with a default, a help string and optional choices (read by the CLI)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _check_positive(name: str, value: float | int, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


class StageConfig:
    """Shared behaviour of the stage configs: dict round trip, files, CLI flags, declared choices."""

    def _check_choices(self) -> None:
        """Every field declared with ``choices`` (``option(..., choices=...)``) holds one of them: the choices are
        declared once, for validation and for the CLI."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.metadata.get("choices"):
                _check_choice(f.name, getattr(self, f.name), f.metadata["choices"])

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()  # type: ignore[call-overload]
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, base: Self | None = None) -> Self:
        """Build a config from ``values`` on top of ``base`` (defaults when None); unknown keys fail."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        hints = typing.get_type_hints(cls)
        merged = {**(base or cls()).to_dict(), **values}  # type: ignore[call-arg]
        return cls(**{k: _coerce(v, hints[k], k) for k, v in merged.items()})

    @classmethod
    def load(cls, path: Path, *, base: Self | None = None) -> Self:
        """Read a YAML or JSON file of field values (a ``preset:`` key picks the base, if supported)."""
        values = read_config_file(path, "a config file must hold a mapping of field names to values",
                                  allow_empty=False)
        if "preset" in values:
            base = cls.preset(values.pop("preset"))
        try:
            return cls.from_dict(values, base=base)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    @classmethod
    def preset(cls, name: str) -> Self:
        """A named preset; stages without presets only know ``default``."""
        if name != "default":
            raise ValueError(f"{cls.__name__} has no preset {name!r}; known: default")
        return cls()  # type: ignore[call-arg]

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Turn a YAML/JSON/CLI value into the type of field ``name`` (lists → tuples, comma strings → tuples, number
    strings → numbers: YAML reads ``5e-4``, without a dot, as a string)."""
    if value is None:
        return None
    base = _base_type(hint)
    if base is tuple:
        items = [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)
        element = _element_type(hint)
        return tuple(_number(v, element, name) if element in (int, float) else v for v in items)
    if base in (int, float):
        return _number(value, base, name)
    return value


def _number(value: Any, kind: type, name: str) -> Any:
    """``value`` as an int or float (``kind``) when it is a number or a string of one; a clear error otherwise."""
    what = "a number" if kind is float else "an integer"
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError
        if kind is int and isinstance(value, int):
            return value
        number = float(value)
        if kind is int and not number.is_integer():
            raise ValueError
    except ValueError:
        raise ValueError(f"{name}: expected {what}, got {value!r}") from None
    return int(number) if kind is int else number


def _element_type(hint: Any) -> Any:
    """``tuple[float, ...] | None`` → float."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    args = typing.get_args(hint)
    return args[0] if args else str


def _base_type(hint: Any) -> Any:
    """``int | None`` → int, ``tuple[str, ...]`` → tuple, ``bool | None`` → bool."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    return typing.get_origin(hint) or hint


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type[StageConfig], *, exclude: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of ``cls`` (but ``exclude``); flags the user does not pass stay unset. A boolean
    flag alone means true (``--normalize``); ``--normalize false`` also works."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (defaults shown; a --config file or preset may change them)")
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in exclude:
            continue
        base = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": f"{f.metadata.get('help', '')} (default: {f.default!r})".replace("%", "%%"),  # argparse formats
        }
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if base is bool:
            kwargs.update(type=_parse_bool, metavar="true|false", nargs="?", const=True)
        elif base is tuple:
            kwargs["type"] = str
            kwargs["metavar"] = "A,B,..."
        elif base in (int, float):
            kwargs["type"] = base
        else:
            kwargs["type"] = str
        group.add_argument(f"--{f.name.replace('_', '-')}", **kwargs)


def config_from_args(cls: type[C], args: argparse.Namespace, *, base: C | None = None) -> C:
    """The config of ``cls`` from parsed flags on top of ``base`` (flags win)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(args).items() if k in names}
    return cls.from_dict(values, base=base)


# --------------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------------

SOURCE_FORMATS = ("auto", "jsonl", "csv", "parquet", "simcse", "hf")
PAIRINGS = ("one", "all")


@dataclasses.dataclass(frozen=True)
class PrepareConfig(StageConfig):
    """Load NLI pairs and build the paper's gold preference triples.

    Source: ``source``, ``source_format``, ``split``. Grouping: ``pairing``, ``seed``,
    ``max_premises``. Prompt: ``template``.
    """

    source: str = option("data/nli_sample.jsonl", "NLI source: a .jsonl/.csv/.parquet file, SimCSE's triplet csv, "
                         "or a Hugging Face dataset id (needs network)")
    source_format: str = option("auto", "format of the source; auto guesses from the columns and extension",
                                choices=SOURCE_FORMATS)
    split: str = option("train", "split to read when the source is a Hugging Face dataset id")
    template: str = option("P1", "paraphrase template: P1-P5 or a custom text with {sentence}")
    pairing: str = option("one", "one: one (entailment, contradiction) per premise, chosen with the seed; "
                          "all: every combination", choices=PAIRINGS)
    seed: int = option(0, "seed for picking each premise's hypotheses and the max_premises subset")
    max_premises: int | None = option(None, "keep a seeded random subset of this many premises (of those with "
                                      "both an entailment and a contradiction)")
    max_premise_words: int = option(200, "drop premises longer than this many words (premise_too_long; SmolLM2's "
                                    "tokenizer makes about 1.3 tokens a word of English): an over-long premise "
                                    "would overflow the sampling engine's context")

    def __post_init__(self) -> None:
        self._check_choices()
        resolve_template(self.template)
        if self.max_premises is not None:
            _check_positive("max_premises", self.max_premises)


LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")  # TRL 1.x DPOTrainer
CHAT_MODES = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda")
REF_PASSES = ("auto", "in_batch", "by_length")


@dataclasses.dataclass(frozen=True)
class PolicyConfig(StageConfig):
    """The model being tuned and how it is prompted, stated once for a run.

    ``RunConfig`` gives these values to every stage that runs the policy or writes its prompts
    (sample, rank, train, the retention probes' chat template, the policy scorer); a run config that sets
    one of them in a stage section instead is refused, so the stages cannot disagree about the model or
    the prompt. The paraphrase probes keep their own template (``retention.template``,
    ``train.eval_template``, P1 by default): a yardstick that stays fixed when the training prompt changes.
    """

    model: str = option("smollm2-135m-instruct", "policy model: built-in name, local folder, or Hub id")
    template: str = option("P1", "paraphrase template: P1-P5 or a custom text with {sentence}")
    chat_template: str = option("auto", "wrap prompts in the tokenizer's chat template (auto: when it has one)",
                                choices=CHAT_MODES)

    def __post_init__(self) -> None:
        self._check_choices()
        resolve_template(self.template)


@dataclasses.dataclass(frozen=True)
class TrainConfig(StageConfig):
    """DPO with LoRA through TRL's ``DPOTrainer``.

    Model: ``model``, ``chat_template``, ``device``, ``bf16``, ``attention_fp32``. Objective: ``beta``, ``loss_type``,
    ``loss_weights``, ``ld_alpha``, ``dpop_lambda``.
    LoRA: ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``. Optimisation:
    ``learning_rate``, ``warmup_ratio``, ``lr_scheduler``, ``epochs``, ``max_steps``,
    ``batch_size``, ``gradient_accumulation_steps``, ``max_length``. Speed: ``precompute_ref_log_probs``,
    ``ref_pass``, ``cache_ref_log_probs``, ``share_prompt``, ``gradient_checkpointing``. Checkpoint selection:
    ``eval_every``, ``eval_senteval_dir``, ``eval_sts_split``, ``eval_sts_pairs``, ``eval_sts_tasks``,
    ``eval_sts_genre_mix``, ``eval_text_file``, ``eval_text_offset``, ``eval_texts``, ``eval_paraphrases``,
    ``eval_template``, ``select_max_perplexity_ratio``, ``select_min_paraphrase_delta``, ``select_scales``,
    ``select_scale_margin``. Output: ``save_merged``.
    Presets: ``paper`` (the paper's recipe, for GPUs) and ``cpu`` (small batches, precomputed and cached
    reference log-probs, bf16 only where the CPU has bf16 units).
    """

    model: str = option("smollm2-135m-instruct", "policy model: built-in name, local folder, or Hub id")
    chat_template: str = option("auto", "wrap prompt/answers in the tokenizer's chat template "
                                "(auto: when the tokenizer has one)", choices=CHAT_MODES)
    device: str = option("auto", "auto picks cuda when available", choices=DEVICES)
    bf16: bool | None = option(None, "bf16 autocast (default: on where the device has bf16 matrix units — a CUDA "
                               "GPU, a CPU with AVX512-BF16 or AMX — and off elsewhere, where fp32 is faster)")
    attention_fp32: bool | None = option(None, "compute attention in fp32 inside a bf16 autocast step, the "
                                         "projections staying bf16 (default: on a CPU, where torch's bf16 "
                                         "attention kernel is the slower one; off on a GPU)")
    beta: float = option(0.1, "DPO beta (deviation from the reference)")
    loss_type: str = option("sigmoid", "TRL objective, or several comma-separated ones summed with loss_weights: "
                            "sigmoid (DPO), ipo, apo_zero, nca_pair, bco_pair (raise the chosen likelihood), sft "
                            "(NLL of the chosen answer; sigmoid,sft is DPO with a likelihood anchor), ...")
    loss_weights: tuple[float, ...] | None = option(None, "weight of each loss_type (default: 1 each)")
    ld_alpha: float | None = option(None, "LD-DPO: weight of answer tokens beyond the shorter answer's length, "
                                    "in [0, 1] (None: plain DPO)")
    dpop_lambda: float = option(0.0, "DPO-Positive (Smaug): penalty lambda x max(0, reference - policy log-prob of "
                                "the chosen answer) inside the sigmoid loss; needs precompute_ref_log_probs (0: off)")
    lora_r: int = option(8, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_target_modules: str = option("all-linear", "LoRA targets: all-linear or comma-separated module names")
    learning_rate: float = option(1e-4, "peak learning rate (AdamW)")
    warmup_ratio: float = option(0.05, "fraction of steps for linear warmup")
    lr_scheduler: str = option("cosine", "learning-rate schedule (transformers name)")
    epochs: float = option(1.0, "passes over the preference data")
    max_steps: int = option(-1, "stop after this many optimiser steps (-1: run the epochs)")
    batch_size: int = option(8, "examples per device per step")
    gradient_accumulation_steps: int = option(
        1, "steps accumulated per update (effective batch = batch_size x this x devices)")
    effective_batch_size: int | None = option(
        None, "keep this many examples per update whatever the number of processes: overrides "
        "gradient_accumulation_steps with effective_batch_size / (batch_size x processes)")
    max_length: int = option(128, "max tokens of prompt + answer")
    precompute_ref_log_probs: bool = option(True, "compute the reference log-probs once before training "
                                            "(saves a forward pass per step)")
    ref_pass: str = option("auto", "where precomputed reference log-probs are computed: in_batch (in the first "
                           "training step that sees each pair, in its batch, so policy and reference round alike "
                           "and the first loss is log 2 exactly) or by_length (a pass of its own before training, "
                           "shortest pairs first: less padding, but in bf16 it rounds apart from the training "
                           "batch by ~2e-3 in the first loss). auto: in_batch under bf16/fp16, by_length in fp32 "
                           "(where both agree within 1e-6) and with several processes", choices=REF_PASSES)
    ref_batch_size: int | None = option(None, "pairs per batch of the by_length reference pass, which runs "
                                        "shortest pairs first and without gradients (default: batch_size)")
    cache_ref_log_probs: bool = option(True, "keep precomputed reference log-probs in $SEMPA_CACHE_DIR/ref_logps, "
                                       "keyed by model, data, precision and ref_pass: a rerun on the same data "
                                       "skips computing them")
    share_prompt: bool = option(True, "run each pair as one packed sequence (prompt once, then chosen and rejected) "
                                "and the LM head over answer tokens only; the loss is TRL's, computed faster")
    gradient_checkpointing: bool = option(False, "trade compute for memory")
    logging_steps: int = option(1, "log every N steps")
    eval_every: int = option(0, "probe the policy every N steps (STS-B subset + held-out perplexity) and keep the "
                             "best step within select_max_perplexity_ratio as the adapter (0: off, keep the last)")
    eval_senteval_dir: str | None = option(None, "SentEval data folder of the in-training STS probe")
    eval_sts_split: str = option("train", "STS-B split of the probe; train keeps the dev scores you report free of "
                                 "the selection's bias", choices=("train", "dev"))
    eval_sts_pairs: int = option(500, "pairs of each probe task (a subset seeded with seed)")
    eval_sts_tasks: tuple[str, ...] = option(("STSBenchmark",), "STS tasks of the probe (their eval_sts_split); "
                                             "selection ranks steps by their mean Spearman, e.g. [STSBenchmark, "
                                             "SICKRelatedness] to select for both reported tasks")
    eval_sts_genre_mix: str | None = option(
        None, "draw the STS-B probe pairs in the genre proportions (captions, news, forums) of this split, e.g. dev: "
        "STS-B train is 57 % news and 8 % forums, dev 33 % and 25 %, so a random train subset mostly reads news; "
        "only the split's genre column is read, never its scores (None: pairs drawn at random)")
    eval_text_file: str = option("data/heldout_text.txt", "held-out text of the perplexity probe (.txt or NLI .jsonl); "
                                 "must be text no arm trains on")
    eval_texts: int = option(100, "held-out texts in the perplexity probe")
    eval_paraphrases: int = option(40, "held-out texts (the first N read) paraphrased greedily at each probe and "
                                   "scored for similarity to their source (0: no paraphrase probe)")
    eval_text_offset: int = option(0, "skip the first N distinct texts of eval_text_file, e.g. the ones the final "
                                   "retention probes read from the same file, so selection does not see them")
    eval_template: str = option("P1", "paraphrase template of the in-training paraphrase probe (a fixed yardstick, "
                                "like retention.template; the training prompts come with the data)")
    select_max_perplexity_ratio: float | None = option(
        1.05, "checkpoint selection gate: probed perplexity / base perplexity at most this (None: no gate)")
    select_min_paraphrase_delta: float | None = option(
        -0.02, "checkpoint selection gate: probed minus base greedy-paraphrase similarity at least this "
        "(None: no gate)")
    select_scales: tuple[float, ...] = option((), "after training, also probe the best-STS step's LoRA update scaled "
                                              "by these factors (e.g. 0.25,0.5,0.75); the best passing probe wins")
    select_scale_margin: float = option(
        0.0, "a scaled update wins over the best passing unscaled step only when its STS probe is higher by more "
        "than this many Spearman points: the probe's sampling noise (tests/benchmarks/probe_noise.py measures "
        "it), so a tie keeps the update as trained; 0: the best probe wins")
    seed: int = option(0, "training seed")
    save_merged: bool = option(False, "also save base+adapter merged into a plain model folder")

    def __post_init__(self) -> None:
        self._check_choices()
        resolve_template(self.eval_template)
        losses = self.loss_types
        for loss in losses:
            _check_choice("loss_type", loss, LOSS_TYPES)
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise ValueError(f"loss_weights needs one weight per loss_type ({', '.join(losses)}), "
                             f"got {list(self.loss_weights)}")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise ValueError(f"ld_alpha must be in [0, 1], got {self.ld_alpha!r}")
        _check_positive("dpop_lambda", self.dpop_lambda, allow_zero=True)
        if self.dpop_lambda and ("sigmoid" not in losses or not self.precompute_ref_log_probs
                                 or self.ld_alpha is not None):
            raise ValueError("dpop_lambda works on the sigmoid loss with precompute_ref_log_probs and no ld_alpha")
        for name in ("beta", "learning_rate", "epochs", "lora_alpha", "lora_r", "batch_size",
                     "gradient_accumulation_steps", "max_length", "logging_steps"):
            _check_positive(name, getattr(self, name))
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.effective_batch_size is not None:
            _check_positive("effective_batch_size", self.effective_batch_size)
        _check_positive("eval_every", self.eval_every, allow_zero=True)
        if self.eval_every and not self.eval_senteval_dir:
            raise ValueError("eval_every needs eval_senteval_dir (the SentEval folder with STS-B)")
        if self.eval_sts_genre_mix not in (None, "train", "dev", "test"):
            raise ValueError(f"eval_sts_genre_mix must be train, dev, test or None, got {self.eval_sts_genre_mix!r}")
        for name in ("eval_sts_pairs", "eval_texts"):
            _check_positive(name, getattr(self, name))
        _check_positive("eval_paraphrases", self.eval_paraphrases, allow_zero=True)
        _check_positive("eval_text_offset", self.eval_text_offset, allow_zero=True)
        if any(not 0 <= s <= 2 for s in self.select_scales):
            raise ValueError(f"select_scales must lie in [0, 2], got {list(self.select_scales)}")
        _check_positive("select_scale_margin", self.select_scale_margin, allow_zero=True)
        if self.select_scales and not self.eval_every:
            raise ValueError("select_scales needs eval_every (the probes that judge each scale)")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be -1 or > 0, got {self.max_steps!r}")

    @property
    def loss_types(self) -> tuple[str, ...]:
        """``loss_type`` split at commas."""
        return tuple(t.strip() for t in self.loss_type.split(",") if t.strip())

    @classmethod
    def preset(cls, name: str) -> TrainConfig:
        """``paper``: LoRA r8/a32 all-linear, lr 1e-4, beta 0.1, effective batch 256, bf16, max_length 1024.
        ``cpu``: the same recipe with batch 8, max_length 128, bf16 only where the CPU has bf16 units, reference
        log-probs precomputed and cached, and the shared-prompt forward."""
        presets = {
            "cpu": cls(),
            "paper": cls(batch_size=8, effective_batch_size=256, max_length=1024, bf16=True,
                         precompute_ref_log_probs=False, gradient_checkpointing=True, logging_steps=10),
            "default": cls(),
        }
        if name not in presets:
            raise ValueError(f"unknown train preset {name!r}; known: {', '.join(presets)}")
        return presets[name]


EMBEDDINGS = ("auto", "prompteol", "sentence-transformers")
SPLITS = ("test", "dev")
STS_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE_MODES = ("none", "int8")
ENCODER_BACKENDS = ("transformers", "vllm")


@dataclasses.dataclass(frozen=True)
class EmbedConfig(StageConfig):
    """How sentences are turned into vectors: encoder type, precision, batching, layer."""

    embedding: str = option("auto", "auto: sentence-transformers folder → its own pooling, causal LM → PromptEOL",
                            choices=EMBEDDINGS)
    dtype: str = option("auto", "weights dtype for PromptEOL (auto: bfloat16 when the CPU/GPU supports it, "
                        "else float32)", choices=DTYPES)
    batch_size: int = option(64, "sentences per forward pass (sorted by length, so little padding)")
    layer: int = option(-1, "hidden layer to read the last token from (-1: final layer, after the norm)")
    device: str = option("auto", "auto picks cuda when available", choices=DEVICES)
    backend: str = option("transformers", "PromptEOL engine: transformers (this process) or vllm (vLLM's pooling "
                          "runner on a merged model folder, last-token pooling; final layer only)",
                          choices=ENCODER_BACKENDS)
    quantize: str = option("none", "int8: PromptEOL with SmoothQuant-style smoothing and int8 q/k/v, o and "
                           "gate/up projections (one activation scale per token; 7-bit weights on CPUs without "
                           "VNNI/AMX), from fp32 weights (CPU, transformers backend): on SmolLM2 4.1x the plain fp32 "
                           "loop at -0.27 STS-B dev Spearman on Zen 4, 3.5x at -0.15 capped to AVX2 (README, "
                           "embedding benchmark); none: as dtype says", choices=QUANTIZE_MODES)

    def __post_init__(self) -> None:
        self._check_choices()
        _check_positive("batch_size", self.batch_size)
        if self.quantize != "none" and self.backend != "transformers":
            raise ValueError(f"quantize={self.quantize!r} applies to the transformers backend")
        if self.backend == "vllm" and self.layer != -1:
            raise ValueError(f"backend 'vllm' pools the final layer only; got layer={self.layer}")


@dataclasses.dataclass(frozen=True)
class CorpusConfig(StageConfig):
    """Embedding a corpus (``sempa embed``, the plan's embed stage): the file, its text column, normalisation,
    shard size."""

    source: str | None = option(None, "corpus file to embed: .txt (one text a line), .jsonl, .csv or .parquet; the "
                                "plan's embed stage runs only when it is set")
    column: str | None = option(None, "column with the text in a .jsonl/.csv/.parquet source (default: 'text', "
                                "or the only string column); ignored for .txt (one text a line)")
    normalize: bool = option(False, "L2-normalise the vectors (cosine similarity becomes a dot product)")
    shard_size: int = option(1024, "distinct texts per shard (a crash loses at most one shard's work)")

    def __post_init__(self) -> None:
        _check_positive("shard_size", self.shard_size)


@dataclasses.dataclass(frozen=True)
class EvalConfig(StageConfig):
    """STS evaluation: which tasks, which split, where the data is."""

    tasks: tuple[str, ...] = option(STS_TASKS, "comma-separated STS tasks")
    split: str = option("test", "STSBenchmark/SICKRelatedness split (dev reads sts-dev.csv / SICK_trial.txt)",
                        choices=SPLITS)
    senteval_dir: str | None = option(None, "SentEval data folder (data/downstream layout); "
                                      "unset: load the MTEB copies from the Hugging Face Hub")
    cache_base: bool = option(True, "reuse the untuned model's STS and retention results from $SEMPA_CACHE_DIR/results "
                              "(keyed by model weights, tasks, split, embedding/retention config and data content)")
    adapter_scale: float = option(1.0, "evaluate the adapter with its LoRA update scaled by this factor (1: as "
                                  "trained): sweeping it maps the embedding/generation trade-off without training")

    def __post_init__(self) -> None:
        self._check_choices()
        if not 0 <= self.adapter_scale <= 2:
            raise ValueError(f"adapter_scale must lie in [0, 2], got {self.adapter_scale!r}")
        if not self.tasks:
            raise ValueError("tasks must name at least one STS task")
        for task in self.tasks:
            _check_choice("task", task, STS_TASKS)


BACKENDS = ("auto", "vllm", "transformers")


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """How a backend decodes: what ``GenerationBackend.generate`` needs, and nothing about models or shards."""

    n: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_tokens: int = 64
    stop_at_newline: bool = False
    batch_size: int = 16  # prompts per generate call (transformers)


@dataclasses.dataclass(frozen=True)
class SampleConfig(StageConfig):
    """On-policy paraphrase candidates: n samples per premise from the policy model.

    Model and prompt: ``model``, ``template``, ``chat_template``. Sampling: ``n``, ``temperature``,
    ``top_p``, ``max_tokens``, ``stop_at_newline``, ``seed``. Work split: ``shard_size`` (premises per
    resumable shard), ``max_premises``. Backend: ``backend``, ``batch_size`` and ``dtype``/``device`` (transformers),
    ``gpu_memory_utilization``, ``max_model_len``, ``tensor_parallel_size`` (vLLM).
    """

    model: str = option("smollm2-135m-instruct", "policy model: built-in name, local folder, or Hub id")
    backend: str = option("auto", "generation backend (auto: vllm when installed, else transformers)",
                          choices=BACKENDS)
    template: str = option("P1", "paraphrase template: P1-P5 or a custom text with {sentence}")
    chat_template: str = option("auto", "wrap the prompt in the tokenizer's chat template (auto: when it has one)",
                                choices=CHAT_MODES)
    n: int = option(4, "candidates per premise")
    temperature: float = option(1.0, "sampling temperature (0: greedy)")
    top_p: float = option(0.95, "nucleus sampling mass")
    max_tokens: int = option(64, "max new tokens per candidate")
    stop_at_newline: bool = option(False, "end a candidate at its first newline (a paraphrase is one line; what "
                                   "follows is usually an explanation) instead of letting it run to max_tokens")
    seed: int = option(0, "base seed; each premise gets its own seed derived from it")
    shard_size: int = option(64, "premises per shard (the unit of resumption)")
    max_premises: int | None = option(None, "sample only the first N premises of the triples table")
    batch_size: int = option(16, "prompts per generate call (transformers backend)")
    dtype: str = option("auto", "weights dtype (auto: bfloat16 where supported, else float32)", choices=DTYPES)
    device: str = option("auto", "transformers backend device (vLLM picks its own)", choices=DEVICES)
    gpu_memory_utilization: float = option(0.85, "vLLM: fraction of GPU memory for weights + KV cache")
    max_model_len: int = option(1024, "max tokens of prompt + completion: a premise whose prompt leaves less than "
                                "max_tokens is skipped and counted (skipped_prompt_too_long), never a failed shard")
    tensor_parallel_size: int = option(1, "vLLM: GPUs per engine (tensor parallel)")
    data_parallel_size: int = option(1, "vLLM: engine replicas inside one sampling job (data parallel)")
    max_num_seqs: int | None = option(None, "vLLM: sequences decoded together (None: vLLM's default)")

    def __post_init__(self) -> None:
        self._check_choices()
        resolve_template(self.template)
        for name in ("n", "max_tokens", "shard_size", "batch_size", "max_model_len", "tensor_parallel_size",
                     "data_parallel_size"):
            _check_positive(name, getattr(self, name))
        _check_positive("temperature", self.temperature, allow_zero=True)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.max_premises is not None:
            _check_positive("max_premises", self.max_premises)
        if self.max_num_seqs is not None:
            _check_positive("max_num_seqs", self.max_num_seqs)

    @property
    def generation(self) -> GenerationParams:
        """The decoding part of this config."""
        return GenerationParams(n=self.n, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                                stop_at_newline=self.stop_at_newline, batch_size=self.batch_size)


STRATEGIES = ("gold", "sampled", "hybrid")
SCORERS = ("embedding", "policy", "nli")
REJECTED = ("contradiction", "worst")


@dataclasses.dataclass(frozen=True)
class RankConfig(StageConfig):
    """Preference triples from NLI triples and ranked candidates.

    Strategy: ``strategy``, ``rejected``, ``hybrid_fraction``, ``template``, ``seed``. Scorer:
    ``scorer``, ``scorer_model``. Filters: ``min_length_ratio``, ``max_length_ratio``,
    ``drop_truncated``, ``min_margin``, ``contamination_dir`` + ``contamination_tasks``. Absolute checks
    of sampled candidates (``sempa_train.stages.quality``): ``drop_meta_answers``, ``language``,
    ``drop_unknown_words``, ``drop_number_changes``, ``drop_repetitions``, ``drop_swapped_roles``,
    ``min_fluency`` (with the policy's ``model`` and ``chat_template``), ``judge`` + ``min_entailment``,
    ``min_chosen_score``.
    """

    strategy: str = option("sampled", "gold: the paper's NLI pairs; sampled: best candidate as chosen; "
                           "hybrid: a seeded hybrid_fraction of premises sampled, the rest gold", choices=STRATEGIES)
    scorer: str = option("embedding", "embedding: sentence-transformers similarity; policy: the policy's own "
                         "PromptEOL similarity; nli: entailment probability of a cross-encoder", choices=SCORERS)
    scorer_model: str | None = option(None, "scorer model (default: all-minilm-l6-v2 for embedding, "
                                      "smollm2-135m-instruct for policy; required for nli)")
    rejected: str = option("contradiction", "rejected side of a sampled pair: the NLI contradiction "
                           "or the worst-scored candidate", choices=REJECTED)
    hybrid_fraction: float = option(0.5, "hybrid: fraction of premises that use the sampled pair")
    template: str = option("P1", "paraphrase template of the prompt: P1-P5 or a custom text with {sentence}")
    gold_template: str | None = option(None, "template of the gold pairs' prompts (None: template); e.g. an "
                                       "entailment instruction for gold rows while sampled rows keep the "
                                       "paraphrase template")
    min_length_ratio: float = option(0.5, "drop candidates shorter than this x the premise (in words)")
    max_length_ratio: float = option(2.0, "drop candidates longer than this x the premise (in words)")
    drop_truncated: bool = option(True, "drop candidates that hit max_tokens")
    min_margin: float | None = option(None, "drop pairs whose chosen - rejected score is below this")
    contamination_dir: str | None = option(None, "SentEval data folder: drop pairs with a sentence of the "
                                           "contamination_tasks (all splits present)")
    contamination_tasks: tuple[str, ...] = option(("STSBenchmark", "SICKRelatedness"),
                                                  "STS tasks checked for contamination")
    seed: int = option(0, "seed of the hybrid split")
    drop_meta_answers: bool = option(False, "drop sampled candidates that answer about the sentence instead of "
                                     "restating it: a meta opening ('The sentence is', 'Rearrange', 'Sure'), or "
                                     "quotation marks or a colon the premise lacks")
    language: str | None = option(None, "drop sampled candidates that py3langid confidently labels another "
                                  "language (>= 0.6) or that are more than 5 percent non-Latin letters, e.g. en; "
                                  "None: no check")
    drop_unknown_words: bool = option(False, "drop sampled candidates with a word the premise lacks that "
                                      "wordfreq's word list of the language (en unless set) does not know: a "
                                      "misspelt, merged or garbled word")
    drop_number_changes: bool = option(False, "drop sampled candidates with a number (digits or a number word) "
                                       "more often than their premise has it ('Three people' became 'Two'), or "
                                       "with a premise word made singular or plural ('hands' became 'hand')")
    drop_repetitions: bool = option(False, "drop sampled candidates that say a three-word phrase at least twice and "
                                    "more often than their premise: a sentence repeated inside itself or made a "
                                    "definition ('A family day at the beach is a family day')")
    drop_swapped_roles: bool = option(False, "drop sampled candidates in which two person words of the premise come "
                                      "in the opposite order ('the woman adjusts the man's flower' became 'the man "
                                      "adjusts the woman's flower'); a candidate with a new 'by' (a passive) is kept, "
                                      "and so is one that joins the two by 'and'/'or' as the premise does")
    min_fluency: float | None = option(None, "drop sampled candidates whose mean token log-prob under the policy, "
                                       "as its answer to the paraphrase prompt, is below this (-3.0 drops word "
                                       "salad: 1 percent of SmolLM2's own candidates are below -2.41); None: no check")
    min_chosen_score: float | None = option(None, "drop a sampled pair whose chosen candidate scores below this "
                                            "(0.5 for the embedding scorer: meta-answers score <= 0.06, 95 percent of "
                                            "chosen candidates >= 0.67); None: no floor")
    judge: str | None = option(None, "NLI judge (sempa-nli-minilm, built by `sempa judge build`, or a folder): "
                               "drop sampled candidates it does not find entailed by the premise and entailing it; "
                               "None: no check")
    min_entailment: float = option(0.5, "the judge's entailment probability a candidate needs in each direction")
    model: str = option("smollm2-135m-instruct", "the policy (set by the policy section): the fluency check's model")
    chat_template: str = option("auto", "the policy's chat template mode (set by the policy section)",
                                choices=CHAT_MODES)

    def __post_init__(self) -> None:
        self._check_choices()
        resolve_template(self.template)
        if self.gold_template is not None:
            resolve_template(self.gold_template)
        if not 0 <= self.hybrid_fraction <= 1:
            raise ValueError(f"hybrid_fraction must be in [0, 1], got {self.hybrid_fraction!r}")
        if not 0 <= self.min_length_ratio <= self.max_length_ratio:
            raise ValueError(f"need 0 <= min_length_ratio <= max_length_ratio, got "
                             f"{self.min_length_ratio!r} and {self.max_length_ratio!r}")
        if self.scorer == "nli" and not self.scorer_model:
            raise ValueError("scorer 'nli' needs scorer_model (a cross-encoder with an entailment label)")
        for task in self.contamination_tasks:
            _check_choice("contamination task", task, STS_TASKS)


@dataclasses.dataclass(frozen=True)
class RetentionConfig(StageConfig):
    """Generation-retention probes run on the base and the tuned model with the same inputs."""

    text_file: str = option("data/heldout_text.txt", "held-out text: a .txt file (one passage a line) or an NLI "
                            ".jsonl (its premises), e.g. ../shared/data/nli/snli/test.jsonl")
    max_texts: int = option(300, "texts used for perplexity (the first N distinct ones)")
    max_length: int = option(128, "tokens per text for perplexity")
    paraphrases: int = option(40, "sentences paraphrased greedily for the paraphrase probe (0: skip)")
    template: str = option("P1", "paraphrase template of the paraphrase probe: a fixed yardstick, so that models "
                           "trained with different prompts are compared on the same one")
    chat_template: str = option("auto", "chat template for the paraphrase probe (auto: when the tokenizer has one)",
                                choices=CHAT_MODES)
    dtype: str = option("float32", "weights dtype for the probes", choices=DTYPES)
    device: str = option("auto", "auto picks cuda when available", choices=DEVICES)
    lm_eval_tasks: tuple[str, ...] = option((), "lm-evaluation-harness tasks (e.g. hellaswag,truthfulqa_mc1); "
                                            "run only when lm-eval is installed and its data reachable")
    lm_eval_limit: int | None = option(None, "examples per lm-eval task (None: all)")

    def __post_init__(self) -> None:
        self._check_choices()
        for name in ("max_texts", "max_length"):
            _check_positive(name, getattr(self, name))
        _check_positive("paraphrases", self.paraphrases, allow_zero=True)
        resolve_template(self.template)


@dataclasses.dataclass(frozen=True)
class GateConfig(StageConfig):
    """Quality gates: the evaluation fails when a tuned model crosses one (None: gate off)."""

    min_sts_delta: float | None = option(None, "tuned avg STS minus base avg STS must be at least this (e.g. 0.0)")
    max_perplexity_ratio: float | None = option(None, "tuned / base perplexity must be at most this (e.g. 1.05)")
    min_paraphrase_similarity_delta: float | None = option(
        None, "tuned minus base paraphrase similarity to the source must be at least this (e.g. -0.02)")

    def __post_init__(self) -> None:
        if self.max_perplexity_ratio is not None:
            _check_positive("max_perplexity_ratio", self.max_perplexity_ratio)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP addresses (where only this machine's users connect)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class ClusterConfig(StageConfig):
    """Where the sample stage runs its shards: this process (default) or a Dask cluster.

    ``address`` names a running Dask scheduler (``tls://host:8786``); ``local_workers`` > 0 starts a
    local cluster of that many worker processes on 127.0.0.1 instead. ``resources`` are what each shard
    job needs from a worker (``GPU=1`` for one engine per GPU; start workers with ``--resources GPU=1``).

    Dask sends pickled functions: whoever reaches a scheduler runs code on its workers. A ``tls://``
    address uses the certificates named here (``tls_ca_file``, ``tls_cert``, ``tls_key``: the client's,
    signed by the cluster's CA; ``docs/SECURITY.md``); a plain ``tcp://`` address is accepted only on
    the loopback interface unless ``insecure`` says otherwise.
    """

    address: str | None = option(None, "Dask scheduler address (tls://host:port, or tcp:// on loopback); None: no "
                                 "cluster")
    local_workers: int = option(0, "start a local Dask cluster with this many worker processes (0: none)")
    threads_per_worker: int = option(1, "threads per local worker process")
    resources: str = option("", "resources each shard job needs, e.g. GPU=1 (comma-separated NAME=AMOUNT)")
    tls_ca_file: str | None = option(None, "CA certificate (PEM) the scheduler's certificate is signed by")
    tls_cert: str | None = option(None, "this client's certificate (PEM), signed by the cluster's CA")
    tls_key: str | None = option(None, "this client's private key (PEM)")
    insecure: bool = option(False, "allow a plain tcp:// scheduler on a non-loopback address: anyone who can "
                            "reach it can run code on the workers")

    def __post_init__(self) -> None:
        _check_positive("local_workers", self.local_workers, allow_zero=True)
        _check_positive("threads_per_worker", self.threads_per_worker)
        if self.address and self.local_workers:
            raise ValueError("give either address (an existing cluster) or local_workers (a new one), not both")
        self.resource_map()
        tls = (self.tls_ca_file, self.tls_cert, self.tls_key)
        if any(tls) and not all(tls):
            raise ValueError("TLS needs all of tls_ca_file, tls_cert and tls_key")
        if self.address:
            scheme, _, rest = self.address.partition("://") if "://" in self.address else ("tcp", "", self.address)
            host = rest.rsplit(":", 1)[0].strip("[]")
            if scheme == "tls" and not all(tls):
                raise ValueError(f"cluster address {self.address} is TLS: give tls_ca_file, tls_cert and tls_key")
            if scheme != "tls" and not is_loopback(host) and not self.insecure:
                raise ValueError(f"cluster address {self.address} is a plain connection to a non-loopback host: "
                                 "anyone who can reach it can run code on the workers. Use tls:// with "
                                 "certificates (docs/SECURITY.md), or set cluster.insecure: true on a network "
                                 "you trust")

    @property
    def security(self) -> Any:
        """The ``distributed.Security`` of a TLS cluster (None for plain connections)."""
        if not self.tls_ca_file:
            return None
        from distributed import Security

        return Security(tls_ca_file=self.tls_ca_file, tls_client_cert=self.tls_cert, tls_client_key=self.tls_key,
                        require_encryption=True)

    @property
    def enabled(self) -> bool:
        return bool(self.address or self.local_workers)

    def resource_map(self) -> dict[str, float]:
        """``"GPU=1,MEM=2"`` → ``{"GPU": 1.0, "MEM": 2.0}``."""
        out = {}
        for item in filter(None, (p.strip() for p in self.resources.split(","))):
            name, _, amount = item.partition("=")
            try:
                out[name.strip()] = float(amount)
            except ValueError:
                raise ValueError(f"resources must look like GPU=1,MEM=2, got {self.resources!r}") from None
        return out
