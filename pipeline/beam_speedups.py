"""Beam's in-process costs, cut for a run: DoFn signature inspection memoised (``inspect``), the
in-process runner's data-plane copies (``plane``), grouping peak (``group``) and element size
sampling (``sizes``) cut.

Beam asks ``core.get_function_args_defaults`` for the arguments of every method of every DoFn
(``userstate.get_dofn_specs`` walks ``dir(dofn)``) each time it builds, translates, validates
or runs a stage: ~40k ``inspect.signature`` calls for an 80-stage graph, over a second of a 2k-row
run. Almost all of them are the same few hundred functions (``DoFn``'s own methods), so the answer
is cached per function object: a bound method's arguments are its function's minus the first, so
the key is the function and whether it was bound. Functions are held weakly (a cache entry goes
with its function); anything else (a ``functools.partial``, a callable object, a builtin) is
inspected as before. ``install()`` is idempotent and changes no result: the cached value is what
Beam's own function returns, copied so that no caller can alter the cache.

The in-process runner's per-byte costs: ``pipeline/beam_speedups_runner.py``; its per-element
encoding and decoding between stages (elements passed by reference, ``refs``):
``pipeline/beam_speedups_refs.py``.

``MEMSIEVE_BEAM_SPEEDUPS`` chooses what ``install()`` installs: ``all`` (the default), ``off``,
or a comma list of ``inspect`` (the caches), ``group``, ``plane``, ``sizes``, ``refs`` (which
brings ``plane``) and ``waves`` (independent bundles at once: ``pipeline/beam_speedups_waves.py``).
Each is idempotent and undone by ``uninstall()``.
"""

from __future__ import annotations

import inspect
import logging
import os
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
    from pipeline.beam_speedups_runner import PATCHES

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
    from pipeline.beam_speedups_runner import install_runner

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

    from pipeline.beam_speedups_runner import uninstall_runner

    uninstall_runner()

    if _ORIGINAL is not None:
        core.get_function_args_defaults = _ORIGINAL
        userstate.get_dofn_specs = _ORIGINAL_SPECS
    for cache in (*_CACHES, _SPECS):
        cache.clear()
