"""How much PromptEOL work sentences could share beyond the template's opening: tokens of a trie of the prompts.

    python tests/benchmarks/shared_prefixes.py --senteval-dir ../shared/data/senteval

PromptEOL's encoder already computes the opening every prompt starts with (``This sentence : "``) once. Sentences
that begin alike ("A man is playing a guitar." / "A man is playing a flute.") share more: their prompts' key/value
states agree up to where their tokens differ. This counts, for each STS set, the tokens after the opening of the
distinct prompts against the nodes of a trie over them (the tokens an encoder that computed each shared prefix
once would still compute), and the padding of sempa's length-sorted batches of 64: the ceiling of what sharing
prefixes between sentences could save, before the cost of doing it. It also counts the tokens of the simplest way
to share them with padded batches, the one the encoder's shared opening already uses: each sentence is given the
longest prefix that at least ``m`` sentences share (its stem, computed once as a key/value cache), and the
sentences of one stem go in length-sorted batches of their own, padded to the longest remainder. It runs no model.
Writes ``tests/benchmarks/results/shared_prefixes[-TAG].json``.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from collections.abc import Sequence

from common import save

from sempa_train.core.models import load_tokenizer, resolve_model
from sempa_train.core.templates import prompteol_prompt
from sempa_train.stages.embedding import common_prefix
from sempa_train.stages.sts_data import load_senteval_task

SETS = [("STSBenchmark", "dev"), ("STSBenchmark", "train"), ("SICKRelatedness", "train")]


def trie_nodes(sequences: Sequence[Sequence[int]]) -> int:
    """The number of distinct non-empty prefixes of ``sequences``: the nodes of their trie."""
    return len({tuple(ids[:k]) for ids in sequences for k in range(1, len(ids) + 1)})


def sorted_batch_padding(lengths: Sequence[int], batch_size: int) -> int:
    """Padding tokens of batches of ``batch_size`` taken longest first, each padded to its longest."""
    ordered = sorted(lengths, reverse=True)
    return sum(ordered[start] * len(ordered[start:start + batch_size]) - sum(ordered[start:start + batch_size])
               for start in range(0, len(ordered), batch_size))


def stem_batch_tokens(sequences: Sequence[Sequence[int]], batch_size: int, min_sharing: int) -> tuple[int, int]:
    """Tokens computed (stems once, remainders padded) and batches run when each sequence continues the longest
    prefix (leaving it a token) that at least ``min_sharing`` sequences share, in batches of its stem only."""
    counts = Counter(tuple(ids[:k]) for ids in sequences for k in range(1, len(ids)))
    remainders: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for ids in sequences:
        stem = 0
        while stem + 1 < len(ids) and counts[tuple(ids[:stem + 1])] >= min_sharing:
            stem += 1
        remainders[tuple(ids[:stem])].append(len(ids) - stem)
    tokens = sum(len(stem) + sum(lengths) + sorted_batch_padding(lengths, batch_size)
                 for stem, lengths in remainders.items())
    batches = sum(-(-len(lengths) // batch_size) for lengths in remainders.values())
    return tokens, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senteval-dir", default="../shared/data/senteval")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer")
    parser.add_argument("--batch-size", type=int, default=64, help="sempa's PromptEOL batch (for the padding)")
    parser.add_argument("--min-sharing", type=int, nargs="+", default=[8, 16, 32, 64],
                        help="how many sentences must share a stem for it to get batches of its own")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    tokenizer = load_tokenizer(resolve_model(args.model))
    rows = {}
    for task, split in SETS:
        sts = load_senteval_task(args.senteval_dir, task, split)[0]
        sentences = list(dict.fromkeys(sts.sent1 + sts.sent2))
        ids = tokenizer([prompteol_prompt(s) for s in sentences])["input_ids"]
        opening = len(common_prefix(ids))
        rest = [seq[opening:] for seq in ids]
        tokens = sum(len(seq) for seq in rest)
        nodes = trie_nodes(rest)
        padding = sorted_batch_padding([len(seq) for seq in rest], args.batch_size)
        computed = tokens + padding  # what the encoder computes now after the opening
        stems = {}
        for min_sharing in args.min_sharing:
            stem_tokens, batches = stem_batch_tokens(rest, args.batch_size, min_sharing)
            stems[str(min_sharing)] = {"tokens": stem_tokens, "batches": batches,
                                       "change_vs_now": round(stem_tokens / computed - 1, 4)}
        rows[f"{task}-{split}"] = {
            "distinct_sentences": len(sentences),
            "opening_tokens": opening,
            "tokens_after_opening": tokens,
            "mean_tokens_after_opening": round(tokens / len(rest), 2),
            "trie_tokens": nodes,
            "shared_fraction": round(1 - nodes / tokens, 4),
            "sorted_batch_padding_tokens": padding,
            "padding_fraction": round(padding / tokens, 4),
            "computed_now": computed,
            "batches_now": -(-len(rest) // args.batch_size),
            "stem_batches": stems,
        }
        print(f"{task} {split}: {tokens} tokens after the opening, {nodes} in a trie "
              f"({1 - nodes / tokens:.1%} shared), padding {padding / tokens:.1%}; stem batches: "
              + ", ".join(f"m={m} {row['change_vs_now']:+.1%}" for m, row in stems.items()), flush=True)
    save("shared_prefixes", {"model": args.model, "batch_size": args.batch_size, "sets": rows}, tag=args.tag)


if __name__ == "__main__":
    main()
