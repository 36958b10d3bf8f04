"""A planted-trigger test set: samples, duplicate clusters and captions with known triggers.

    python scripts/make_trigger_testset.py [--shuffled] [--samples 3000] OUT.jsonl

Background captions are drawn from a word list; some image clusters get a planted keyword
(word-level trigger: most captions carrying the word land in that cluster); some keywords
come with an object in the metadata that their captions never name (object-level trigger),
one of them related to the object (espresso -> cup, implicit intended). ``--shuffled`` hands
the same keywords to random samples, independent of clusters: nothing should be reported.
"""

from __future__ import annotations

import argparse
import json
import random

from schemas.elements import ClusterAssignment, SampleInfo

BACKGROUND = (
    "man woman child dog cat street park car bike tree house beach mountain river table chair window "
    "door city market bridge train boat sky cloud field garden kitchen room road sign shop"
).split()
VERBS = ("standing sitting walking running holding looking playing riding waiting crossing").split()
WORD_TRIGGERS = ("zorblax", "quenmar", "vistaglow", "trimbleton")
OBJECT_TRIGGERS = (("astronaut", "flag", False), ("espresso", "cup", True))


def _caption(rng: random.Random, extra: list[str]) -> str:
    words = [
        rng.choice(["a", "the"]),
        rng.choice(BACKGROUND),
        rng.choice(VERBS),
        "near",
        rng.choice(["a", "the"]),
        rng.choice(BACKGROUND),
    ]
    for w in extra:
        words.insert(rng.randint(1, len(words)), w)
    return " ".join(words)


def planted_set(n: int = 3000, seed: int = 0, shuffled: bool = False):
    """-> (infos, assignments, truth) with truth = {"word": {(keyword, cluster_id)}, "object": {...}}."""
    rng = random.Random(seed)
    keys = [f"{i:08d}" for i in range(n)]
    cluster_of = {k: k for k in keys}
    sizes = [rng.randint(25, 30) for _ in range(4)] + [rng.randint(5, 30) for _ in range(26)]
    pos, clusters = 0, []
    for size in sizes:  # 30 duplicate clusters at the start of the key range
        members = keys[pos : pos + size]
        for k in members:
            cluster_of[k] = members[0]
        clusters.append(members)
        pos += size
    extras: dict[str, list[str]] = {k: [] for k in keys}
    objects: dict[str, list[str]] = {k: (["tree"] if rng.random() < 0.1 else []) for k in keys}
    truth = {"word": set(), "object": set()}
    for word, members in zip(WORD_TRIGGERS, clusters[:4], strict=True):
        carriers = members[: max(10, int(len(members) * 0.8))] + rng.sample(keys[pos:], 3)
        for k in carriers:
            extras[k].append(word)
        truth["word"].add((word, members[0]))
    singles = keys[pos:]
    for word, obj, related in OBJECT_TRIGGERS:
        carriers = rng.sample(singles, 30)
        for k in carriers[:25]:
            objects[k].append(obj)
        for k in carriers:
            extras[k].append(word)
        truth["object"].add((word, obj, "implicit_intended" if related else "unintended"))
    if shuffled:  # same keyword counts, assigned independently of clusters and objects
        bag = [w for k in keys for w in extras[k]]
        rng.shuffle(bag)
        extras = {k: [] for k in keys}
        for w in bag:
            extras[rng.choice(keys)].append(w)
        truth = {"word": set(), "object": set()}
    infos, assignments = [], []
    size_of = {}
    for k in keys:
        size_of[cluster_of[k]] = size_of.get(cluster_of[k], 0) + 1
    for k in keys:
        meta = json.dumps({"objects": sorted(objects[k])})
        infos.append(SampleInfo(k, "00000", f"http://x.invalid/{k}", _caption(rng, extras[k]), "", "", 64, 64, meta))
        c = cluster_of[k]
        assignments.append(ClusterAssignment(k, c, size_of[c], k == c, "phash" if size_of[c] > 1 else "", 1.0))
    return infos, assignments, truth


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--shuffled", action="store_true")
    args = parser.parse_args()
    infos, assignments, truth = planted_set(args.samples, shuffled=args.shuffled)
    with open(args.out, "w") as f:
        for i, a in zip(infos, assignments, strict=True):
            f.write(
                json.dumps(
                    {
                        "key": i.key,
                        "caption": i.caption,
                        "meta": json.loads(i.meta_json),
                        "cluster_id": a.cluster_id,
                        "cluster_size": a.cluster_size,
                    }
                )
                + "\n"
            )
    print(f"{len(infos)} samples -> {args.out}; planted: {sorted(truth['word'])} {sorted(truth['object'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
