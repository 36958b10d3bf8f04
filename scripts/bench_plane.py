"""Where Beam's in-process runner (FnApiRunner) spends time and bytes, per stage and per PCollection.

    python scripts/bench_plane.py [--top 25] [--json OUT.json] -- run jobs/laion_embeddings.yaml \
        --input DIR --output OUT [--set ...]

Runs ``memsieve`` in this process with probes installed on the runner (this script only; the
job itself is unchanged) and prints, heaviest first:

- per stage (a fused set of transforms run as bundles): bundles, wall seconds inside
  ``BundleManager.process_bundle`` (the stage's user code plus the data plane), the bytes and
  elements it read from the runner, and the runner-side seconds: sending its input
  (``_send_input_to_worker``), buffering its output (``ListBuffer``/``GroupingBuffer.append``)
  and grouping (``GroupingBuffer.partition``);
- per PCollection crossing the data plane (a stage's input): bytes, elements, bytes per element
  and the coder that encodes it.

memsieve's own runner patches (``pipeline.beam_speedups``, as ``MEMSIEVE_BEAM_SPEEDUPS`` chooses)
are installed first, the probes on top of them: compare ``MEMSIEVE_BEAM_SPEEDUPS=inspect`` (Beam's
own data plane) with the default. Element counts come from ``DataInputOperation.index`` (what
the worker decoded); bytes are the encoded chunks the runner hands the worker. The probes' own
cost is a few ``len()`` calls and clock reads per chunk, not per element. The probes keep one
current stage, so the job's stages run one at a time here (``MEMSIEVE_STAGE_THREADS=1``, unless
set: the ``waves`` patch would run a wave's independent bundles at once and mix their figures).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

STAGES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
PCOLLS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
CODERS: dict[str, str] = {}
_CURRENT = {"stage": "?", "pcolls": {}}


def _short(name: str, width: int = 70) -> str:
    name = name.replace("ref_AppliedPTransform_", "").replace("ref_PCollection_", "")
    return name if len(name) <= width else name[: width // 2 - 1] + ".." + name[-(width // 2 - 1) :]


_ABBREV = [
    (r"WindowedValueCoder\[window_coder=\w+, wrapped_value_coder=(.*)\]$", r"\1"),
    (r"DeterministicFastPrimitivesCoder(V2)?", "dfp"),
    (r"FastPrimitivesCoder", "fp"),
    (r"LengthPrefixCoder", "lp"),
    (r"TupleCoder", "kv"),
    (r"IterableCoder", "iter"),
    (r"PickleCoder", "pickle"),
    (r"BytesCoder", "bytes"),
]


def _coder_label(coder) -> str:
    """A short form of a coder's name: kv[lp[dfp], iter[lp[pickle]]]."""
    text = str(coder)
    for pattern, repl in _ABBREV:
        text = re.sub(pattern, repl, text)
    return text


def _read_pcolls(bcm) -> dict[str, tuple[str, str]]:
    """{data-plane read transform id: (PCollection name, coder)} of a stage."""
    from apache_beam.portability.api import beam_fn_api_pb2

    desc = bcm.process_bundle_descriptor
    out = {}
    for tid, t in desc.transforms.items():
        if t.spec.urn != "beam:runner:source:v1":
            continue
        pid = next(iter(t.outputs.values()))
        pcoll = desc.pcollections[pid]
        name = pcoll.unique_name or pid
        try:
            coder_id = beam_fn_api_pb2.RemoteGrpcPort.FromString(t.spec.payload).coder_id
            coder = _coder_label(bcm.execution_context.pipeline_context.coders[coder_id])
        except Exception:  # noqa: BLE001 - a label only
            coder = "?"
        out[tid] = (name, coder)
    return out


_SAVED: dict[tuple[object, str], object] = {}


def _wrap(owner, name: str, make) -> None:
    """``owner.name = make(current owner.name)``, the current one kept for ``uninstall``."""
    current = owner.__dict__[name]
    _SAVED.setdefault((owner, name), current)
    setattr(owner, name, make(current))


def uninstall() -> None:
    """The runner's methods as they were before ``install``; the counters are cleared."""
    for (owner, name), value in _SAVED.items():
        setattr(owner, name, value)
    _SAVED.clear()
    for table in (STAGES, PCOLLS, CODERS):
        table.clear()


