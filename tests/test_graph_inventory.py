"""Issue 10, acceptance 5: every global combine and every side input of the job graph, listed and
checked against an allow-list of ones bounded by something other than the number of samples.

The graph is built (not run) with every stage on. ``ALLOWED`` says why each is bounded; anything
else (a new side input or global combine) fails ``test_nothing_unbounded_left``. docs/engines.md
has the list.
"""

import re

import apache_beam as beam
import yaml
from apache_beam.pipeline import PipelineVisitor

from pipeline.config import parse_config

SEARCH = r"(FindPhashCopies/SearchCodes|(ClipEdges|VectorEdges_\w+)/CellSearch)"  # VectorEdges_*: precomputed
ALLOWED = {
    # the cell search (phash codes and CLIP vectors): a fixed-size sample, then the k-means plan
    SEARCH + r"/SampleForCells\b.*": "row count + <= 100k sampled rows",
    SEARCH + r"/AssignCells\d+/ParDo\(AssignCells\)": "plan: k centroids (~sqrt n); one per assignment split",
    # caption triggers: vocabulary-sized or count-sized
    r"MineTriggers/CountSamples\b.*": "one count",
    r"MineTriggers/Candidates": "keyword counts pruned at min_keyword_count: vocabulary",
    r"MineTriggers/GatherCandidates\b.*": "(keyword, cluster >= min_pair_count) pairs seen >= min_pair_count times",
    r"MineTriggers/TestKeywords": "one count",
    r"MineTriggers/GatherBoth\b.*": "(keyword, object) pairs: vocabulary x objects",
    r"MineTriggers/TestObjects": "vocabulary x objects counts, one count",
    r"MineTriggers/TriggerCodes": "significant (keyword, cluster) and (keyword, object) sets",
    r"MineTriggers/FrequentSet\b.*": "frequent template words: vocabulary",
    r"MineTriggers/Skeletons(/Split)?": "frequent template words: vocabulary",
    r"DiversifyCaptions/Diversify": "top-N vocabulary",
    r"DiversifyCaptions/TopTables\b.*": "one top-words table per word bucket: buckets x vocabulary_size rows",
    r"EmbedClip/NotPersisted": "one entry per shard",
    r"EmbedClip/Save": "one name per shard (identity + content digest)",
    r"CountWritten\b.*": "the final writer join: one count of written files",
    r"(ReportReady|BlocklistReady)\b.*": "a gate: one count of the written files it waits for",
    r"(ReportParts|BlocklistFiles)": "that one count (the report's and blocklist files' steps)",
    r"FindOrbCopies/CountImages\b.*": "one count (the ORB vocabulary grows with it)",
    r"FindOrbCopies/Postings": "the image count, a scalar (stop-words join by key)",
}


def _graph(tmp_path, **overrides) -> beam.Pipeline:
    from pipeline.graph import build_graph, read_input

    raw = yaml.safe_load(open("jobs/demo.yaml"))
    raw["input"]["path"] = str(tmp_path / "*.tar")
    raw["output"]["dir"] = str(tmp_path / "out")
    raw["dedup"]["clip"] = {"enabled": True}
    raw.update(overrides)
    p = beam.Pipeline()
    cfg = parse_config(raw)
    read = read_input(p, cfg, "webdataset", [str(tmp_path / "00000.tar")], str(tmp_path / "out"))
    build_graph(p, cfg, read, str(tmp_path / "out"))
    return p


def inventory(p: beam.Pipeline) -> dict[str, str]:
    """full label -> what makes it global: the combine's type, or the side inputs' kinds."""
    found = {}

    class Visitor(PipelineVisitor):
        def enter_composite_transform(self, node):
            self.visit_transform(node)

        def visit_transform(self, node):
            kind = type(node.transform).__name__
            if "Globally" in kind or kind in ("ToList", "ToDict", "ToSet", "Top", "FixedSizeGlobally"):
                found[node.full_label] = kind
            if node.side_inputs:
                found[node.full_label] = "side input: " + ",".join(type(s).__name__ for s in node.side_inputs)

    p.visit(Visitor())
    return found


def _unlisted(found: dict, patterns: dict) -> dict:
    return {label: kind for label, kind in found.items() if not any(re.fullmatch(pat, label) for pat in patterns)}


def test_webdataset_graph_has_only_bounded_globals(tmp_path):
    found = inventory(_graph(tmp_path))
    assert any("SampleForCells" in label for label in found)  # the inventory sees combines and side inputs
    assert _unlisted(found, ALLOWED) == {}
    for label in found:  # nothing of the dedup search or the clustering gathers
        assert not re.match(r"(FindDuplicates|FindPhashCopies|ClipEdges)/", label) or re.fullmatch(
            "|".join(ALLOWED), label
        ), label


def test_incremental_graph_keeps_old_keys_out_of_workers(tmp_path):
    """Old samples' keys join as a PCollection; no worker holds the set."""
    from transforms.dedup import FindDuplicates

    p = beam.Pipeline()
    infos = p | "Infos" >> beam.Create([])
    old = p | "Old" >> beam.Create(["a"])
    _ = {"info_batches": infos, "edges": p | "E" >> beam.Create([])} | FindDuplicates("earliest", old_keys=old)
    assert {k: v for k, v in inventory(p).items() if k.startswith("FindDuplicates")} == {}


def test_nothing_unbounded_left(tmp_path):
    found = inventory(_graph(tmp_path))
    assert _unlisted(found, ALLOWED) == {}
    assert not any(label.startswith("Annotate/") for label in found)  # duplication joins by cluster id


def test_annotate_joins_duplication_by_cluster_like_the_dict():
    """The keyed join gives each member of a duplicate cluster its class, as the old dict did;
    singletons and clusters without a class get ""."""
    from apache_beam.testing.util import assert_that, equal_to

    from schemas.elements import ClusterAssignment, SampleInfo
    from transforms.annotate import Annotate, build_annotation

    infos = [SampleInfo(k, "s0", "", f"c {k}", "h", "p", 8, 8) for k in "abcdef"]
    assigns = [
        ClusterAssignment("a", "a", 2, True, "exact", 1.0),
        ClusterAssignment("b", "a", 2, False, "exact", 1.0),
        ClusterAssignment("c", "c", 3, True, "clip", 1.0),
        ClusterAssignment("d", "c", 3, False, "clip", 0.9),
        ClusterAssignment("e", "c", 3, False, "clip", 0.9),
        ClusterAssignment("f", "f", 1, True, "", 1.0),
    ]
    classes = [("a", "full"), ("f", "partial")]  # "c" has no class; "f" is a singleton
    pairs = zip(infos, assigns, strict=True)
    expected = [build_annotation(i.key, {"info": [i], "assignment": [a]}, dict(classes)) for i, a in pairs]
    assert [e.duplication for e in expected] == ["full", "full", "", "", "", ""]
    with beam.Pipeline() as p:
        keyed = {
            "info": p | "I" >> beam.Create([(i.key, i) for i in infos]),
            "assignment": p | "A" >> beam.Create([(a.key, a) for a in assigns]),
        }
        out = keyed | Annotate(p | "D" >> beam.Create(classes))
        assert_that(out, equal_to(expected))
    assert not inventory(p)
