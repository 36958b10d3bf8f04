"""Beam's in-process runner (FnApiRunner), its per-byte cost cut for a run. memsieve's elements are
batches (a shard's Arrow columns, a cell's vectors, a bucket's lists): few, large elements. Beam
2.77's in-process runner costs in proportion to their bytes in three places that change none
of them:

- **the data plane** (``plane``): between the runner and its in-process worker every byte of a
  stage's input and output is copied 5-8 times (written into a buffering stream, read out of
  it, copied into a protobuf ``Elements.Data`` message, and copied out again each time its
  ``data`` field is read: once to test it is non-empty, once to use it), each copy a fresh
  allocation, so at ~1 GB/s rather than memcpy's speed. With the patch a message carries a
  40-byte token instead (a per-process random prefix and a counter) and the payload waits in a
  table until the one reader that consumes it (``resolve``: the worker's
  ``DataInputOperation.process_encoded``, the runner's ``ListBuffer``/``GroupingBuffer.append``)
  takes it back. Tokens are made only where such a reader is certain: the runner's input to a
  bundle over an ``InMemoryDataChannel`` (one message per buffered chunk, each of whole
  elements, in order, so the worker decodes the same elements in the same order), and worker
  output while this thread runs ``BundleManager.process_bundle`` but not
  ``GroupingBuffer.partition`` (whose merging-window path reads worker output itself). Timers,
  gRPC channels and every other path stay Beam's own.
- **grouping** (``group``): ``GroupingBuffer.partition`` encodes every group of a GroupByKey
  into one stream per part while the decoded table stays whole, so a stage's grouped input is
  held twice at its peak. The patch encodes the same groups in the same order into the same
  parts, but releases each group's values once encoded and cuts the output into chunks of
  whole groups (8 MB).
- **size sampling** (``sizes``): every output of every transform counts its elements and, for
  the first ten and then ~10/N of them, *encodes* the element to estimate its size for the
  ``sampled_byte_size`` system metric (``OperationCounters.do_sample``). For a batch element
  that is a full pickle of it, once per edge of the graph, fused edges included, for a metric
  memsieve never reads (it reads user counters only). The patch turns the estimate off on each
  output counter that has no runtime type constraint (``--runtime_type_check`` and
  ``--performance_runtime_type_check`` check the sampled elements: those counters keep
  sampling). Element counts stay.

- **elements by reference** (``refs``): ``pipeline/beam_speedups_refs.py``.
- **independent bundles at once** (``waves``): ``pipeline/beam_speedups_waves.py``.

``install_runner(names)`` installs the named patches (idempotent; on Beam 2.77 only, whose
internals they replace); ``uninstall_runner()`` restores Beam's own methods.
``pipeline.beam_speedups.install()`` calls it for a run.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading

_SAVED: dict[tuple[object, str], object] = {}
_INSTALLED: set[str] = set()
_MAGIC = b"\xffmemsieve-plane\x00" + os.urandom(16)  # 32 bytes, then an 8-byte counter
_TOKEN_LEN = len(_MAGIC) + 8
_PAYLOADS: dict[bytes, bytes] = {}  # token -> payload, until its reader takes it
_COUNTER = itertools.count()
_SCOPE = threading.local()  # .on: this thread is in BundleManager.process_bundle (tokens are read)


def token(payload: bytes) -> bytes:
    """Park ``payload``; -> the 40-byte token that ``resolve`` turns back into it (once)."""
    key = _MAGIC + next(_COUNTER).to_bytes(8, "little")
    _PAYLOADS[key] = payload
    return key


def resolve(data):
    """A token's payload (taken out of the table), or ``data`` itself when it is no token."""
    if type(data) is bytes and len(data) == _TOKEN_LEN and data.startswith(_MAGIC):
        try:
            return _PAYLOADS.pop(data)
        except KeyError:
            raise RuntimeError("beam_speedups: a data-plane payload was read twice or lost") from None
    return data


def pending() -> int:
    """Payloads parked and not yet read (0 between bundles)."""
    return len(_PAYLOADS)


