"""MetricsSink: writes a run's metrics.jsonl and TensorBoard events on the driver's node.

Rank 0 of the learner sends one row per iteration; the driver polls ``progress()`` for its progress bar.
A plain class, launched as a Ray actor pinned to the driver's node (or used in-process).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsSink:
    def __init__(self, run_dir: str, *, start_iteration: int = 0) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.last: dict[str, Any] = self._truncate(start_iteration)
        self._writer = None
        self._tb_dir = str(Path(run_dir) / "tensorboard")
        self.rows = 0
        self.start_iteration = start_iteration
        self.stop_at: int | None = None
        self.actors: bool | None = None  # the rollout and reward actors started (True) or failed (False)
        self.weights: tuple[list, int] | None = None

    def _truncate(self, start_iteration: int) -> dict[str, Any]:
        """On resume, drop rows of iterations the checkpoint does not contain (they will be redone); returns
        the last row kept ({} if none)."""
        if not self.path.exists():
            return {}
        keep, last = [], {}
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a row torn by a killed process; its iteration is redone
                continue
            if isinstance(row, dict) and row.get("iteration", -1) < start_iteration:
                keep.append(line)
                last = row
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in keep))
        tmp.replace(self.path)  # a crash while rewriting leaves the old file, never half of it
        return last

    def rewind(self, start_iteration: int) -> None:
        """The learner (re)starts at ``start_iteration``: rows of later iterations will be logged again."""
        self.last = self._truncate(start_iteration)
        self.start_iteration = start_iteration

    def request_stop(self) -> int:
        """Ctrl-C: every learner rank stops before the returned iteration. Rank 0 logs iteration L before
        the report barrier, so no rank has started L + 2 yet: all ranks stop at the same iteration."""
        if self.stop_at is None:
            logged = int(self.last["iteration"]) if self.last else self.start_iteration - 1
            self.stop_at = logged + 2
        return self.stop_at

    def stop_iteration(self) -> int | None:
        return self.stop_at

    def set_weights_ref(self, holder: list, version: int) -> None:
        """The latest weight push (``holder = [ObjectRef]``: wrapped, so Ray passes the reference and this actor
        keeps the object alive). Every learner rank can then re-sync a rollout actor it finds restarted."""
        self.weights = (holder, version)

    def weights_ref(self) -> tuple[Any, int] | None:
        """(ObjectRef, version) of the latest push: a reference in a returned tuple stays a reference."""
        return None if self.weights is None else (self.weights[0][0], self.weights[1])

    def set_actors_started(self, ok: bool) -> None:
        """The driver saw every rollout and reward actor answer (or one fail in its constructor)."""
        self.actors = ok

    def actors_started(self) -> bool | None:
        return self.actors

    def log(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        # TensorBoard's own writer: torch's SummaryWriter would import torch (~2 CPU-s per run) for it.
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        if self._writer is None:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._writer = EventFileWriter(self._tb_dir)
        scalars = [
            Summary.Value(tag=key, simple_value=float(value))
            for key, value in row.items()
            if "/" in key and isinstance(value, int | float) and math.isfinite(value)
        ]
        event = Event(wall_time=time.time(), step=int(row["iteration"]), summary=Summary(value=scalars))
        self._writer.add_event(event)
        self._writer.flush()
        self.last = row
        self.rows += 1

    def save_best(self, files: dict[str, bytes]) -> str:
        """The best-so-far trainable weights (by eval.select_metric) under runs/<name>/checkpoints/best, as
        the learner serialised them (``policies.checkpoint.trainable_files``): the sink never imports torch."""
        best = self.path.parent / "checkpoints" / "best"
        best.mkdir(parents=True, exist_ok=True)
        for name, blob in files.items():
            (best / Path(name).name).write_bytes(blob)
        return str(best)

    def record_placement(self, role: str, entries: list[dict[str, Any]], *, add: bool = False) -> None:
        """runs/<name>/placement.json: per role (rollout, reward, learner) where each process runs; ``add``
        merges learner ranks that report one by one."""
        path = self.path.parent / "placement.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        if add:
            kept = [e for e in data.get(role, []) if e.get("rank") not in {x.get("rank") for x in entries}]
            entries = sorted(kept + entries, key=lambda e: e.get("rank", 0))
        data[role] = entries
        path.write_text(json.dumps(data, indent=1) + "\n")

    def record_restart(self, entry: dict[str, Any], iteration: int) -> None:
        """A rollout or reward actor answered again after a failure (``entry``: role, index, placement):
        placement.json shows where it runs now and, under ``restarts``, when and where it moved."""
        path = self.path.parent / "placement.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        role, index = entry["role"], entry["index"]
        current = {k: v for k, v in entry.items() if k not in ("role", "index")}
        if index < len(data.get(role, [])):
            data[role][index] = current
        data.setdefault("restarts", []).append({**entry, "iteration": iteration})
        path.write_text(json.dumps(data, indent=1) + "\n")

    def progress(self) -> dict[str, Any]:
        return self.last

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
