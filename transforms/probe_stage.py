"""ProbeCaptions: the memorization probe as a Beam stage (model loaded once per worker, batched),
with scores cached per shard.

A shard's captions are probed together, cut into batches in key order (the same captions share
a batch on every runner). The raw scores of a finished shard are cached
(``CACHE/probe/<shard>-<fingerprint>/``, ``transforms.shard_cache``), keyed by the probe model
(name and files), metric, seeds, batch size, device and a hash of the shard's (key, caption)
pairs: a resumed or repeated run with the same captions and probe reuses them without loading
the model. The calibrated threshold is cached the same way (model, metric, seeds, reference
captions, target FPR). ``flagged`` is always recomputed from the score and the threshold.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator

import apache_beam as beam
import pyarrow as pa

from pipeline import progress
from schemas.elements import Failure, SampleInfo

SCORE_SCHEMA = pa.schema([("key", pa.string()), ("score", pa.float64())])
CACHE_VERSION = 1


def model_identity(model: str | None) -> dict:
    """A local folder: its files' relative paths, sizes and mtimes; a hub id: the id."""
    if not model:
        return {"model": None}
    if not os.path.isdir(model):
        return {"model": model}
    files = []
    for root, _, names in sorted(os.walk(model)):
        for name in sorted(names):
            path = os.path.join(root, name)
            st = os.stat(path)
            files.append((os.path.relpath(path, model), st.st_size, int(st.st_mtime)))
    return {"model": os.path.basename(model.rstrip("/")), "files": files}


