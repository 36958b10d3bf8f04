"""docs/ stays in sync with the code: every config field, every output column, every code emitted."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_generated_pages_are_up_to_date():
    proc = subprocess.run([sys.executable, "scripts/gen_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_config_field_has_a_line():
    from pydantic import BaseModel

    from pipeline.config import JobConfig

    text = (DOCS / "config.md").read_text()
    documented = set(re.findall(r"^\| `([\w.]+)` \|", text, re.M))

    def fields(model, prefix=""):
        for name, field in model.model_fields.items():
            yield prefix + name
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from fields(field.annotation, f"{prefix}{name}.")

    expected = set(fields(JobConfig))
    assert expected - documented == set(), "run python scripts/gen_docs.py"
    for line in text.splitlines():
        if line.startswith("| `"):
            assert line.rstrip(" |").split("|")[-1].strip(), line  # every field says what it does


def test_every_output_column_is_documented():
    from schemas import arrow

    text = (DOCS / "outputs.md").read_text()
    for table, schema in arrow.TABLES.items():
        section = text[text.index(f"## `{table}/`") :]
        section = section[: section.index("\n## ", 4)]
        for name in schema.names:
            assert f"| `{name}` |" in section, (table, name)


def _literal(node):
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


READER_FILES = ("read_shards.py", "tar_members.py", "sidecar.py", "decode.py")  # codes built in f-strings


def emitted_codes() -> set[str]:
    """Failure types, decode errors and member/shard event codes that the code writes literally."""
    codes: set[str] = set()
    for path in list((ROOT / "transforms").glob("*.py")) + list((ROOT / "pipeline").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                args = node.args
                if name == "Failure" and len(args) >= 4 and _literal(args[3]):
                    codes.add(_literal(args[3]))
                if name == "Failure":
                    codes.update(
                        _literal(k.value) for k in node.keywords if k.arg == "error_type" and _literal(k.value)
                    )
                if name == "DecodeError" and args and _literal(args[0]):
                    codes.add(_literal(args[0]))
                if name == "_failure" and len(args) >= 2 and _literal(args[1]):
                    codes.add(_literal(args[1]))
                if name == "_decode_text" and len(args) >= 2 and _literal(args[1]):
                    codes.update({f"{_literal(args[1])}_too_long", f"bad_{_literal(args[1])}_encoding"})
            if path.name in READER_FILES and isinstance(node, ast.JoinedStr) and node.values:
                head = _literal(node.values[0]) or ""
                m = re.match(r"([a-z]+(?:_[a-z]+)+)[: ]", head)
                if m:
                    codes.add(m.group(1))
            if path.name in READER_FILES and _literal(node):
                m = re.match(r"([a-z]+(?:_[a-z]+)+): ", _literal(node))
                if m:
                    codes.add(m.group(1))
    return codes


def test_every_emitted_code_is_documented():
    text = (DOCS / "reasons.md").read_text()
    documented = set(re.findall(r"`([a-z_]+)", text))
    codes = emitted_codes()
    assert {"corrupt_image", "missing_caption", "duplicate_key", "caption_too_long", "truncated_tar"} <= codes
    assert codes - documented == set()


def test_every_reason_family_is_documented():
    text = (DOCS / "reasons.md").read_text()
    source = "".join((ROOT / "transforms" / f).read_text() for f in ("decide.py", "triggers.py", "trigger_counts.py"))
    families = set(
        re.findall(r'f?"((?:failed|duplicate|memorized|trigger|word_trigger|object_trigger|implicit_object)):', source)
    )
    families |= set(
        re.findall(r'"(full_duplication|template_caption|duplicate_caption|near_duplicate_caption)"', source)
    )
    assert {"failed", "duplicate", "memorized", "word_trigger"} <= families
    for family in families:
        assert f"`{family}" in text, family
    from transforms.decide import CATEGORIES

    for category in CATEGORIES:
        assert f"`{category}`" in text


def test_contract_documents_the_commands():
    text = (DOCS / "contract.md").read_text()
    for needle in ("memsieve init", "--dry-run", "--output NEW", "--version", "--log-level", "JSON line"):
        assert needle in text, needle
