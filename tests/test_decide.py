import pytest

from pipeline.config import DecideConfig
from schemas.elements import Annotation
from transforms.decide import decide


def _a(**kw):
    return Annotation(key="k", shard="s", **kw)


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
            _a(cluster_id="c", cluster_size=3, is_representative=False, cluster_embedder="phash"),
            DecideConfig(),
            ("drop", ["duplicate:phash"]),
        ),
        (
            _a(cluster_id="c", cluster_size=3, is_representative=False, cluster_embedder="phash"),
            DecideConfig(drop_duplicates=False),
            ("keep", []),
        ),
        (_a(cluster_id="c", cluster_size=3, duplication="full"), DecideConfig(), ("diversify", ["full_duplication"])),
        (_a(cluster_id="c", cluster_size=3, duplication="partial"), DecideConfig(), ("keep", [])),
        (
            _a(trigger_codes=("word_trigger:stardust", "implicit_object:espresso->cup")),
            DecideConfig(),
            ("diversify", ["trigger:word_trigger:stardust"]),
        ),
        (_a(probe_score=9.0, probe_flagged=True), DecideConfig(), ("drop", ["memorized:probe"])),
        (
            _a(probe_score=9.0, probe_flagged=True),
            DecideConfig(drop_flagged_probe=False),
            ("diversify", ["memorized:probe"]),
        ),
    ],
)
def test_decide_reasons(annotation, cfg, expected):
    decision, reasons = decide(annotation, cfg)
    assert (decision, reasons) == expected