def _patch(owner, name: str, new) -> None:
    if (owner, name) not in _SAVED:
        _SAVED[owner, name] = owner.__dict__[name]
    setattr(owner, name, new)


def _original(owner, name: str):
    return _SAVED.get((owner, name), owner.__dict__[name])


def _scoped(owner, name: str, on: bool) -> None:
    """Wrap ``owner.name`` (as it is now) so that this thread's token scope is ``on`` while it runs."""
    orig = owner.__dict__[name]

    def wrapper(self, *args, **kwargs):
        prev = getattr(_SCOPE, "on", False)
        _SCOPE.on = on
        try:
            return orig(self, *args, **kwargs)
        finally:
            _SCOPE.on = prev

    wrapper.__wrapped__ = orig
    _patch(owner, name, wrapper)


def _resolving(owner, name: str) -> None:
    """Wrap ``owner.name(self, data)`` (as it is now) so that it receives a token's payload."""
    orig = owner.__dict__[name]

    def wrapper(self, data):
        return orig(self, resolve(data))

    wrapper.__wrapped__ = orig
    _patch(owner, name, wrapper)


def install_plane() -> None:
    from apache_beam.portability.api import beam_fn_api_pb2
    from apache_beam.runners.portability.fn_api_runner import execution, fn_runner
    from apache_beam.runners.worker import bundle_processor, data_plane

    data_message = beam_fn_api_pb2.Elements.Data
    channel = data_plane.InMemoryDataChannel
    create_stream = data_plane.ClosableOutputStream.create
    send = _original(fn_runner.BundleManager, "_send_input_to_worker")
    output_stream = _original(channel, "output_stream")

    def send_input(self, process_bundle_id, read_transform_id, byte_streams):
        conn = self._worker_handler.data_conn
        if type(conn) is not channel:
            return send(self, process_bundle_id, read_transform_id, byte_streams)
        inputs = conn.inverse()._inputs
        for chunk in byte_streams or ():
            if len(chunk):  # Beam's one message holds them all; an empty one is skipped by its reader
                payload = bytes(chunk) if isinstance(chunk, (bytearray, memoryview)) else chunk  # or refs' chunk
                inputs.append(
                    data_message(instruction_id=process_bundle_id, transform_id=read_transform_id, data=token(payload))
                )
        return None

    def tokenized_stream(self, instruction_id, transform_id):
        if not getattr(_SCOPE, "on", False):
            return output_stream(self, instruction_id, transform_id)
        inputs = self._inverse._inputs

        def add_to_inverse_output(data):
            if getattr(_SCOPE, "on", False) and data:
                data = token(data)
            inputs.append(data_message(instruction_id=instruction_id, transform_id=transform_id, data=data))

        return create_stream(add_to_inverse_output, add_to_inverse_output, self._data_buffer_time_limit_ms)

    send_input.__wrapped__, tokenized_stream.__wrapped__ = send, output_stream
    _scoped(fn_runner.BundleManager, "process_bundle", True)
    _scoped(execution.GroupingBuffer, "partition", False)
    _patch(fn_runner.BundleManager, "_send_input_to_worker", send_input)
    _patch(channel, "output_stream", tokenized_stream)
    for owner, name in (
        (bundle_processor.DataInputOperation, "process_encoded"),
        (execution.ListBuffer, "append"),
        (execution.GroupingBuffer, "append"),
    ):
        _resolving(owner, name)


def unsample(ops) -> int:
    """Turn off the size estimate of every output counter of ``ops`` (a BundleProcessor's
    operations) that type-checks nothing; -> how many were turned off."""
    n = 0
    for op in ops:
        for receiver in getattr(op, "receivers", None) or ():
            counter = getattr(receiver, "opcounter", None)
            if counter is None or counter.output_type_constraints or counter.coder_impl is None:
                continue
            counter.coder_impl = None  # OperationCounters._should_sample: no coder, no sample
            n += 1
    return n


def install_sizes() -> None:
    from apache_beam.runners.worker import bundle_processor

    cls = bundle_processor.BundleProcessor
    init = _original(cls, "__init__")

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        unsample(self.ops.values())

    __init__.__wrapped__ = init
    _patch(cls, "__init__", __init__)