def _digest(blob) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def captions_hash(batch: list[SampleInfo]) -> str:
    h = hashlib.sha256()
    for info in batch:
        h.update(info.key.encode("utf-8", "surrogatepass") + b"\0")
        h.update((info.caption or "").encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def score_key(cfg, identity: dict, batch: list[SampleInfo]) -> str:
    """The cache fingerprint of one shard's scores."""
    return _digest(
        {
            "v": CACHE_VERSION,
            "model": identity,
            "metric": cfg.metric,
            "seeds": cfg.seeds,
            "batch_size": cfg.batch_size,
            "device": cfg.device,
            "captions": captions_hash(batch),
        }
    )


def _file_digest(path: str | None) -> str | None:
    if not path or not os.path.isfile(path):
        return path
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class ProbeFn(beam.DoFn):
    """(shard, [SampleInfo]) -> score rows, and tagged Failures; the model loads on the first miss."""

    def __init__(self, cfg, cache_dir: str | None = None):
        self.cfg = cfg
        self.cache_dir = cache_dir

    def setup(self):
        self.pm = None
        self.scorer = None
        self.identity = model_identity(self.cfg.model)
        self.name = os.path.basename((self.cfg.model or "").rstrip("/")) or (self.cfg.model or "")
        self.threshold = self.cfg.threshold
        self._calibrated = self.threshold is not None or not self.cfg.reference_captions

    def start_bundle(self):
        progress.begin("probe")

    def _load(self):
        if self.scorer is None:
            from pipeline import logs
            from transforms.probe import MagnitudeScorer, load_probe

            logs.quiet_hf(load=True)
            self.pm = load_probe(self.cfg.model, self.cfg.device)
            self.name = self.pm.name
            self.scorer = MagnitudeScorer(self.pm, seeds=self.cfg.seeds)
        return self.scorer

    def _threshold(self):
        if self._calibrated:
            return self.threshold
        self._calibrated = True
        key = _digest(
            {
                "v": CACHE_VERSION,
                "model": self.identity,
                "metric": self.cfg.metric,
                "seeds": self.cfg.seeds,
                "batch_size": self.cfg.batch_size,
                "reference": _file_digest(self.cfg.reference_captions),
                "target_fpr": self.cfg.target_fpr,
            }
        )
        from transforms import fsio

        path = fsio.join(self.cache_dir, "probe", f"threshold-{key}.json") if self.cache_dir else None
        if path and fsio.isfile(path):
            self.threshold = json.loads(fsio.read_text(path))["threshold"]
            progress.count("probe", "threshold_cached")
            return self.threshold
        self.threshold = self._calibrate()
        if path:
            from transforms.write import atomic_write_text

            atomic_write_text(path, json.dumps({"threshold": self.threshold}))
        return self.threshold

    def _calibrate(self) -> float:
        import numpy as np

        from pipeline.probe_cli import read_captions
        from transforms.probe import calibrate

        scorer, ref, size = self._load(), read_captions(self.cfg.reference_captions), self.cfg.batch_size
        scores = [scorer.score(ref[i : i + size], self.cfg.metric) for i in range(0, len(ref), size)]
        return float(calibrate(np.concatenate(scores), self.cfg.target_fpr))

    def process(self, item) -> Iterator:
        shard, infos = item
        ordered = sorted(infos, key=lambda i: i.key)
        scores, failures = self._shard_scores(shard, ordered)
        threshold = self._threshold()
        for f in failures:
            yield beam.pvalue.TaggedOutput("failures", f)
        for info in ordered:
            if info.key not in scores:
                continue
            score = scores[info.key]
            yield {
                "key": info.key,
                "score": score,
                "metric": self.cfg.metric,
                "model": self.name,
                "threshold": threshold,
                "flagged": bool(threshold is not None and score > threshold),
                "_shard": shard,  # routes the score to its shard's annotations (not a column)
            }

    def _shard_scores(self, shard: str, ordered: list[SampleInfo]) -> tuple[dict[str, float], list[Failure]]:
        from transforms import shard_cache

        entry = None
        if self.cache_dir:
            entry = shard_cache.entry_dir(self.cache_dir, "probe", shard, score_key(self.cfg, self.identity, ordered))
            cached = shard_cache.load(entry)
            if cached is not None:
                progress.count("probe", "cache_hits")
                progress.count("probe", "cached_captions", len(ordered))
                progress.advance("probe", len(ordered))
                return {r["key"]: float(r["score"]) for r in cached["scores"]}, []
            progress.count("probe", "cache_misses")
        scores: dict[str, float] = {}
        failures: list[Failure] = []
        size, scorer = self.cfg.batch_size, self._load()  # a model that does not load fails the run
        for start in range(0, len(ordered), size):
            batch = ordered[start : start + size]
            try:
                values = scorer.score([i.caption for i in batch], self.cfg.metric)
            except Exception as exc:  # a model error must not lose the batch's keys
                failures.extend(
                    Failure(i.key, i.shard, "probe", type(exc).__name__, str(exc)[:500], i.url, i.caption, i.sha256)
                    for i in batch
                )
            else:
                scores.update((i.key, float(v)) for i, v in zip(batch, values, strict=True))
            progress.count("probe", "scored_captions", len(batch))
            progress.advance("probe", len(batch))
        if entry is not None and not failures:
            rows = [{"key": k, "score": scores[k]} for k in sorted(scores)]
            shard_cache.store(entry, {"scores": (rows, SCORE_SCHEMA)})
        return scores, failures


def _shard_parts(item, fraction: float | None, seed: int) -> Iterator[tuple[str, list[SampleInfo]]]:
    """A SampleInfo table (an info batch) or one SampleInfo -> (shard, its infos in the budget):
    ``fraction`` (budget "sample") keeps a key when its seeded draw is below it."""
    from schemas import arrow

    infos = arrow.infos_of(item) if isinstance(item, pa.Table) else [item]
    if fraction is not None:
        infos = [i for i in infos if random.Random(f"{seed}:{i.key}").random() < fraction]
    if infos:
        yield infos[0].shard, infos


class ProbeCaptions(beam.PTransform):
    """SampleInfo elements or info batches (SampleInfo tables) -> {"scores": dict rows,
    "failures": Failure}; the budget picks which captions."""

    def __init__(self, cfg, seed: int = 0, cache_dir: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.cache_dir = cache_dir

    def expand(self, infos):
        from transforms.outputs import multi_output

        fraction = self.cfg.sample_fraction if self.cfg.budget == "sample" else None
        # one element per shard: batches are cut in key order (the same captions share a batch on
        # every runner) and a shard's scores are cached together
        shards = (
            infos
            | "ByShard" >> beam.FlatMap(_shard_parts, fraction=fraction, seed=self.seed)
            | "GroupShard" >> beam.GroupByKey()
            | "JoinParts" >> beam.MapTuple(lambda shard, parts: (shard, [i for part in parts for i in part]))
        )
        out = multi_output(shards, "Probe", ProbeFn(self.cfg, self.cache_dir), ["failures"], "scores")
        return {"scores": out["scores"], "failures": out["failures"]}
