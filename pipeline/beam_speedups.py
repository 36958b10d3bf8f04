"""Beam's in-process costs, cut for a run: DoFn signature inspection memoised (``inspect``), the
in-process runner's data-plane copies (``plane``) and element size sampling (``sizes``) removed.

Beam asks ``core.get_function_args_defaults`` for the arguments of every method of every DoFn
(``userstate.get_dofn_specs`` walks ``dir(dofn)``) each time it builds, translates, validates
or runs a stage: ~40k ``inspect.signature`` calls for an 80-stage graph, over a second of a 2k-row
run. Almost all of them are the same few hundred functions (``DoFn``'s own methods), so the answer
is cached per function object: a bound method's arguments are its function's minus the first, so
the key is the function and whether it was bound. Functions are held weakly (a cache entry goes
with its function); anything else (a ``functools.partial``, a callable object, a builtin) is
inspected as before. ``install()`` is idempotent and changes no result: the cached value is what
Beam's own function returns, copied so that no caller can alter the cache.

Beam's in-process runner (FnApiRunner), its per-byte cost cut too. memsieve's elements are
batches (a shard's Arrow columns, a cell's vectors, a bucket's lists): few, large elements. Beam
2.77's in-process runner costs in proportion to their bytes in two places that change none of
them:

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
- **size sampling** (``sizes``): every output of every transform counts its elements and, for
  the first ten and then ~10/N of them, *encodes* the element to estimate its size for the
  ``sampled_byte_size`` system metric (``OperationCounters.do_sample``). For a batch element
  that is a full pickle of it, once per edge of the graph, fused edges included, for a metric
  memsieve never reads (it reads user counters only). The patch turns the estimate off on each
  output counter that has no runtime type constraint (``--runtime_type_check`` and
  ``--performance_runtime_type_check`` check the sampled elements: those counters keep
  sampling). Element counts stay.

``MEMSIEVE_BEAM_SPEEDUPS`` chooses what ``install()`` installs: ``all`` (the default), ``off``,
or a comma list of ``inspect`` (the caches), ``plane`` and ``sizes``. Each is idempotent and
undone by ``uninstall()``.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import threading
import types
import weakref

log = logging.getLogger(__name__)

_ORIGINAL = None
_ORIGINAL_SPECS = None
_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # DoFn class -> facts, specs by shadow
_CACHES: tuple[weakref.WeakKeyDictionary, weakref.WeakKeyDictionary] = (
    weakref.WeakKeyDictionary(),  # plain functions
    weakref.WeakKeyDictionary(),  # functions seen bound (first argument dropped)
)


def cached_args_defaults(f):
    """``apache_beam.transforms.core.get_function_args_defaults``, memoised per function."""
    bound = isinstance(f, types.MethodType)
    target = f.__func__ if bound else f
    if not isinstance(target, types.FunctionType):
        return _ORIGINAL(f)
    cache = _CACHES[bound]
    hit = cache.get(target)
    if hit is None or hit[0] is not target.__code__ or hit[1] is not target.__defaults__:
        hit = (target.__code__, target.__defaults__, *_ORIGINAL(f))
        cache[target] = hit
    return list(hit[2]), list(hit[3])


def _class_facts(cls) -> tuple[frozenset, frozenset, bool]:
    """-> (the class's attribute names, the X of its ``_inspect_X`` hooks, whether attributes are
    computed: a ``__getattr__`` or a property other than ``DoFn``'s own boolean flags)."""
    from apache_beam.transforms.core import DoFn

    names = frozenset(dir(cls))
    hooks = frozenset(n[len("_inspect_") :] for n in names if n.startswith("_inspect_"))
    props = {n for n in names if isinstance(inspect.getattr_static(cls, n, None), property)}
    own_props = {n for n in props if inspect.getattr_static(cls, n) is not inspect.getattr_static(DoFn, n, None)}
    return names, hooks, hasattr(cls, "__getattr__") or bool(own_props)  # DoFn's own properties: flags


def cached_dofn_specs(dofn):
    """``apache_beam.transforms.userstate.get_dofn_specs``, memoised per DoFn class and the set of
    class attributes its instance shadows, where those alone decide the answer: no instance
    attribute is a bound method, no attribute is computed, and every ``_inspect_X`` hook's X is
    shadowed (``CallableWrapperDoFn``: its ``process`` is the wrapped callable, which Beam skips
    unless it is a bound method); anything else is inspected as before."""
    cls = type(dofn)
    facts = _SPECS.get(cls)
    if facts is None:
        facts = _SPECS[cls] = (*_class_facts(cls), {})
    names, hooks, dynamic, by_shadow = facts
    own = getattr(dofn, "__dict__", None)
    if dynamic or own is None or any(isinstance(v, types.MethodType) for v in own.values()):
        return _ORIGINAL_SPECS(dofn)
    shadow = frozenset(n for n in own if n in names)
    if not hooks <= shadow:
        return _ORIGINAL_SPECS(dofn)
    hit = by_shadow.get(shadow)
    if hit is None:
        hit = by_shadow[shadow] = _ORIGINAL_SPECS(dofn)
    return set(hit[0]), set(hit[1])


def enabled() -> list[str]:
    """The speedups ``MEMSIEVE_BEAM_SPEEDUPS`` asks for (unknown names are logged and skipped)."""
    known = ["inspect", *PATCHES]
    raw = os.environ.get("MEMSIEVE_BEAM_SPEEDUPS", "all").strip().lower()
    if raw in ("", "all", "on", "1"):
        return known
    if raw in ("off", "none", "0"):
        return []
    names = [n.strip() for n in raw.split(",") if n.strip()]
    for name in names:
        if name not in known:
            log.warning("MEMSIEVE_BEAM_SPEEDUPS: unknown speedup %r (known: %s)", name, ", ".join(known))
    return [n for n in known if n in names]


def install() -> None:
    """Route Beam's argument and state-spec inspection through the caches (once per process),
    and install the runner patches ``enabled()`` names."""
    names = enabled()
    install_runner(names)
    if "inspect" in names:
        _install_inspect()


def _install_inspect() -> None:
    global _ORIGINAL, _ORIGINAL_SPECS
    from apache_beam.transforms import core, userstate

    if _ORIGINAL is None:
        _ORIGINAL = core.get_function_args_defaults
        _ORIGINAL_SPECS = userstate.get_dofn_specs
    core.get_function_args_defaults = cached_args_defaults
    userstate.get_dofn_specs = cached_dofn_specs


def uninstall() -> None:
    """Beam's own inspection and runner again (tests)."""
    from apache_beam.transforms import core, userstate

    uninstall_runner()

    if _ORIGINAL is not None:
        core.get_function_args_defaults = _ORIGINAL
        userstate.get_dofn_specs = _ORIGINAL_SPECS
    for cache in (*_CACHES, _SPECS):
        cache.clear()


# --- the in-process runner's per-byte costs ---

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
    """Wrap ``owner.name`` so that this thread's token scope is ``on`` while it runs."""
    orig = _original(owner, name)

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
    """Wrap ``owner.name(self, data)`` so that it receives a token's payload."""
    orig = _original(owner, name)

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
                payload = chunk if type(chunk) is bytes else bytes(chunk)
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


PATCHES = {"plane": install_plane, "sizes": install_sizes}


def install_runner(names) -> None:
    """Install the named runner patches not installed yet."""
    for name in names:
        if name in PATCHES and name not in _INSTALLED:
            PATCHES[name]()
            _INSTALLED.add(name)


def uninstall_runner() -> None:
    """Beam's own runner methods again (tests); parked payloads are dropped."""
    for (owner, name), value in _SAVED.items():
        setattr(owner, name, value)
    _SAVED.clear()
    _INSTALLED.clear()
    _PAYLOADS.clear()
