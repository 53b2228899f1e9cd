"""``sempa embed`` throughput on SNLI sentences: the transformers backend against vLLM's pooling runner.

    python tests/benchmarks/embed_corpus_throughput.py --snli-dir ../shared/data/nli/snli --sentences 20000

Takes the first ``--sentences`` distinct sentences (premises and hypotheses) of SNLI validation then
test, writes them to a ``.txt`` corpus and embeds it with SmolLM2-135M-Instruct through
``embed_corpus`` (what ``sempa embed`` runs), once per backend, each with ``dtype=auto`` (bf16 where the
CPU has bf16 units, else fp32; the vLLM backend runs on a merged copy of the model). Reports wall
seconds and sentences/s of each, the engine start-up of vLLM separately, and the per-sentence cosine
between the two backends' vectors (a check that they embed alike). Writes
``tests/benchmarks/results/embed_corpus_throughput[-TAG].json`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from common import save

from sempa_train.core.config import CorpusConfig, EmbedConfig
from sempa_train.stages.corpus import embed_corpus, read_embeddings


def snli_sentences(snli_dir: Path, limit: int) -> list[str]:
    """Distinct premises and hypotheses of SNLI validation, then test, in file order."""
    seen: dict[str, None] = {}
    for split in ("validation", "test"):
        for line in (snli_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for text in (row["premise"], row["hypothesis"]):
                seen.setdefault(text.strip().replace("\n", " "), None)
                if len(seen) >= limit:
                    return list(seen)
    return list(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snli-dir", type=Path, default=Path("../shared/data/nli/snli"))
    parser.add_argument("--sentences", type=int, default=20_000)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--backends", default="transformers,vllm")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    sentences = snli_sentences(args.snli_dir, args.sentences)
    results: dict[str, dict[str, float]] = {}
    vectors: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "snli.txt"
        corpus.write_text("\n".join(sentences) + "\n", encoding="utf-8")
        for backend in args.backends.split(","):
            embed = EmbedConfig(backend=backend)
            started = time.perf_counter()
            if backend == "vllm":  # engine start (and the merged folder) timed apart from the embedding itself
                from sempa_train.stages.corpus import EmbedJob

                EmbedJob(args.model, None, embed, False).encoder()
            startup = time.perf_counter() - started
            started = time.perf_counter()
            out = embed_corpus(corpus, Path(tmp) / f"emb-{backend}", model=args.model, embed=embed,
                               corpus=CorpusConfig(shard_size=2048), show_progress=False).out_dir
            seconds = time.perf_counter() - started
            vectors[backend] = read_embeddings(out)[0]["vector"].to_numpy()
            results[backend] = {"seconds": round(seconds, 1), "startup_seconds": round(startup, 1),
                                "sentences_per_second": round(len(sentences) / seconds, 1)}
    if len(vectors) == 2:
        a, b = vectors.values()
        cos = np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        agreement = {"cosine_min": round(float(cos.min()), 5), "cosine_mean": round(float(cos.mean()), 5)}
    else:
        agreement = {}
    save("embed_corpus_throughput", {"model": args.model, "sentences": len(sentences), "dtype": "auto",
                                     "results": results, "backend_agreement": agreement}, tag=args.tag)


if __name__ == "__main__":
    main()
