"""TensorBoard event files of a run, written with tensorboardX (no TensorFlow): `<workdir>/tensorboard/`.

Scalars (the tags a TensorBoard user sees):
  per epoch, x = the global train step at the epoch's end (the run's `TrainState.step`):
    `train/<phase>/<term>`  each metric the phase's train step returns, averaged over the epoch (the method's
                            loss terms, e.g. `ce`, `kd`, `lc`, `mr`, and their total `loss`)
    `lr/<phase>`            the learning rate (the epoch's mean)
  per task, x = the 0-based step t of results.json (t = 0 is the base task):
    `cnn/all`, `cnn/old`, `cnn/new` (and `nme/...`)      accuracy (%) after step t, as `steps[t]` of results.json
    `avg_incremental_accuracy/cnn`, `average_forgetting/cnn` (and `/nme`)   over steps 0..t; at the last step
                            they equal results.json's headline numbers

A `num_runs` group writes one directory per run (`<workdir>/run_k/tensorboard/`), so
`tensorboard --logdir <workdir>` shows each run as its own curve. Only process 0 writes. A `gs://` workdir is
written by tensorboardX's own Cloud Storage writer (google-cloud-storage), which uploads the whole event file
again at each flush (once per phase and per task).
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Optional, Sequence

import jax

from incremental_jax import metrics as metrics_lib
from incremental_jax import paths

SUBDIR = 'tensorboard'
KINDS = ('cnn', 'nme')
PARTS = ('all', 'old', 'new')
SUMMARY_KEYS = ('avg_incremental_accuracy', 'average_forgetting')


def available() -> bool:
  """Whether the writer library (tensorboardX) is installed (without importing it: it loads protobuf and more,
  which the first `TensorBoardLogger` does)."""
  return importlib.util.find_spec('tensorboardX') is not None


def summary_writer_class():
  """tensorboardX's `SummaryWriter`, imported without importing PyTorch.

  tensorboardX's writer module imports torch whenever it is installed, only so that torch tensors are accepted as
  values; this logger writes Python floats. With torch 2.13 installed (as it is for most users coming from the
  PyTorch toolboxes) that import cost the digits quick start 1.7 s and 170-290 MB of peak RSS. While tensorboardX
  is imported, `sys.modules['torch']` is None, Python's documented way to make `import torch` raise ImportError
  (tensorboardX catches it); a torch that is already imported is left as it is and used."""
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if 'torch' in sys.modules and sys.modules['torch'] is None:
      del sys.modules['torch']
  return SummaryWriter


class TensorBoardLogger:
  """Writes a run's scalars into `logdir` (module docstring)."""

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._opened = None

  @property
  def _writer(self):
    """The SummaryWriter, opened at the first write: a run that fails before writing leaves none open (an
    unused, unclosed tensorboardX writer starts a thread at interpreter exit, which Python 3.12 refuses)."""
    if self._opened is None:
      self._opened = summary_writer_class()(self.logdir)
    return self._opened

  def log_epoch(self, task: int, phase_name: str, epoch: int, global_step: int, metrics: dict) -> None:
    """One epoch's mean metrics of phase `phase_name` (`task` and `epoch` are 0-based; they name the point in
    messages only: TensorBoard's x axis is `global_step`)."""
    del task, epoch
    for name, value in metrics.items():
      tag = f'lr/{phase_name}' if name == 'lr' else f'train/{phase_name}/{name}'
      self._writer.add_scalar(tag, float(value), int(global_step))

  def log_phase(self, task: int, phase_name: str, epoch_metrics: Sequence[dict], start_step: int, end_step: int,
                first_epoch: int = 0) -> None:
    """Epochs `first_epoch ...` of a phase that ran from global step `start_step` to `end_step` (every epoch of a
    phase has the same number of steps, so epoch e ends at start_step + (e - first_epoch + 1) * steps_per_epoch)."""
    if not epoch_metrics:
      return
    per_epoch = (int(end_step) - int(start_step)) // len(epoch_metrics)
    for i, means in enumerate(epoch_metrics):
      self.log_epoch(task, phase_name, first_epoch + i, int(start_step) + (i + 1) * per_epoch, means)
    self._writer.flush()

  def log_task(self, steps_so_far: Sequence[dict]) -> None:
    """The evaluation of the last record of `steps_so_far` (results.json's `steps`), at x = its `step`."""
    record = steps_so_far[-1]
    t = int(record['step'])
    for kind in KINDS:
      for part in PARTS:
        if record.get(kind) and record[kind].get(part) is not None:
          self._writer.add_scalar(f'{kind}/{part}', float(record[kind][part]), t)
    summary = metrics_lib.summarize(steps_so_far)
    for key in SUMMARY_KEYS:
      for kind in KINDS:
        if summary[key].get(kind) is not None:
          self._writer.add_scalar(f'{key}/{kind}', float(summary[key][kind]), t)
    self._writer.flush()

  def log_tasks(self, records: Sequence[dict]) -> None:
    """The evaluations of every task of `records`, as `log_task` after each. A resumed run logs the records its
    checkpoint restored again (the same values at the same steps), so a process killed after a checkpoint but
    before its events reached the disk leaves no hole in the per-task curves."""
    for t in range(len(records)):
      self.log_task(records[:t + 1])

  def close(self) -> None:
    if self._opened is not None:
      self._opened.close()


def make_logger(config, workdir: str) -> Optional[TensorBoardLogger]:
  """The logger of the run in `workdir` when `config.tensorboard` is on, tensorboardX is installed and this is
  process 0; else None (the run's loop then skips every call)."""
  if not config.tensorboard or jax.process_index() != 0 or not available():
    return None
  return TensorBoardLogger(paths.join(workdir, SUBDIR))
