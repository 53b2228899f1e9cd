"""Helpers shared by the benchmark scripts: machine description and result files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sempa_train.core.io import code_version, now_iso, write_json
from sempa_train.core.models import cpu_flags, cpu_has_fast_bf16, isa_caps

SPEED_FLAGS = {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8",
               "amx_tile"}
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """CPU model, core count, memory, GPU (if any) and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemTotal")).split()[1])
        memory = f"{mem_kb / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        memory = "unknown"
    return {
        "cpu": cpu,
        "cpu_flags": sorted(cpu_flags() & SPEED_FLAGS),
        "isa_caps": isa_caps(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fast_bf16": cpu_has_fast_bf16(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory": memory,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


# Kinds of work in a torch profile: what a faster number format would shrink (matrix products) and what it would not
OPERATOR_GROUPS = {
    "int8 matrix products": ("aten::_int_mm", "quantized::linear_with_input_q_dq_qweight_dq_output_fp32"),
    "floating-point matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::scaled_dot_product_attention"),
}


def profile_summary(profile: Any, top: int = 10) -> dict[str, Any]:
    """Operators' own CPU time in a finished ``torch.profiler.profile``, summed into ``OPERATOR_GROUPS`` (the rest
    is ``other``: norms, rotary embedding, activations, (de)quantisation, copies), with the ``top`` operators."""
    own = {event.key: event.self_cpu_time_total / 1e6 for event in profile.key_averages()}
    total = sum(own.values())
    groups: dict[str, float] = {}
    for op, seconds in own.items():
        group = next((name for name, ops in OPERATOR_GROUPS.items() if op in ops), "other")
        groups[group] = groups.get(group, 0.0) + seconds
    return {
        "profiled_seconds": round(total, 2),
        "groups": {group: {"seconds": round(seconds, 2), "share": round(seconds / total, 3)}
                   for group, seconds in sorted(groups.items(), key=lambda item: -item[1])},
        "top_operators": {op: round(seconds, 3)
                          for op, seconds in sorted(own.items(), key=lambda item: -item[1])[:top]},
    }


SAMPLE_ROW = re.compile(r"^\| (\d+) \| (.*?) \| (.*?) \| (.*) \|$")


def sample_doc_pairs(path: Path) -> list[dict[str, Any]]:
    """The numbered rows (``n``, ``premise``, ``chosen``, ``rejected``) of a sample doc that ``data_quality.py``
    wrote (``docs/quality_sample*.md``), with the cells' escaped ``|`` restored."""
    rows = []
    for line in path.read_text(encoding="utf-8").split("## Reading", 1)[0].splitlines():
        if match := SAMPLE_ROW.match(line):
            premise, chosen, rejected = (cell.replace("\\|", "|") for cell in match.groups()[1:])
            rows.append({"n": int(match.group(1)), "premise": premise, "chosen": chosen, "rejected": rejected})
    return rows


def save(name: str, result: dict[str, Any], *, tag: str = "") -> Path:
    """Write ``results/<name>[-<tag>].json`` with the machine and code version added; print it and where it went."""
    name = f"{name}-{tag}" if tag else name
    path = RESULTS / f"{name}.json"
    write_json(path, {"benchmark": name, "created_at": now_iso(), "code_version": code_version(),
                      "machine": machine(), **result})
    print(json.dumps(result, indent=2, default=str))
    print(f"written to {path}")
    return path


@contextlib.contextmanager
def prefect_server() -> Iterator[None]:
    """A temporary local Prefect server for the block, already answering when the block starts timing."""
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    @flow
    def warm_up() -> None:
        return None

    with prefect_test_harness(server_startup_timeout=120):
        warm_up()
        yield
