"""Beam's in-process runner passing elements by reference (``refs``): a stage's output reaches the
next stage's DoFns as the same Python objects, not encoded by the producing worker and decoded
again by the consuming one (nor decoded and re-encoded by the runner's GroupByKey).

memsieve's elements are batches (lists of captions, record tables, arrays): Beam 2.77's
in-process runner (FnApiRunner with its in-memory data channel) encodes each one when a stage
outputs it (``DataOutputOperation.process``: FastPrimitivesCoder walks every caption of a list,
pickles every array and table), the runner decodes every GroupByKey input and encodes the groups
again (``GroupingBuffer.append``/``partition``), and the consuming stage decodes it all again
(``DataInputOperation.process_encoded``). With the data plane's tokens (``plane``) the bytes
themselves already cross without copies; this patch drops the encoding itself where it changes
nothing a DoFn sees:

- **which outputs**: those whose windowed value coder is ``FastPrimitivesCoder`` (length
  prefixed or not; memsieve's batches), or a key-value ``TupleCoder`` of a deterministic
  FastPrimitivesCoder key and such a value. FastPrimitivesCoder decodes every value to an equal
  one of the same type, except Beam's lazy iterables (``_ITERABLE_LIKE_TYPES``, decoded as
  lists); a key decodes to itself when it is a ``str``, ``bytes``, ``int``, ``float``, ``None``
  or a tuple of them (``simple_key``); a key-value that is not a tuple decodes as a tuple. Any
  other element is encoded and decoded here, one at a time, so it arrives as Beam's coder would
  hand it over. Any other coder (``VarIntCoder``, ``RowCoder``, ``IterableCoder``...) keeps
  Beam's own bytes.
- **where**: a worker output (``DataOutputOperation``) writing to the in-memory channel while
  the runner's ``BundleManager.process_bundle`` runs (the ``plane`` patch's scope) collects
  the bundle's values (``WindowedValue``) in one ``Elements`` chunk, handed over by token just
  before the stream closes. The runner's ``ListBuffer`` holds the chunk as it holds bytes, its
  ``GroupingBuffer`` groups the values by their encoded key (keys are still encoded: grouping
  compares bytes) and, on the default windowing, hands groups on as chunks; the consuming
  worker outputs a chunk's values in order. Whatever reads a buffer as bytes (side inputs, the
  test-only split managers, a second Beam worker type) gets the chunk encoded by the coder that
  would have encoded it (``Elements.encoded``), so it reads the same bytes Beam would send.
- **what differs**: a stage's consumers (several stages reading one PCollection, as fused
  consumers of one stage already do) see the producer's objects, not copies: a DoFn must not
  alter its input or its output once emitted (Beam's contract; memsieve's DoFns build new
  values). Timestamps keep their microseconds (Beam's coder keeps milliseconds; memsieve runs
  in the global window). ``scripts/bench_plane.py`` counts a chunk's elements, not bytes.

``install_refs()`` needs the ``plane`` patch (``pipeline.beam_speedups_runner`` installs it
first) and is undone by its ``uninstall_runner()``.
"""

from __future__ import annotations

import inspect
import itertools
import types

from pipeline import beam_speedups_runner as runner

_SIMPLE_KEYS = (str, bytes, bool, float, type(None))
_INT64 = (-(1 << 63), 1 << 63)


class Elements:
    """A chunk of a data-plane stream as decoded values (``WindowedValue``), with the coder impl
    (a windowed value coder's) that encodes them as Beam would have."""

    __slots__ = ("values", "coder", "coder_impl")

    def __init__(self, values: list, coder, coder_impl):
        self.values, self.coder, self.coder_impl = values, coder, coder_impl

    def __len__(self) -> int:
        return len(self.values)

    def encoded(self) -> bytes:
        from apache_beam.coders.coder_impl import create_OutputStream

        out = create_OutputStream()
        for wv in self.values:
            self.coder_impl.encode_to_stream(wv, out, True)
        return out.get()


def as_bytes(chunk):
    """A buffered chunk as Beam's bytes."""
    return chunk.encoded() if type(chunk) is Elements else chunk


def _strip(coder):
    from apache_beam.coders import coders

    while type(coder) is coders.LengthPrefixCoder:
        coder = coder._value_coder
    return coder


def value_kind(windowed_coder) -> str | None:
    """``"fp"`` (FastPrimitivesCoder values), ``"kv"`` (a simple key and such a value) or None
    (Beam's bytes) for a data-plane stream's windowed value coder."""
    from apache_beam.coders import coders

    if type(windowed_coder) is not coders.WindowedValueCoder:
        return None
    value = _strip(windowed_coder.wrapped_value_coder)
    if type(value) is coders.FastPrimitivesCoder:
        return "fp"
    if type(value) is coders.TupleCoder and len(value._coders) == 2:
        key, val = (_strip(c) for c in value._coders)
        keys = (coders.DeterministicFastPrimitivesCoder, coders.DeterministicFastPrimitivesCoderV2)
        if type(key) in keys and type(val) is coders.FastPrimitivesCoder:
            return "kv"
    return None