def install() -> None:
    """Wrap the runner's methods with counters (once; ``uninstall`` takes them off)."""
    from apache_beam.runners.portability.fn_api_runner import execution, fn_runner
    from apache_beam.runners.worker import bundle_processor

    from pipeline.beam_speedups_refs import raw_chunks  # as held: elements passed by reference stay so

    if _SAVED:
        return
    bm = fn_runner.BundleManager
    orig_process, orig_send = bm.__dict__["process_bundle"], bm.__dict__["_send_input_to_worker"]

    def process_bundle(self, inputs, *args, **kwargs):
        stage = self.bundle_context_manager.stage.name
        previous = dict(_CURRENT)
        _CURRENT["stage"] = stage
        _CURRENT["pcolls"] = _read_pcolls(self.bundle_context_manager)
        t0 = time.perf_counter()
        try:
            return orig_process(self, inputs, *args, **kwargs)
        finally:
            STAGES[stage]["wall_s"] += time.perf_counter() - t0
            STAGES[stage]["bundles"] += 1
            _CURRENT.update(previous)

    def send(self, process_bundle_id, read_transform_id, byte_streams):
        chunks = raw_chunks(byte_streams)  # a GroupingBuffer partitions here (timed as group_s)
        t1 = time.perf_counter()
        n = sum(len(c) for c in chunks if isinstance(c, (bytes, bytearray, memoryview)))  # not refs' chunks
        name, coder = _CURRENT["pcolls"].get(read_transform_id, (read_transform_id, "?"))
        STAGES[_CURRENT["stage"]]["in_bytes"] += n
        PCOLLS[name]["bytes"] += n
        PCOLLS[name]["chunks"] += len(chunks)
        CODERS[name] = coder
        orig_send(self, process_bundle_id, read_transform_id, chunks)
        STAGES[_CURRENT["stage"]]["send_s"] += time.perf_counter() - t1

    _wrap(bm, "process_bundle", lambda _: process_bundle)
    _wrap(bm, "_send_input_to_worker", lambda _: send)
    for cls in (execution.ListBuffer, execution.GroupingBuffer):
        _timed(cls, "append", "collect_s")
    _timed(execution.GroupingBuffer, "partition", "group_s")
    orig_encoded = bundle_processor.DataInputOperation.__dict__["process_encoded"]

    def process_encoded(self, encoded):
        before = self.index
        try:
            return orig_encoded(self, encoded)
        finally:
            name = _CURRENT["pcolls"].get(self.transform_id, (self.transform_id, "?"))[0]
            PCOLLS[name]["elements"] += self.index - before
            STAGES[_CURRENT["stage"]]["in_elements"] += self.index - before

    _wrap(bundle_processor.DataInputOperation, "process_encoded", lambda _: process_encoded)


def _timed(cls, method: str, key: str) -> None:
    def make(orig):
        def wrapper(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(self, *args, **kwargs)
            finally:
                STAGES[_CURRENT["stage"]][key] += time.perf_counter() - t0

        return wrapper

    _wrap(cls, method, make)


def report(top: int) -> str:
    lines = []
    total = collections.Counter()
    for c in STAGES.values():
        total.update(c)
    lines.append(
        f"all stages: {sum(c['bundles'] for c in STAGES.values())} bundles, {total['wall_s']:.1f} s in bundles, "
        f"{total['in_bytes'] / 1e6:.1f} MB / {total['in_elements']} elements in; runner side: send "
        f"{total['send_s']:.2f} s, collect {total['collect_s']:.2f} s, group {total['group_s']:.2f} s"
    )
    lines.append(
        f"\n{'wall_s':>7} {'MB_in':>8} {'elems_in':>9} {'send':>6} {'collect':>7} {'group':>6} {'bnd':>4}  stage"
    )
    for name, c in sorted(STAGES.items(), key=lambda kv: -kv[1]["wall_s"])[:top]:
        lines.append(
            f"{c['wall_s']:7.2f} {c['in_bytes'] / 1e6:8.1f} {c['in_elements']:9d} {c['send_s']:6.2f} "
            f"{c['collect_s']:7.2f} {c['group_s']:6.2f} {c['bundles']:4d}  {_short(name)}"
        )
    lines.append(f"\n{'MB':>8} {'elements':>9} {'B/elem':>8}  pcollection  [coder]")
    for name, c in sorted(PCOLLS.items(), key=lambda kv: -kv[1]["bytes"])[:top]:
        per = c["bytes"] / c["elements"] if c["elements"] else 0
        lines.append(
            f"{c['bytes'] / 1e6:8.1f} {c['elements']:9d} {per:8.0f}  {_short(name)}  [{CODERS.get(name, '?')[:110]}]"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", help="write the raw per-stage and per-PCollection counters here")
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- then memsieve's own arguments")
    args = parser.parse_args(argv)
    cli_args = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    from pipeline import beam_speedups, cli

    os.environ.setdefault("MEMSIEVE_STAGE_THREADS", "1")  # one current stage for the probes
    beam_speedups.install()  # memsieve's own patches first (as MEMSIEVE_BEAM_SPEEDUPS says), the probes on top
    install()

    t0 = time.perf_counter()
    rc = cli.main(cli_args)
    wall = time.perf_counter() - t0
    print(report(args.top))
    print(f"\nmemsieve exit {rc}, {wall:.1f} s wall")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"stages": STAGES, "pcollections": PCOLLS, "coders": CODERS, "wall_s": wall}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
