"""A faster TRL ``DPOTrainer`` for CPUs: the prompt computed once per pair, log-probs only where needed,
reference log-probs cached between runs. The loss is TRL's own; only how the model is run changes.

Why: in a SemPA triple the prompt (chat template + paraphrase template + premise) is about 80 % of
each sequence, and TRL runs it twice (``[prompt+chosen; prompt+rejected]``). On a CPU TRL's fused LM
head also projects *every* position onto the 49k-word vocabulary, prompt included.

``SharedPromptDPOTrainer`` keeps everything of ``DPOTrainer`` (data preparation, collator, every
``loss_type``, metrics, logging) and replaces the policy forward that ``_compute_loss`` calls:

* **one packed sequence per pair**, ``prompt | chosen | rejected``, with a 4-D attention mask in which
  rejected tokens see the prompt but not the chosen answer, and position ids that restart after the
  prompt for the rejected answer — the same attention each token gets in TRL's two sequences;
* **the tokens every pair of the batch starts with once** (SmolLM2's system turn and the start of the
  instruction: 33 tokens, about 40 % of a packed pair): their keys and values are computed for one row
  and handed to all rows as a cache, gradients included (LoRA dropout on them is then one draw per
  batch, as it is one draw per pair for the prompt);
* **the LM head over completion positions only** (the last prompt token predicts the first token of
  both answers);
* it returns the tensors TRL's fused head returns (``log_probs``, ``entropy``, ``mean_logits``, …),
  laid out on TRL's ``[chosen; rejected]`` rows, so the rest of ``_compute_loss`` runs unchanged.
  A batch that does not have that layout (prompts that differ, an MoE model, pre-shifted labels) goes
  through TRL's own forward.

Reference log-probs are computed once per pair, in one of two places (``ref_pass``):

* ``in_batch``: in the first training step that sees the pair, in that step's batch, just before the policy
  forward, and kept by row for later epochs. At the first step policy and reference are then the same model
  run on the same batch, so the loss is log 2 to the last bit whatever the precision;
* ``by_length``: TRL's pass before training, over the pairs shortest first (less padding than a training
  batch), returned in row order. In bf16 it rounds differently from the training batch, which moves the first
  loss by ~2e-3 (``tests/benchmarks/first_step_loss.py``); in fp32 the two agree within 1e-6.

``auto`` (the default) takes ``in_batch`` under bf16/fp16 autocast and ``by_length`` in fp32 and whenever
several processes train (each sees only its own batches).

With ``ref_cache_dir`` the reference log-probs are stored under a key of (reference model hash, tokenized data,
max length, precision, pass), so a second run on the same data skips computing them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from trl import DPOTrainer

from sempa_train.core.config import REF_PASSES
from sempa_train.core.io import write_parquet
from sempa_train.core.result_cache import result_key
from sempa_train.stages.embedding import common_prefix
from sempa_train.stages.fp32_attention import NAME as FP32_SDPA

log = logging.getLogger(__name__)

REF_LOGPS_SCHEMA = pl.Schema({"ref_chosen_logps": pl.Float32, "ref_rejected_logps": pl.Float32})
REF_ROW = "ref_row"  # the pair's row in the training set, so in-batch reference log-probs are kept by row
MASKS_BY_IMPLEMENTATION = {"sdpa": torch.bool, FP32_SDPA: torch.bool, "eager": torch.float32}


@dataclass(frozen=True)
class PackedPairs:
    """``B`` preference pairs packed as ``prompt | chosen | rejected``, and where each log-prob comes from.

    ``source_row``/``source_pos`` index the packed hidden states whose next token is ``target``, in the
    row-major order of TRL's completion mask over ``[chosen rows; rejected rows]``.
    """

    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, 1, T, T), True where a query may attend to a key
    source_row: torch.Tensor  # (N,)
    source_pos: torch.Tensor  # (N,)
    target: torch.Tensor  # (N,)


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> PackedPairs | None:
    """Pack TRL's collated ``[prompt+chosen; prompt+rejected]`` batch (right padded) into one row per pair.

    Returns None when row ``i`` and row ``B + i`` do not start with the same prompt.
    """
    rows = input_ids.size(0)
    if rows % 2:
        return None
    half = rows // 2
    lengths = attention_mask.sum(dim=1).tolist()
    completion = (labels != -100) & attention_mask.bool()
    has_completion = completion.any(dim=1).tolist()
    first = completion.int().argmax(dim=1).tolist()
    prompt_len = [first[r] if has_completion[r] else lengths[r] for r in range(rows)]
    sequences, segments, positions = [], [], []
    source_row: list[int] = []
    source_pos: list[int] = []
    target: list[int] = []
    for i in range(half):
        p, j = prompt_len[i], half + i
        if prompt_len[j] != p or not torch.equal(input_ids[i, :p], input_ids[j, :p]):
            return None
        chosen, rejected = input_ids[i, p : lengths[i]], input_ids[j, p : lengths[j]]
        c, r = len(chosen), len(rejected)
        sequences.append(torch.cat([input_ids[i, :p], chosen, rejected]))
        segments.append([0] * p + [1] * c + [2] * r)
        positions.append(list(range(p + c)) + list(range(p, p + r)))
        # chosen token k is predicted at packed position p-1+k (the last prompt token for k = 0)
        source_row += [i] * c
        source_pos += [p - 1 + k for k in range(c)]
        target += chosen.tolist()
    for i in range(half):
        p, c = prompt_len[i], lengths[i] - prompt_len[i]
        rejected = input_ids[half + i, p : lengths[half + i]]
        # rejected token k is predicted by the last prompt token (k = 0) or by rejected token k-1
        source_row += [i] * len(rejected)
        source_pos += [p - 1 if k == 0 else p + c + k - 1 for k in range(len(rejected))]
        target += rejected.tolist()
    width = max(len(s) for s in sequences)
    device = input_ids.device
    packed = torch.zeros(half, width, dtype=input_ids.dtype, device=device)
    segment = torch.full((half, width), -1, dtype=torch.long, device=device)
    position = torch.zeros(half, width, dtype=torch.long, device=device)
    for i, (seq, seg, pos) in enumerate(zip(sequences, segments, positions, strict=True)):
        packed[i, : len(seq)] = seq
        segment[i, : len(seq)] = torch.tensor(seg, device=device)
        position[i, : len(seq)] = torch.tensor(pos, device=device)
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    mask = causal & (key >= 0) & ~((query == 2) & (key == 1))
    mask |= torch.eye(width, dtype=torch.bool, device=device)  # no all-masked row (NaN in softmax)
    return PackedPairs(
        input_ids=packed, position_ids=position, attention_mask=mask.unsqueeze(1),
        source_row=torch.tensor(source_row, dtype=torch.long, device=device),
        source_pos=torch.tensor(source_pos, dtype=torch.long, device=device),
        target=torch.tensor(target, dtype=torch.long, device=device),
    )


def common_prefix_length(packed: PackedPairs) -> int:
    """How many leading tokens all rows share and no log-prob is read from (0 for a single row): those
    tokens' hidden states, keys and values are the same in every row, so they need computing only once."""
    if packed.input_ids.size(0) < 2:
        return 0
    return min(len(common_prefix(packed.input_ids.tolist())), int(packed.source_pos.min()))


