"""Where training metrics go: JSON lines, TensorBoard, a progress display, a PNG.

All writers are host-side and written by process 0 only; the training loop hands them
plain Python floats.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

import jax

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"


class MetricWriter:
  """Appends ``{"step": s, **scalars}`` lines to ``metrics.jsonl`` and TensorBoard events.

  Appending (not truncating) keeps the history of a run that resumes; lines from steps
  after the restored checkpoint (written before an interruption) are dropped on open so
  the file tells one consistent story.
  """

  def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    _truncate_after(self.path, resume_step)
    if tensorboard:
      from tensorboardX import SummaryWriter  # only process 0 needs it
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Appends ``scalars`` at ``step`` to metrics.jsonl and the TensorBoard events."""
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, float(value), int(step))

  def close(self) -> None:
    """Flushes and closes the JSONL and TensorBoard writers."""
    if self._tb is not None:
      self._tb.close()


def _truncate_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  kept = [line for line in read_metrics(path) if line["step"] <= step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in kept)
  os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
  """All records of a ``metrics.jsonl`` file (a torn last line is skipped)."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


class Progress:
  """A tqdm bar with ETA on a terminal; plain log lines with ETA otherwise."""

  def __init__(self, total_steps: int, start_step: int, enabled: bool | None = None):
    self.total = total_steps
    self.start_step = start_step
    self.start_time = time.time()
    if enabled is None:
      enabled = sys.stderr.isatty()
    self._bar = None
    if enabled and jax.process_index() == 0:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def update(self, step: int, scalars: Mapping[str, float]) -> None:
    """Shows progress at ``step`` with ``scalars`` (bar on a terminal, a line otherwise)."""
    shown = {k: f"{v:.4g}" for k, v in scalars.items()
             if k in ("train_loss", "train_accuracy", "test_accuracy", "learning_rate")}
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix(shown, refresh=True)
      return
    done = step - self.start_step
    elapsed = time.time() - self.start_time
    eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
    # print, not logging: absl's INFO level would also bring every orbax message.
    if jax.process_index() == 0:
      print(f"step {step}/{self.total}  " + "  ".join(f"{k}={v}" for k, v in shown.items())
            + f"  elapsed {elapsed:.0f}s  eta {eta:.0f}s", flush=True)

  def close(self) -> None:
    """Closes the progress bar."""
    if self._bar is not None:
      self._bar.close()


def plot_curves(workdir: str) -> str | None:
  """Plots ``metrics.jsonl`` (losses, accuracies, learning rate, code changes) to a PNG."""
  path = os.path.join(workdir, METRICS_FILE)
  if jax.process_index() != 0 or not os.path.exists(path):
    return None
  # A bare Figure (no pyplot): pyplot.use("Agg") would switch off a notebook's inline plots.
  from matplotlib.figure import Figure

  records = read_metrics(path)
  panels = [("loss", ("train_loss", "test_loss")),
            ("accuracy", ("train_accuracy", "test_accuracy")),
            ("learning rate", ("learning_rate",)),
            ("codes changed since last log", ("sign_change_fraction",
                                              "exponent_change_fraction"))]
  fig = Figure(figsize=(4.5 * len(panels), 3.5))
  axes = fig.subplots(1, len(panels))
  for ax, (title, keys) in zip(axes, panels):
    for key in keys:
      points = [(r["step"], r[key]) for r in records if key in r]
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None, label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    if ax.lines:
      ax.legend(fontsize=7)
  fig.tight_layout()
  out = os.path.join(workdir, CURVES_FILE)
  fig.savefig(out, dpi=100)
  return out
