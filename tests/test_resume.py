"""Kill-and-resume: a run stopped after task k and resumed on the same workdir gives the results of an
uninterrupted run, without redoing the finished tasks."""
import json

import pytest

import incremental_jax
from configs import icarl
from incremental_jax import checkpoint as ckpt_lib
from incremental_jax import train as train_lib

TIMING = ('train_seconds', 'compilations')


def _strip(results):
  results = json.loads(json.dumps(results))
  for s in results['steps']:
    for k in TIMING:
      s.pop(k, None)
  for k in TIMING:
    results.pop(k, None)
  return results


def _config():
  c = icarl.get_config('test')
  c.method.kd_weight = 1.0
  return c


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
  full = incremental_jax.train_and_evaluate(_config(), str(tmp_path / 'full'))
  assert len(full['steps']) == 3

  original_run_phase = train_lib.phase_epochs

  def crash_in_task_2(trainer, runs, *args, **kwargs):
    if int(runs[0].task.index) == 2:
      raise RuntimeError('simulated crash')
    return original_run_phase(trainer, runs, *args, **kwargs)

  # the crash stops the run while task 1's checkpoint may still be written: it is completed and reported
  monkeypatch.setattr(train_lib, 'phase_epochs', crash_in_task_2)
  with pytest.raises(RuntimeError, match='simulated crash'):
    incremental_jax.train_and_evaluate(_config(), str(tmp_path / 'resumed'))
  partial = json.loads((tmp_path / 'resumed' / 'results.json').read_text())
  assert partial['complete'] is False and len(partial['steps']) == 2
  monkeypatch.undo()

  trained_tasks = []

  def counting_run_phase(trainer, runs, *args, **kwargs):
    trained_tasks.append(int(runs[0].task.index))
    return original_run_phase(trainer, runs, *args, **kwargs)

  monkeypatch.setattr(train_lib, 'phase_epochs', counting_run_phase)
  resumed = incremental_jax.train_and_evaluate(_config(), str(tmp_path / 'resumed'))
  assert trained_tasks == [2]  # tasks 0 and 1 came from the checkpoint
  assert _strip(resumed) == _strip(full)


def test_resume_refuses_a_different_config(tmp_path):
  c = _config()
  c.data.increment = 6
  c.data.initial_classes = 4
  incremental_jax.train_and_evaluate(c, str(tmp_path / 'run'))
  other = _config()
  other.data.increment = 6
  other.data.initial_classes = 4
  other.optim.lr = 0.5
  with pytest.raises(ckpt_lib.CheckpointError, match='optim.lr'):
    incremental_jax.train_and_evaluate(other, str(tmp_path / 'run'))


def test_foreign_directory_is_refused(tmp_path):
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  (tmp_path / 'run' / 'checkpoints' / 'model.pt').write_text('not ours')
  with pytest.raises(ckpt_lib.CheckpointError, match='not checkpoints of this project'):
    incremental_jax.train_and_evaluate(_config(), str(tmp_path / 'run'))
