import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import ConfigError, DecideConfig, parse_config
from schemas.elements import Annotation
from transforms.decide import Decide, blocklist_row, decide, manifest_row, reason_family


def _a(**kw):
    return Annotation(key="k", shard="s", **kw)


MEMBER = dict(cluster_id="c", cluster_size=3, is_representative=False, cluster_embedder="phash")


@pytest.mark.parametrize(
    "annotation, cfg, expected",
    [
        (_a(), DecideConfig(), ("keep", [])),
        (
            _a(status="failed", failure_stage="decode", failure_type="corrupt_image"),
            DecideConfig(),
            ("drop", ["failed:decode:corrupt_image"]),
        ),
        (
            _a(status="failed", failure_stage="read", failure_type="missing_caption"),
            DecideConfig(drop_failed=False),
            ("keep", ["failed:read:missing_caption"]),
        ),
        (_a(**MEMBER), DecideConfig(), ("drop", ["duplicate:phash"])),
        (_a(**dict(MEMBER, cluster_embedder="")), DecideConfig(), ("drop", ["duplicate:exact"])),
        (_a(**MEMBER), DecideConfig(drop_duplicates=False), ("keep", [])),
        # tightening on the stored similarity to the representative: a loose member stays
        (_a(**MEMBER, cluster_similarity=0.95), DecideConfig(min_duplicate_similarity=0.97), ("keep", [])),
        (
            _a(**MEMBER, cluster_similarity=0.98),
            DecideConfig(min_duplicate_similarity=0.97),
            ("drop", ["duplicate:phash"]),
        ),
        (_a(cluster_id="c", cluster_size=3, duplication="full"), DecideConfig(), ("diversify", ["full_duplication"])),
        (
            _a(cluster_id="c", cluster_size=3, duplication="full"),
            DecideConfig(min_full_duplication_size=4),
            ("keep", []),
        ),
        (_a(cluster_id="c", cluster_size=3, duplication="partial"), DecideConfig(), ("keep", [])),
        # a dropped member carries only its drop reasons, not its triggers
        (
            _a(**MEMBER, duplication="full", trigger_codes=("word_trigger:x",)),
            DecideConfig(),
            ("drop", ["duplicate:phash"]),
        ),
        (
            _a(trigger_codes=("word_trigger:stardust", "implicit_object:espresso->cup")),
            DecideConfig(),
            ("diversify", ["trigger:word_trigger:stardust"]),
        ),
        (
            _a(trigger_codes=("word_trigger:stardust", "template_caption")),
            DecideConfig(trigger_kinds=("template_caption",)),
            ("diversify", ["trigger:template_caption"]),
        ),
        (_a(trigger_codes=("word_trigger:stardust",)), DecideConfig(diversify_triggers=False), ("keep", [])),
        (_a(probe_score=9.0, probe_flagged=True), DecideConfig(), ("drop", ["memorized:probe"])),
        (
            _a(probe_score=9.0, probe_flagged=True),
            DecideConfig(drop_flagged_probe=False),
            ("diversify", ["memorized:probe"]),
        ),
        # decide.probe_threshold re-flags from the stored score, either way
        (_a(probe_score=0.30, probe_flagged=False), DecideConfig(probe_threshold=0.25), ("drop", ["memorized:probe"])),
        (_a(probe_score=0.30, probe_flagged=True), DecideConfig(probe_threshold=0.5), ("keep", [])),
        (_a(probe_score=None), DecideConfig(probe_threshold=0.0), ("keep", [])),  # not probed: never flagged
        (
            _a(**MEMBER, probe_score=0.9, probe_flagged=True),
            DecideConfig(),
            ("drop", ["duplicate:phash", "memorized:probe"]),
        ),
    ],
)
def test_decide_reasons(annotation, cfg, expected):
    assert decide(annotation, cfg) == expected


def test_reason_family():
    assert reason_family("trigger:word_trigger:galaxy") == "trigger:word_trigger"
    assert reason_family("failed:decode:corrupt_image") == "failed:decode"
    assert reason_family("full_duplication") == "full_duplication"


def test_thresholds_are_validated_with_the_field_named():
    base = {"name": "x", "input": {"path": "x/*.tar"}}
    with pytest.raises(ConfigError, match="decide.min_duplicate_similarity"):
        parse_config(dict(base, decide={"min_duplicate_similarity": 1.5}))
    with pytest.raises(ConfigError, match="decide.min_full_duplication_size"):
        parse_config(dict(base, decide={"min_full_duplication_size": 1}))
    assert parse_config(dict(base, decide={"probe_threshold": 0.3})).decide.probe_threshold == 0.3


def test_blocklist_row_joins_reasons():
    row = manifest_row(_a(url="http://x/1.jpg", sha256="ab", **MEMBER), "drop", ["duplicate:phash", "memorized:probe"])
    assert blocklist_row(row) == {
        "url": "http://x/1.jpg",
        "sha256": "ab",
        "key": "k",
        "reason": "duplicate:phash;memorized:probe",
        "category": "duplicate",
        "kept_key": None,
        "kept_url": None,
    }
    assert blocklist_row(row, ("k0", "http://x/0.jpg"))["kept_key"] == "k0"
    failed = dict(row, reasons=["failed:download:failed_to_download"])
    assert blocklist_row(failed, ("k0", "u"))["category"] == "dead_link"  # never names a kept copy
    assert blocklist_row(dict(row, reasons=["failed:decode:corrupt_image"]))["category"] == "unreadable"


def test_decide_transform():
    annotations = [
        Annotation(key="a", shard="s"),
        Annotation(key="b", shard="s", **MEMBER),
        Annotation(key="c", shard="s", status="failed", failure_stage="decode", failure_type="corrupt_image"),
    ]
    with TestPipeline(runner="DirectRunner") as p:
        rows = p | beam.Create(annotations) | Decide(DecideConfig())
        got = rows | beam.Map(lambda r: (r["key"], r["decision"], tuple(r["reasons"]), r["cluster_id"]))
        assert_that(
            got,
            equal_to(
                [
                    ("a", "keep", (), "a"),
                    ("b", "drop", ("duplicate:phash",), "c"),
                    ("c", "drop", ("failed:decode:corrupt_image",), "c"),
                ]
            ),
        )
