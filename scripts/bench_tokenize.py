"""Tokenize-and-count throughput on one core (issue 4 target: >= 20,000 captions/s).

    python scripts/bench_tokenize.py [--file ../shared/data/captions/cc3m_val.parquet] [--repeat 3]

Runs the trigger stage's own keyword extractor (spaCy blank("en") + lookup lemmatizer) and
counts terms with a Counter, as the combiner's per-bundle accumulator does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.caption_report import load_captions  # noqa: E402
from transforms.keywords import KeywordExtractor  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default="../shared/data/captions/cc3m_val.parquet")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    caps = load_captions(args.file)
    ex = KeywordExtractor()
    ex.terms("warm up")  # load spaCy and the lemma table outside the timing
    best = 0.0
    for _ in range(args.repeat):
        counts: Counter = Counter()
        t = time.perf_counter()
        for c in caps:
            counts.update(ex.terms(c))
        rate = len(caps) / (time.perf_counter() - t)
        best = max(best, rate)
        print(f"{len(caps)} captions: {rate:,.0f} captions/s, {len(counts)} distinct terms")
    print(f"best: {best:,.0f} captions/s on one core (target >= 20,000)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
