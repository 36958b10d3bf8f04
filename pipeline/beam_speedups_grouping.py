"""The runner's GroupByKey buffer (``GroupingBuffer``) holding values by reference (part of the
``refs`` patch, ``pipeline.beam_speedups_refs``).

Beam's runner groups a worker's output by the bytes of each key and keeps each value as the
bytes its worker's coder made (the runner's coders are the "safe" forms of the worker's: a
length-prefixed ``FastPrimitivesCoder`` is read as ``BytesCoder``). A chunk of values
(``Elements``) from a worker whose coder reads as the runner's does (``same_bytes``) is grouped
by the same key bytes (the key encoded as the worker's coder would, then read as the runner
reads it), its values kept as objects; ``partition`` then hands each part's groups on as one
chunk, each key decoded as the consuming worker would decode it and the values in arrival order,
under the worker's own grouped coder (``_Plan.post``), which encodes them to the very bytes
Beam's grouped coder would. A buffer that also receives bytes (or is merged with another) turns
its values into the runner's bytes first, so Beam's own methods see only what they expect.
Only the default windowing is held this way.
"""

from __future__ import annotations

from pipeline import beam_speedups_runner as runner
from pipeline.beam_speedups_refs import Elements


def same_bytes(theirs, ours) -> bool:
    """Whether coder ``ours`` (a worker's) writes bytes that ``theirs`` (the runner's) reads
    back as the same bytes: equal coders, a length prefix read as ``BytesCoder``, or tuples,
    iterables and windowed values of such."""
    from apache_beam.coders import coders

    if theirs == ours:
        return True
    if type(ours) is coders.LengthPrefixCoder:
        inner = theirs._value_coder if type(theirs) is coders.LengthPrefixCoder else theirs
        return type(inner) is coders.BytesCoder
    if type(theirs) is not type(ours) or type(ours) not in (
        coders.TupleCoder,
        coders.IterableCoder,
        coders.WindowedValueCoder,
    ):
        return False
    a, b = theirs._get_component_coders(), ours._get_component_coders()
    return len(a) == len(b) and all(same_bytes(x, y) for x, y in zip(a, b, strict=True))


class _Plan:
    """How a buffer holds one worker coder's values: the key and value coders on both sides and
    the worker's grouped coder."""

    def __init__(self, worker, buffer):
        from apache_beam.coders import coders

        self.worker = worker
        key, value = worker.wrapped_value_coder._get_component_coders()
        theirs_key, theirs_value = buffer._pre_grouped_coder.wrapped_value_coder._get_component_coders()
        self.key, self.value = key.get_impl(), value.get_impl()
        self.theirs_key, self.theirs_value = theirs_key.get_impl(), theirs_value.get_impl()
        self.post = coders.WindowedValueCoder(
            coders.TupleCoder([key, coders.IterableCoder(value)]), worker.window_coder
        )
        self.post_impl = self.post.get_impl()

    def table_key(self, key) -> bytes:
        """The runner's table key for a worker's key object."""
        return self.theirs_key.encode(self.theirs_key.decode_nested(self.key.encode_nested(key)))

    def worker_key(self, table_key: bytes):
        """The key object the consuming worker decodes from a table key."""
        return self.key.decode_nested(self.theirs_key.encode_nested(self.theirs_key.decode(table_key)))

    def runner_value(self, value):
        """A value object as the runner holds it when it reads the worker's bytes."""
        return self.theirs_value.decode_nested(self.value.encode_nested(value))


def plan_for(buffer, worker):
    """The buffer's ``_Plan`` for chunks under ``worker``'s coder, or None (Beam's bytes)."""
    from apache_beam.coders import coders

    plan = buffer.__dict__.get("memsieve_plan")
    if plan is not None:
        return plan if plan.worker == worker else None
    if buffer._table or not buffer._windowing.is_default():
        return None  # bytes already held (or windows to merge): stay with bytes
    pre, post = buffer._pre_grouped_coder, buffer._post_grouped_coder
    if type(worker) is not coders.WindowedValueCoder or type(worker.wrapped_value_coder) is not coders.TupleCoder:
        return None
    if type(pre) is not coders.WindowedValueCoder or type(pre.wrapped_value_coder) is not coders.TupleCoder:
        return None
    if len(worker.wrapped_value_coder._coders) != 2 or not same_bytes(pre, worker):
        return None
    plan = _Plan(worker, buffer)
    if not same_bytes(post, plan.post):
        return None
    buffer.memsieve_plan = plan
    return plan


def to_bytes(buffer) -> None:
    """Turn a buffer's value objects into the runner's values (Beam's own methods follow)."""
    plan = buffer.__dict__.pop("memsieve_plan", None)
    if plan is not None:
        for values in buffer._table.values():
            values[:] = [plan.runner_value(v) for v in values]


def install(gb) -> None:
    append, extend = gb.__dict__["append"], runner._original(gb, "extend")
    partition, iterate = gb.__dict__["partition"], runner._original(gb, "__iter__")

    def group_append(self, data):
        data = runner.resolve(data)
        if type(data) is Elements:
            plan = None if self._grouped_output else plan_for(self, data.coder)
            if plan is not None:
                table, table_key = self._table, plan.table_key
                for wv in data.values:
                    key, value = wv.value
                    table[table_key(key)].append(value)
                return None
            data = data.encoded()
        to_bytes(self)
        return append(self, data)

    def group_extend(self, other):
        if type(other) is gb:
            to_bytes(self)
            to_bytes(other)
        return extend(self, other)

    def group_partition(self, n):
        """Beam's ``partition``, each part's groups one ``Elements`` chunk (same groups, same
        order, same parts), where the values are held as objects."""
        plan = self.__dict__.get("memsieve_plan")
        if self._grouped_output or plan is None:
            return partition(self, n)
        window_it = runner._windowed_key_values(self)
        parts: list[list] = [[] for _ in range(n)]
        table = self._table
        for idx, table_key in enumerate(list(table)):
            parts[idx % n].extend(window_it(plan.worker_key(table_key), table.pop(table_key)))
        self._grouped_output = [[Elements(part, plan.post, plan.post_impl)] if part else [b""] for part in parts]
        table.clear()
        return self._grouped_output

    def group_iter(self):
        return map(lambda c: c.encoded() if type(c) is Elements else c, iterate(self))

    for name, new, orig in (
        ("append", group_append, append),
        ("extend", group_extend, extend),
        ("partition", group_partition, partition),
        ("__iter__", group_iter, iterate),
    ):
        new.__wrapped__ = orig
        runner._patch(gb, name, new)
