"""Benchmark of the MinHash libraries for ``data.dedup.near`` (not a test): rensa against datasketch, same
documents, same shingles, same number of permutations, in one process, interleaved rounds.

    .venv/bin/python -m bench.minhash [--documents 2000] [--words 300] [--rounds 5]

Documents are windows of the sample corpus' words; shingles are word 5-grams (as the data stage makes them).
Reports each library's best round in documents per second and the ratio; the figures go into
bench/results/minhash.json and bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.report import Headline, save_fragment

ROOT = Path(__file__).resolve().parents[1]


def documents(count: int, size: int) -> list[list[str]]:
    words = " ".join(p.read_text() for p in sorted((ROOT / "data" / "sample" / "shakespeare").glob("*.txt"))).split()
    step = max(1, (len(words) - size) // count)
    docs = [words[i : i + size] for i in range(0, len(words) - size, step)][:count]
    return [[" ".join(doc[i : i + 5]).lower() for i in range(len(doc) - 4)] for doc in docs]


def main() -> None:
    from datasketch import MinHash
    from rensa import RMinHash

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--words", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    shingles = documents(args.documents, args.words)
    encoded = [[s.encode() for s in doc] for doc in shingles]

    def run_rensa() -> None:
        for doc in shingles:
            minhash = RMinHash(num_perm=128, seed=1)
            minhash.update(doc)
            minhash.digest()

    def run_datasketch() -> None:
        for doc in encoded:
            minhash = MinHash(num_perm=128, seed=1)
            minhash.update_batch(doc)

    best = {"rensa": float("inf"), "datasketch": float("inf")}
    for _ in range(args.rounds):
        for name, run in (("rensa", run_rensa), ("datasketch", run_datasketch)):
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    result = {
        "documents": len(shingles),
        "words_per_document": args.words,
        "num_perm": 128,
        "docs_per_s": {name: round(len(shingles) / seconds, 1) for name, seconds in best.items()},
        "rensa_over_datasketch": round(best["datasketch"] / best["rensa"], 2),
    }
    print(json.dumps(result))
    rate = result["docs_per_s"]
    section = (
        f"{result['documents']:,} documents of {args.words} words (windows of the sample corpus), word 5-gram "
        f"shingles, 128 permutations, best of {args.rounds} interleaved rounds in one process: rensa "
        f"{rate['rensa']:,.0f} documents/s, datasketch {rate['datasketch']:,.0f} documents/s."
    )
    headline = Headline(
        "MinHash signatures (data.dedup.near)",
        f"rensa {rate['rensa']:,.0f} docs/s",
        f"datasketch {rate['datasketch']:,.0f} docs/s",
        result["rensa_over_datasketch"],
    )
    command = f"python -m bench.minhash --documents {args.documents} --words {args.words} --rounds {args.rounds}"
    print(f"wrote {save_fragment('minhash', command, section, [headline])}")


if __name__ == "__main__":
    main()
