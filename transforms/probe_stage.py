"""ProbeCaptions: the memorization probe as a Beam stage (model loaded once per worker, batched)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import apache_beam as beam

from schemas.elements import Failure, SampleInfo


class ProbeFn(beam.DoFn):
    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self):
        from pipeline.probe_cli import read_captions
        from transforms.probe import MagnitudeScorer, calibrate, load_probe

        self.pm = load_probe(self.cfg.model, self.cfg.device)
        self.scorer = MagnitudeScorer(self.pm, seeds=self.cfg.seeds)
        self.threshold = self.cfg.threshold
        if self.threshold is None and self.cfg.reference_captions:
            ref = read_captions(self.cfg.reference_captions)
            scores = [
                self.scorer.score(ref[i : i + self.cfg.batch_size], self.cfg.metric)
                for i in range(0, len(ref), self.cfg.batch_size)
            ]
            import numpy as np

            self.threshold = calibrate(np.concatenate(scores), self.cfg.target_fpr)

    def process(self, batch: list[SampleInfo]) -> Iterator:
        batch = sorted(batch, key=lambda i: i.key)
        try:
            scores = self.scorer.score([i.caption for i in batch], self.cfg.metric)
        except Exception as exc:  # a model error must not lose the batch's keys
            for i in batch:
                yield beam.pvalue.TaggedOutput(
                    "failures",
                    Failure(i.key, i.shard, "probe", type(exc).__name__, str(exc)[:500], i.url, i.caption, i.sha256),
                )
            return
        for info, score in zip(batch, scores, strict=True):
            flagged = self.threshold is not None and float(score) > self.threshold
            yield {
                "key": info.key,
                "score": float(score),
                "metric": self.cfg.metric,
                "model": self.pm.name,
                "threshold": self.threshold,
                "flagged": bool(flagged),
            }


def _chunks(item, size: int) -> Iterator[list[SampleInfo]]:
    _, infos = item
    ordered = sorted(infos, key=lambda i: i.key)
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]


class ProbeCaptions(beam.PTransform):
    """SampleInfo -> {"scores": dict rows, "failures": Failure}; the budget picks which captions."""

    def __init__(self, cfg, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.seed = seed

    def expand(self, infos):
        from transforms.outputs import multi_output

        if self.cfg.budget == "sample":
            infos = infos | "Budget" >> beam.Filter(
                lambda i, f, s: random.Random(f"{s}:{i.key}").random() < f, f=self.cfg.sample_fraction, s=self.seed
            )
        # batches are cut per shard, in key order: the same captions share a batch on every runner
        # (BatchElements flushes its last batch in finish_bundle, which Beam 2.77's DaskRunner drops)
        batches = (
            infos
            | "ByShard" >> beam.Map(lambda i: (i.shard, i))
            | "GroupShard" >> beam.GroupByKey()
            | "Batch" >> beam.FlatMap(_chunks, size=self.cfg.batch_size)
        )
        out = multi_output(batches, "Probe", ProbeFn(self.cfg), ["failures"], "scores")
        return {"scores": out["scores"], "failures": out["failures"]}
