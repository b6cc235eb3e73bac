"""Run logs: a console progress bar, `metrics.jsonl` and TensorBoard events in the workdir.

Only process 0 writes. Every record carries the step; scalars only (host floats). On a terminal the bar
redraws in place; anywhere else (a log file, a pod's captured stderr) it prints a plain line at most
every `LOG_FILE_INTERVAL_S` seconds and at the end, never carriage returns.
"""

from __future__ import annotations

import json
import os
import sys
import time

import tqdm

LOG_FILE_INTERVAL_S = 30.0


class _Lines:
    """A file for tqdm that turns each redraw into one line."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self._stream.write(text + "\n")

    def flush(self) -> None:
        self._stream.flush()


def bar(iterable=None, *, desc: str, **kwargs) -> tqdm.tqdm:
    """`tqdm.tqdm(iterable, **kwargs)` on a terminal; elsewhere a line like
    `sample: 120/512 [00:30<01:38, 4.00prompt/s]` every `LOG_FILE_INTERVAL_S` seconds and at the end."""
    if sys.stderr.isatty():
        return tqdm.tqdm(iterable, desc=desc, dynamic_ncols=True, **kwargs)
    return tqdm.tqdm(iterable, desc=desc, file=_Lines(sys.stderr), mininterval=LOG_FILE_INTERVAL_S,
                     bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]", **kwargs)


class MetricLogger:
    def __init__(self, workdir: str, *, total_steps: int, start_step: int, tensorboard: bool = True):
        import jax  # here, so that the data_prep commands that only need `bar` do not import jax

        self.primary = jax.process_index() == 0
        self._jsonl = self._tb = self._bar = None
        if not self.primary:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            import tensorboardX

            self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._bar = bar(total=total_steps, initial=start_step, unit="step", desc="train", smoothing=0.1)

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
        # The postfix first, then the move: the bar's own pacing decides whether this draws (always on a
        # terminal, every LOG_FILE_INTERVAL_S seconds elsewhere).
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        self._bar.update(step - self._bar.n)

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
