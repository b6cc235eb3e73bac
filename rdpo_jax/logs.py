"""Run logs: a console progress bar, `metrics.jsonl` and TensorBoard events in the workdir.

Only process 0 writes. Every record carries the step; scalars only (host floats).
"""

from __future__ import annotations

import json
import os
import time

import jax
import tqdm


class MetricLogger:
    def __init__(self, workdir: str, *, total_steps: int, start_step: int, tensorboard: bool = True):
        self.primary = jax.process_index() == 0
        self._jsonl = self._tb = self._bar = None
        if not self.primary:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            import tensorboardX

            self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                              smoothing=0.1)

    def write(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        if not self.primary:
            return
        record = {"step": step, "time": round(time.time(), 3), **{prefix + k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(prefix + k, float(v), step)
            self._tb.flush()

    def progress(self, step: int, shown: dict[str, float]) -> None:
        """Moves the bar to `step` with a few headline numbers (ETA comes from the bar's rate)."""
        if not self.primary:
            return
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=True)

    def message(self, text: str) -> None:
        if self.primary:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if not self.primary:
            return
        self._bar.close()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
