"""Average the updates of several LoRA adapters of one base model into one adapter (a "soup"), exactly.

    python tests/benchmarks/adapter_soup.py outputs/runs/snlisick-seed0/eval/adapter \
        outputs/runs/margin-seed1/eval/adapter outputs/runs/margin-seed2/eval/adapter --out outputs/soup/recipe3

A LoRA update is ``scaling * B @ A`` with ``scaling = lora_alpha / r``. The mean of K updates of rank r is itself
a LoRA update of rank K x r: stack the A matrices, stack the B matrices each divided by K, and keep the scaling
(``lora_alpha`` becomes K x lora_alpha for r becomes K x r). So the soup needs no merged model and evaluates like
any adapter: ``sempa run --config sempa_train/configs/recipe_smollm2.yaml --stages evaluate --adapter OUT``.
A diagnostic of whether averaging independent trainings steadies the gain (README, issue 12); not a library
option. Adapters must share the base model, the target modules and r, lora_alpha; none may use DoRA or rsLoRA.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sempa_train.core.io import atomic_dir

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
SAME = ("base_model_name_or_path", "target_modules", "r", "lora_alpha", "use_dora", "use_rslora")


def read_adapters(adapters: list[Path]) -> tuple[list[dict], list[dict[str, torch.Tensor]]]:
    """The configs and LoRA tensors of ``adapters``, checked to be averageable (same base, modules, r, alpha)."""
    configs = [json.loads((a / CONFIG).read_text()) for a in adapters]
    for key in SAME:
        values = {json.dumps(sorted(c[key]) if isinstance(c.get(key), list) else c.get(key)) for c in configs}
        if len(values) > 1:
            raise ValueError(f"{key} differs between the adapters ({', '.join(sorted(values))}): cannot average")
    if configs[0].get("use_dora") or configs[0].get("use_rslora"):
        raise ValueError("DoRA / rsLoRA adapters are not plain LoRA updates: cannot average this way")
    tensors = [load_file(a / WEIGHTS) for a in adapters]
    if len({frozenset(t) for t in tensors}) > 1:
        raise ValueError("the adapters hold different tensors")
    return configs, tensors


def soup(adapters: list[Path], configs: list[dict], tensors: list[dict[str, torch.Tensor]], out: Path) -> dict:
    """Write to ``out`` (atomically) the adapter whose update is the mean of the adapters' updates; returns its
    config."""
    k = len(tensors)
    merged: dict[str, torch.Tensor] = {}
    for name in tensors[0]:
        if ".lora_A." in name:
            merged[name] = torch.cat([t[name] for t in tensors], dim=0).contiguous()
        elif ".lora_B." in name:
            merged[name] = torch.cat([t[name] / k for t in tensors], dim=1).contiguous()
        else:
            raise ValueError(f"{name}: only lora_A / lora_B tensors can be averaged")
    config = {**configs[0], "r": k * configs[0]["r"], "lora_alpha": k * configs[0]["lora_alpha"],
              "rank_pattern": {}, "alpha_pattern": {}}
    with atomic_dir(out, overwrite=True) as tmp:
        save_file(merged, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        (tmp / "SOURCES.json").write_text(json.dumps({"mean_of": [str(a) for a in adapters]}, indent=2))
    return config


def update_norms(tensors: list[dict[str, torch.Tensor]]) -> tuple[list[float], float]:
    """Frobenius norms of each adapter's whole update (every module's ``B @ A``; the common scaling left out) and
    of their mean: how far apart the updates point (equal updates: the mean's norm equals each one's)."""
    each, mean = [0.0] * len(tensors), 0.0
    for name in tensors[0]:
        if ".lora_A." not in name:
            continue
        updates = [t[name.replace(".lora_A.", ".lora_B.")].float() @ t[name].float() for t in tensors]
        each = [total + float(u.square().sum()) for total, u in zip(each, updates, strict=True)]
        mean += float((sum(updates) / len(updates)).square().sum())
    return [v ** 0.5 for v in each], mean ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", type=Path, nargs="+", help="PEFT LoRA adapter folders of the same base model")
    parser.add_argument("--out", type=Path, required=True, help="folder of the averaged adapter")
    args = parser.parse_args()
    configs, tensors = read_adapters(args.adapters)
    config = soup(args.adapters, configs, tensors, args.out)
    print(f"{args.out}: mean of {len(args.adapters)} adapters, r {config['r']}, lora_alpha {config['lora_alpha']}")
    each, mean = update_norms(tensors)
    print("norm of the mean update / norm of each: " + ", ".join(f"{mean / v:.2f}" for v in each))


if __name__ == "__main__":
    main()