_LAZY: frozenset = frozenset()


def lazy_iterables() -> frozenset:
    """Beam's lazy iterable types, which FastPrimitivesCoder encodes as lists (its
    ``_ITERABLE_LIKE_TYPES``: registered by Beam's modules, not readable from its compiled coder)."""
    global _LAZY
    if not _LAZY:
        from apache_beam.coders.coder_impl import _AbstractIterable, _ConcatSequence
        from apache_beam.runners.worker.bundle_processor import _ConcatIterable, _StateBackedIterable
        from apache_beam.transforms.trigger import _UnwindowedValues

        _LAZY = frozenset(
            {_AbstractIterable, _ConcatSequence, _ConcatIterable, _StateBackedIterable, _UnwindowedValues}
        )
    return _LAZY


def passes(value, kind: str) -> bool:
    """Whether ``value`` decodes to itself (same type, equal) under the ``kind`` of coder."""
    if kind == "fp":
        return exact(value)
    if type(value) is not tuple or len(value) != 2:
        return False
    return simple_key(value[0]) and exact(value[1])


_PRIMITIVE = frozenset({str, bytes, int, float, bool, type(None)})
_SEQUENCES = frozenset({list, tuple, set, frozenset})
_PICKLE_HOOKS = ("__getstate__", "__reduce__", "__reduce_ex__", "__getnewargs__", "__getnewargs_ex__")
_EXACT: dict[type, bool] = {}


def exact_type(t: type) -> bool:
    """Whether pickling (FastPrimitivesCoder's fallback) gives back an equal object of type ``t``
    as far as the type alone says: not one of Beam's lazy iterables, and no pickling hook of its
    own in Python (memsieve's ``spill.InputRows`` drops its rows, ``SampleRows``' accumulator its
    spare buffer: they cross a stage boundary encoded, as Beam would)."""
    hit = _EXACT.get(t)
    if hit is None:
        hooks = (inspect.getattr_static(t, name, None) for name in _PICKLE_HOOKS)
        own = any(isinstance(h, (types.FunctionType, classmethod, staticmethod)) for h in hooks)
        hit = _EXACT[t] = t not in (_LAZY or lazy_iterables()) and not own
    return hit


def exact(value, depth: int = 4) -> bool:
    """Whether ``value`` decodes to itself under FastPrimitivesCoder: its type (``exact_type``)
    and, for lists, tuples, sets and dicts, every item's, ``depth`` levels down (deeper: no).
    An object's attributes are not walked."""
    t = type(value)
    if t in _PRIMITIVE:
        return True
    if t in _SEQUENCES or t is dict:
        if depth == 0:
            return False
        items = value.items() if t is dict else value
        kinds = set(map(type, value.keys() if t is dict else value))
        if t is dict:
            kinds |= set(map(type, value.values()))
        if kinds <= _PRIMITIVE:
            return True
        if t is dict:
            return all(exact(k, depth - 1) and exact(v, depth - 1) for k, v in items)
        return all(exact(v, depth - 1) for v in items)
    return exact_type(t)


def simple_key(key) -> bool:
    """Whether a deterministic FastPrimitivesCoder decodes ``key`` to an equal key of the same
    type: ``str``, ``bytes``, ``bool``, ``float``, ``None``, a 64-bit ``int``, a tuple of them."""
    t = type(key)
    if t is int:
        return _INT64[0] <= key < _INT64[1]
    if t is tuple:
        return all(simple_key(k) for k in key)
    return t in _SIMPLE_KEYS


def _roundtrip(impl, wv):
    """``wv`` encoded and decoded by ``impl``: what Beam's consumer would have received."""
    from apache_beam.coders.coder_impl import create_InputStream, create_OutputStream

    out = create_OutputStream()
    impl.encode_to_stream(wv, out, True)
    return impl.decode_from_stream(create_InputStream(out.get()), True)


def install_refs() -> None:
    from apache_beam.runners.portability.fn_api_runner import execution, fn_runner
    from apache_beam.runners.worker import bundle_processor, data_plane

    _install_worker(bundle_processor)
    _install_buffers(execution)
    _install_send(fn_runner, execution, data_plane)