def head_logits(hidden: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    """``lm_head(hidden)``, with a frozen head's weight cast to autocast's dtype once rather than at every call.

    Autocast keeps its casts only of weights that require grad, so a frozen vocabulary projection (SmolLM2's is
    49,152 × 576, tied to the embeddings) was copied into bf16 again at every forward: about 80 ms, twice a step,
    on 2 CPU cores. The copy is the same rounding autocast makes, so the logits are the same to the bit; it is
    made again when the weight changes (its storage or version).
    """
    weight = lm_head.weight if isinstance(lm_head, torch.nn.Linear) else None
    device = hidden.device.type
    if weight is None or weight.requires_grad or not torch.is_autocast_enabled(device):
        return lm_head(hidden)
    dtype = torch.get_autocast_dtype(device)
    key = (weight.data_ptr(), weight._version, dtype)
    cached = getattr(lm_head, "_sempa_autocast_weight", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype))
        lm_head._sempa_autocast_weight = cached
    bias = None if lm_head.bias is None else lm_head.bias.to(dtype)
    return torch.nn.functional.linear(hidden.to(dtype), cached[1], bias)


def completion_token_stats(hidden: torch.Tensor, lm_head: torch.nn.Module, target: torch.Tensor,
                           outputs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Per-token log-prob of ``target`` (with gradient) and the metric fields TRL's fused head can return."""
    logits = head_logits(hidden, lm_head).float()
    lse = torch.logsumexp(logits, dim=-1)
    stats = {"log_probs": logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - lse}
    with torch.no_grad():
        if "entropy" in outputs:
            stats["entropy"] = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        if "mean_logits" in outputs:
            stats["mean_logits"] = logits.mean(-1)
        if "is_top1" in outputs:
            stats["is_top1"] = logits.argmax(-1) == target
    if "log_sum_sq_probs" in outputs:
        stats["log_sum_sq_probs"] = torch.logsumexp(2 * (logits - lse.unsqueeze(-1)), dim=-1)
    return stats


def shared_prompt_forward(model: Any, packed: PackedPairs, label_mask: torch.Tensor,
                          outputs: tuple[str, ...]) -> Any:
    """Run the packed pairs through ``model``'s backbone and return TRL's ``FusedCausalLMOutput`` for the batch.

    ``label_mask`` is TRL's shifted completion mask over the ``[chosen; rejected]`` rows.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    mask = packed.attention_mask
    dtype = MASKS_BY_IMPLEMENTATION[model.config._attn_implementation]
    if dtype is not torch.bool:  # eager attention adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    backbone, shared = model.base_model, common_prefix_length(packed)
    if model.is_gradient_checkpointing and torch.is_grad_enabled():
        shared = 0  # a checkpointed layer re-runs its forward, and would append to the cache twice
    cache = None
    if shared:
        # The tokens every row starts with (chat template, instruction) once, their keys/values given to every row
        cache = backbone(input_ids=packed.input_ids[:1, :shared], position_ids=packed.position_ids[:1, :shared],
                         use_cache=True).past_key_values
        cache.batch_repeat_interleave(packed.input_ids.size(0))
    hidden = backbone(input_ids=packed.input_ids[:, shared:], attention_mask=mask[:, :, shared:],
                      position_ids=packed.position_ids[:, shared:], past_key_values=cache,
                      use_cache=False).last_hidden_state
    stats = completion_token_stats(hidden[packed.source_row, packed.source_pos - shared],
                                   model.get_output_embeddings(), packed.target, outputs)
    per_token = {name: value.new_zeros(label_mask.shape).masked_scatter(label_mask, value)
                 for name, value in stats.items()}
    loss = -stats["log_probs"].sum() / label_mask.sum().clamp(min=1)
    return FusedCausalLMOutput(loss=loss, label_mask=label_mask, **per_token)


def install_forward(model: Any, outputs: tuple[str, ...], *, share_prompt: bool,
                    on_policy_output: Callable[[Any], None] | None = None) -> None:
    """Wrap ``model.forward`` (already patched by TRL's fused head): with ``share_prompt`` DPO batches go through
    ``shared_prompt_forward``; ``on_policy_output`` sees every output computed with gradients (the policy pass)."""
    if getattr(model, "_sempa_forward", False):
        return
    if share_prompt and model.config._attn_implementation not in MASKS_BY_IMPLEMENTATION:
        log.warning("train: shared-prompt forward needs sdpa (in fp32 too) or eager attention, not %s; using TRL's",
                    model.config._attn_implementation)
        share_prompt = False
    fused_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, **kwargs: Any) -> Any:
        packed = None
        if share_prompt and fused_lm_head and labels is not None and not args \
                and kwargs.get("shift_labels") is None and not kwargs.get("output_router_logits") \
                and kwargs.get("attention_mask") is not None:
            packed = pack_pairs(kwargs["input_ids"], kwargs["attention_mask"], labels)
        if packed is None:
            output = fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        else:
            output = shared_prompt_forward(self, packed, labels[:, 1:] != -100, outputs)
        if fused_lm_head and on_policy_output is not None and torch.is_grad_enabled():
            on_policy_output(output)
        return output

    model.forward = types.MethodType(forward, model)
    model._sempa_forward = True


class SharedPromptDPOTrainer(DPOTrainer):
    """``DPOTrainer`` with the shared-prompt forward, an on-disk cache of reference log-probs, and DPO-Positive.

    ``share_prompt=False`` keeps TRL's forward (for comparison); ``ref_pass`` says where the precomputed
    reference log-probs are computed (module docstring); ``ref_cache_dir=None`` disables their cache.
    ``dpop_lambda`` > 0 turns TRL's sigmoid term into Smaug's DPO-Positive loss
    ``-log σ(β(Δ - λ·max(0, ref_chosen - policy_chosen)))``, which stops DPO from lowering the chosen answer's
    likelihood below the reference's (it needs precomputed reference log-probs).
    """

    def __init__(self, *args: Any, share_prompt: bool = True, ref_pass: str = "auto",
                 ref_cache_dir: Path | None = None, dpop_lambda: float = 0.0, **kwargs: Any) -> None:
        if ref_pass not in REF_PASSES:
            raise ValueError(f"ref_pass must be one of {', '.join(REF_PASSES)}, got {ref_pass!r}")
        # Set before super().__init__, which precomputes the reference log-probs through our override.
        self.share_prompt = share_prompt
        self.ref_pass = ref_pass
        self.ref_cache_dir = Path(ref_cache_dir) if ref_cache_dir else None
        self.ref_cache_hit: bool | None = None
        self.ref_pass_used: str | None = None  # the training set's pass, once resolved
        self.dpop_lambda = dpop_lambda
        self._policy_output: Any = None
        self._ref_store: torch.Tensor | None = None  # (rows, 2) chosen/rejected, NaN until computed (in_batch)
        self._ref_store_path: Path | None = None
        self._ref_store_new = False
        super().__init__(*args, **kwargs)
        if dpop_lambda and not (self.precompute_ref_logps and "sigmoid" in self.loss_types):
            raise ValueError("dpop_lambda needs precompute_ref_log_probs and the sigmoid loss")
        self.data_collator = _with_rows(self.data_collator)
        self._install_forward()

    def _install_forward(self) -> None:
        outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
        if self.use_weighting:
            outputs += ("log_sum_sq_probs",)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        install_forward(base, outputs, share_prompt=self.share_prompt, on_policy_output=self._remember)

    def _remember(self, output: Any) -> None:
        self._policy_output = output

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        self._policy_output = None
        rows = inputs.pop(REF_ROW, None)
        if rows is not None:
            self._fill_ref_logps(model, inputs, rows)
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self.dpop_lambda or self._policy_output is None:  # evaluation runs without gradients
            return result
        loss = result[0] if return_outputs else result
        logps = (self._policy_output.log_probs * self._policy_output.label_mask).sum(dim=1)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        delta = (chosen - ref_chosen) - (rejected - ref_rejected)
        shortfall = torch.relu(ref_chosen - chosen)
        weight = self.loss_weights[self.loss_types.index("sigmoid")]
        dpo = -torch.nn.functional.logsigmoid(self.beta * delta).mean()
        dpop = -torch.nn.functional.logsigmoid(self.beta * (delta - self.dpop_lambda * shortfall)).mean()
        loss = loss + weight * (dpop - dpo)  # TRL's sigmoid term replaced by the DPO-Positive one
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["dpop/shortfall"].append(self.accelerator.gather_for_metrics(shortfall).mean().item())
        return (loss, result[1]) if return_outputs else loss

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        self._install_forward()
        in_batch = self._ref_in_batch(name)
        ref_pass = "in_batch" if in_batch else "by_length"
        if name == "train":
            self.ref_pass_used = ref_pass
        key = self._ref_cache_key(dataset, ref_pass)
        path = self.ref_cache_dir / f"{key}.parquet" if self.ref_cache_dir else None
        cached = self._read_ref_cache(path, len(dataset)) if path else None
        if in_batch:
            self._ref_store = cached if cached is not None else torch.full((len(dataset), 2), float("nan"))
            self._ref_store_path = path
            known = int((~self._ref_store.isnan().any(dim=1)).sum())
            self.ref_cache_hit = None if path is None else cached is not None  # until a row must be computed
            log.info("train: reference log-probs computed in the training batches (%s of %s rows from the cache)",
                     f"{known:,}", f"{len(dataset):,}")
            return dataset.add_column(REF_ROW, list(range(len(dataset))))
        if path is not None:
            self.ref_cache_hit = cached is not None and not bool(cached.isnan().any())
            if self.ref_cache_hit:
                log.info("train: reference log-probs of %s rows from the cache %s", f"{len(dataset):,}", path)
                for column, values in zip(REF_LOGPS_SCHEMA, cached.unbind(1), strict=True):
                    dataset = dataset.add_column(column, values.tolist())
                return dataset
        dataset = self._ref_logps_by_length(dataset, name, batch_size)
        if path is not None and self.accelerator.is_main_process:
            _write_ref_cache(path, torch.tensor([dataset[c] for c in REF_LOGPS_SCHEMA]).T)
        return dataset

    def _ref_in_batch(self, name: str) -> bool:
        """Whether ``name``'s reference log-probs are computed in the training batches (module docstring): only
        the training set, only with one process (it must see every batch), and under ``auto`` only when
        autocast rounds (in fp32 the sorted pass gives the same numbers, with less padding)."""
        if self.ref_pass == "in_batch" and name == "train" and self.accelerator.num_processes > 1:
            log.warning("train: ref_pass in_batch needs one process; %d processes compute the reference log-probs "
                        "by length", self.accelerator.num_processes)
        if name != "train" or self.accelerator.num_processes > 1 or self.ref_pass == "by_length":
            return False
        return self.ref_pass == "in_batch" or self.args.bf16 or self.args.fp16

    def _fill_ref_logps(self, model: Any, inputs: dict[str, Any], rows: torch.Tensor) -> None:
        """Put the batch's reference log-probs into ``inputs``, computing the rows not yet known in this very batch
        (the adapter disabled, no gradients: TRL's ``compute_ref_log_probs``)."""
        rows = rows.cpu()
        known = self._ref_store[rows]
        missing = known.isnan().any(dim=1)
        if missing.any():
            chosen, rejected = self.compute_ref_log_probs(model, inputs)
            computed = torch.stack([chosen, rejected], dim=1).detach().float().cpu()
            self._ref_store[rows[missing]] = computed[missing]
            self._ref_store_new = True
            if self.ref_cache_hit:
                self.ref_cache_hit = False
            known = self._ref_store[rows]
        device = inputs["input_ids"].device
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = (v.to(device) for v in known.unbind(1))

    def train(self, *args: Any, **kwargs: Any) -> Any:
        result = super().train(*args, **kwargs)
        if self._ref_store_new and self._ref_store_path is not None:
            _write_ref_cache(self._ref_store_path, self._ref_store)  # NaN rows: not reached by this run
            self._ref_store_new = False
        return result

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if REF_ROW not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, REF_ROW]

    @staticmethod
    def _read_ref_cache(path: Path, rows: int) -> torch.Tensor | None:
        """The cached (rows, 2) reference log-probs at ``path`` (NaN where not computed yet), or None: also for a
        file that cannot be read as such (damaged, other columns), which is then computed again and replaced."""
        if not path.is_file():
            return None
        try:
            cached = pl.read_parquet(path).select(list(REF_LOGPS_SCHEMA))
        except (OSError, pl.exceptions.PolarsError) as error:
            log.warning("train: ignoring the reference log-prob cache %s, which cannot be read (%s); computing it "
                        "again", path, str(error).splitlines()[0] if str(error) else type(error).__name__)
            return None
        if cached.height != rows:
            log.warning("train: ignoring %s: %d rows for a dataset of %d", path, cached.height, rows)
            return None
        return cached.to_torch(dtype=pl.Float32)

    def _ref_logps_by_length(self, dataset: Any, name: str, batch_size: int) -> Any:
        """TRL's reference pass over the rows shortest first, so each batch is padded to rows of its own length;
        the rows come back in their own order. Each row's log-probs do not depend on its batch-mates."""
        lengths = [len(p) + len(c) + len(r) for p, c, r in
                   zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)]
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        scored = super()._precompute_ref_logps(dataset.select(order).flatten_indices(), name, batch_size)
        restore = [0] * len(order)
        for position, row in enumerate(order):
            restore[row] = position
        return scored.select(restore).flatten_indices()

    def _ref_cache_key(self, dataset: Any, ref_pass: str) -> str:
        """Hash of what the reference log-probs depend on: model weights, tokens, truncation, precision (attention's
        too), forward, and the pass (which batches, so how bf16 rounds)."""
        tokens = hashlib.sha256()
        for row in dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]):
            tokens.update(json.dumps(row).encode())
        return result_key("ref_logps", {
            "model": self._precompute_model_hash, "tokens": tokens.hexdigest(), "max_length": self.args.max_length,
            "truncation_mode": self.args.truncation_mode, "bf16": self.args.bf16, "fp16": self.args.fp16,
            "attention": self.model.config._attn_implementation,
            "ld_alpha": self.ld_alpha, "share_prompt": self.share_prompt, "ref_pass": ref_pass,
        })


def _write_ref_cache(path: Path, values: torch.Tensor) -> None:
    write_parquet(pl.DataFrame(values.numpy(), schema=REF_LOGPS_SCHEMA, orient="row"), path, REF_LOGPS_SCHEMA)


def _with_rows(collator: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """``collator`` that also passes on each example's ``REF_ROW`` (TRL's preference collator drops it)."""
    if getattr(collator, "_sempa_rows", False):
        return collator

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collator(examples)
        if examples and REF_ROW in examples[0]:
            batch[REF_ROW] = torch.tensor([example[REF_ROW] for example in examples])
        return batch

    collate._sempa_rows = True  # type: ignore[attr-defined]
    return collate