_CHUNK = 8 << 20  # a grouped output chunk: cut past 8 MB


def _partition(self, n: int):
    """``GroupingBuffer.partition``, each group's values released as soon as it is encoded and
    the output cut into chunks of whole groups (Beam's encodes every group into one stream per
    part while the decoded table stays whole). Same groups, same order, same parts."""
    if self._grouped_output:
        return self._grouped_output
    from apache_beam.coders.coder_impl import create_OutputStream

    prev = getattr(_SCOPE, "on", False)
    _SCOPE.on = False  # a merging window's trigger driver reads worker output itself
    try:
        windowed_key_values = _windowed_key_values(self)
        coder_impl = self._post_grouped_coder.get_impl()
        key_decode = self._key_coder.get_impl().decode
        chunks = [[] for _ in range(n)]
        streams = [create_OutputStream() for _ in range(n)]
        table = self._table
        for idx, encoded_key in enumerate(list(table)):
            values = table.pop(encoded_key)
            stream = streams[idx % n]
            for wkvs in windowed_key_values(key_decode(encoded_key), values):
                coder_impl.encode_to_stream(wkvs, stream, True)
            del values
            if stream.size() >= _CHUNK:
                chunks[idx % n].append(stream.get())
                streams[idx % n] = create_OutputStream()
        for part, stream in zip(chunks, streams, strict=True):
            if stream.size() or not part:
                part.append(stream.get())
        self._grouped_output = chunks
        table.clear()
        return chunks
    finally:
        _SCOPE.on = prev


def _windowed_key_values(self):
    """Beam's per-key output function of ``GroupingBuffer.partition`` (its first lines)."""
    from apache_beam.transforms import trigger
    from apache_beam.transforms.window import GlobalWindow, GlobalWindows
    from apache_beam.utils import windowed_value

    if not self._windowing.is_default():
        return trigger.create_trigger_driver(self._windowing, True).process_entire_key
    pane = windowed_value.PaneInfo(
        is_first=True, is_last=True, timing=windowed_value.PaneInfoTiming.ON_TIME, index=0, nonspeculative_index=0
    )
    window_it = GlobalWindows.windowed_value(None, timestamp=GlobalWindow().max_timestamp(), pane_info=pane).with_value
    return lambda key, values: [window_it((key, values))]


def install_group() -> None:
    from apache_beam.runners.portability.fn_api_runner import execution

    cls = execution.GroupingBuffer
    _partition.__wrapped__ = cls.__dict__["partition"]
    _patch(cls, "partition", _partition)


def install_refs() -> None:
    """``pipeline.beam_speedups_refs`` (elements by reference), over the ``plane`` patch."""
    from pipeline.beam_speedups_refs import install_refs as install

    if "plane" not in _INSTALLED:
        install_plane()
        _INSTALLED.add("plane")
    install()


def install_waves() -> None:
    """``pipeline.beam_speedups_waves`` (a wave's independent bundles on a thread pool)."""
    from pipeline.beam_speedups_waves import install_waves as install

    install()


PATCHES = {
    "group": install_group,
    "plane": install_plane,
    "sizes": install_sizes,
    "refs": install_refs,
    "waves": install_waves,
}


BEAM_VERSION = "2.77."  # the internals these patches replace are this release's


def install_runner(names) -> None:
    """Install the named runner patches not installed yet (none on another Beam release)."""
    import apache_beam

    if names and not apache_beam.__version__.startswith(BEAM_VERSION):
        logging.getLogger(__name__).warning(
            "beam_speedups: Beam %s, not %sx: the runner patches are not installed",
            apache_beam.__version__,
            BEAM_VERSION,
        )
        return
    for name in PATCHES:  # in this order: each wraps what the ones before it left
        if name in names and name not in _INSTALLED:
            PATCHES[name]()
            _INSTALLED.add(name)


def uninstall_runner() -> None:
    """Beam's own runner methods again (tests); parked payloads are dropped."""
    for (owner, name), value in _SAVED.items():
        setattr(owner, name, value)
    _SAVED.clear()
    _INSTALLED.clear()
    _PAYLOADS.clear()