def _install_worker(bundle_processor) -> None:
    out_cls, in_cls = bundle_processor.DataOutputOperation, bundle_processor.DataInputOperation
    set_stream = runner._original(out_cls, "set_output_stream")
    process = runner._original(out_cls, "process")
    finish = runner._original(out_cls, "finish")
    process_encoded = in_cls.__dict__["process_encoded"]  # the plane's (resolving) wrapper

    def set_output_stream(self, output_stream):
        set_stream(self, output_stream)
        send = getattr(output_stream, "memsieve_send", None)
        kind = value_kind(self.windowed_coder) if send is not None else None
        self.memsieve_refs = (kind, [], send) if kind else None

    def process_ref(self, wv):
        refs = self.__dict__.get("memsieve_refs")
        if refs is None:
            return process(self, wv)
        kind, values, _ = refs
        values.append(wv if passes(wv.value, kind) else _roundtrip(self.windowed_coder_impl, wv))
        return None

    def finish_ref(self):
        refs = self.__dict__.get("memsieve_refs")
        if refs is not None:
            self.memsieve_refs = None
            _, values, send = refs
            if values and getattr(runner._SCOPE, "on", False):
                send(Elements(values, self.windowed_coder, self.windowed_coder_impl))
            else:  # outside the runner's scope: Beam's bytes
                for wv in values:
                    self.windowed_coder_impl.encode_to_stream(wv, self.output_stream, True)
        return finish(self)

    def process_input(self, data):
        data = runner.resolve(data)
        if type(data) is not Elements:
            return process_encoded(self, data)
        if data.coder != self.windowed_coder:  # a coder of its own: decode as Beam would
            return process_encoded(self, data.encoded())
        for wv in data.values:
            with self.splitting_lock:
                if self.index == self.stop - 1:
                    return None
                self.index += 1
            self.output(wv)
        return None

    for owner, name, new, orig in (
        (out_cls, "set_output_stream", set_output_stream, set_stream),
        (out_cls, "process", process_ref, process),
        (out_cls, "finish", finish_ref, finish),
        (in_cls, "process_encoded", process_input, process_encoded),
    ):
        new.__wrapped__ = orig
        runner._patch(owner, name, new)


def _install_buffers(execution) -> None:
    from pipeline import beam_speedups_grouping as grouping

    lb = execution.ListBuffer
    lb_partition, lb_iter = runner._original(lb, "partition"), runner._original(lb, "__iter__")

    def list_partition(self, n):
        if not (len(self._inputs) >= n or len(self._inputs) == 0):  # Beam decodes to re-split
            self._inputs = [as_bytes(c) for c in self._inputs]
        return lb_partition(self, n)

    def list_iter(self):
        return map(as_bytes, lb_iter(self))

    for owner, name, new, orig in (
        (lb, "partition", list_partition, lb_partition),
        (lb, "__iter__", list_iter, lb_iter),
    ):
        new.__wrapped__ = orig
        runner._patch(owner, name, new)
    grouping.install(execution.GroupingBuffer)


def raw_chunks(buffer):
    """A buffer's chunks as held (``Elements`` not encoded): what the in-memory channel sends."""
    from apache_beam.runners.portability.fn_api_runner import execution

    if type(buffer) is execution.ListBuffer and not buffer.cleared:
        return list(buffer._inputs)
    if type(buffer) is execution.GroupingBuffer:
        return list(itertools.chain(*buffer.partition(1)))
    return list(buffer or ())


def _install_send(fn_runner, execution, data_plane) -> None:
    """The stream of the in-memory channel offers ``memsieve_send`` (a chunk by token); the
    runner sends a buffer's chunks as held to an in-memory worker, as bytes to any other."""
    from apache_beam.portability.api import beam_fn_api_pb2

    cls = data_plane.InMemoryDataChannel
    stream_of = cls.__dict__["output_stream"]  # the plane's
    send_input = fn_runner.BundleManager.__dict__["_send_input_to_worker"]  # the plane's

    def output_stream(self, instruction_id, transform_id):
        stream = stream_of(self, instruction_id, transform_id)
        if getattr(runner._SCOPE, "on", False):
            inputs, message = self._inverse._inputs, beam_fn_api_pb2.Elements.Data

            def memsieve_send(chunk):
                data = runner.token(chunk)
                inputs.append(message(instruction_id=instruction_id, transform_id=transform_id, data=data))

            stream.memsieve_send = memsieve_send
        return stream

    def send(self, process_bundle_id, read_transform_id, byte_streams):
        chunks = raw_chunks(byte_streams)
        if type(self._worker_handler.data_conn) is not cls:
            chunks = [as_bytes(c) for c in chunks]
        return send_input(self, process_bundle_id, read_transform_id, chunks)

    output_stream.__wrapped__, send.__wrapped__ = stream_of, send_input
    runner._patch(cls, "output_stream", output_stream)
    runner._patch(fn_runner.BundleManager, "_send_input_to_worker", send)
