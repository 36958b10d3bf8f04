"""What a ``pipeline.dask_runner`` run gives back: its state once the final future is in, Beam
metrics merged from the workers, and (``MEMSIEVE_DASK_PROFILE=FILE``) where the workers' time went."""

from __future__ import annotations

import json
import logging
import time

from apache_beam.runners.runner import PipelineResult, PipelineState

log = logging.getLogger("pipeline.dask_runner")


class DaskResult(PipelineResult):
    """Waits for the pipeline's one final future, then closes the client this run opened."""

    def __init__(self, client, futures, run_id: str, profile: str | None = None, started: float = 0.0):
        super().__init__(PipelineState.RUNNING)
        self.client, self.futures, self.run_id = client, futures, run_id
        self.profile, self.started = profile, started
        self._metrics = None

    def wait_until_finish(self, duration=None) -> str:
        from pipeline import dask_tasks

        if self._state != PipelineState.RUNNING:
            return self._state
        try:
            self.client.gather(self.futures)  # raises a worker's error here
            self._state = PipelineState.DONE
            self._metrics = _merge_metrics(self.client.run(dask_tasks.metric_updates, self.run_id))
            if self.profile:
                cpu = self.client.run(dask_tasks.cpu_seconds, self.run_id)
                moved = self.client.run(dask_tasks.transfers)
                self.client.run(dask_tasks.dump_profile, self.profile + ".prof")
                stream = self.client.get_task_stream(start=self.started)
                _write_profile(stream, self.profile, self.started, cpu, moved)
        except BaseException:
            self._state = PipelineState.FAILED
            raise
        finally:
            self.client.close()
        return self._state

    def cancel(self) -> str:
        self.client.cancel(self.futures)
        self._state = PipelineState.CANCELLED
        return self._state

    def metrics(self):
        if self._metrics is None:
            raise NotImplementedError("metrics are collected when the pipeline has finished")
        return self._metrics


def _merge_metrics(per_worker: dict):
    """Every worker's metric updates -> Beam's DirectMetrics (committed = attempted here)."""
    from apache_beam.runners.direct.direct_metrics import DirectMetrics

    metrics = DirectMetrics()
    for updates in per_worker.values():
        for u in updates:
            metrics.commit_logical(None, u)
            metrics.commit_physical(object(), u)
    return metrics


def _write_profile(records: list[dict], path: str, started: float, cpu: dict, moved: dict) -> None:
    """Seconds of compute, transfer and deserialisation per step (``label|kind``), busiest first,
    each worker's CPU seconds per ParDo, and the results fetched from another worker per step."""
    steps: dict[str, dict] = {}
    for per_worker in moved.values():
        for step, m in per_worker.items():
            entry = steps.setdefault(step, {"tasks": 0})
            for k, v in m.items():
                entry[f"fetched_{k}"] = entry.get(f"fetched_{k}", 0) + v
    for per_worker in cpu.values():
        for step, seconds in per_worker.items():
            entry = steps.setdefault(f"{step}|dofn", {"tasks": 0})
            entry["cpu"] = entry.get("cpu", 0.0) + seconds
    for r in records:
        key = r["key"] if isinstance(r["key"], str) else r["key"][0]
        entry = steps.setdefault(key.rsplit("-", 1)[0], {"tasks": 0})
        entry["tasks"] += 1
        for ss in r["startstops"]:
            entry[ss["action"]] = entry.get(ss["action"], 0.0) + ss["stop"] - ss["start"]
    ranked = dict(sorted(steps.items(), key=lambda kv: -sum(v for k, v in kv[1].items() if k in _SECONDS)))
    totals: dict[str, float] = {}
    for entry in steps.values():
        for k, v in entry.items():
            totals[k] = totals.get(k, 0) + v
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"wall_s": time.time() - started, "totals": totals, "steps": ranked}, f, indent=1)
    log.info("dask profile -> %s: %s", path, totals)


_SECONDS = ("cpu", "compute", "transfer", "deserialize", "disk-read", "disk-write")
