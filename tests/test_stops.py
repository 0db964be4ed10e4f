"""A stop request (SIGTERM) is honoured in every training loop, not only in the main phases: in a class-balanced
finetuning phase (resumed at that epoch, with the memory the task had selected), while a method trains a network
of its own (IE-KD's teacher: trained again; M2KD's pruned snapshot: the task's phases are kept), and the resumed
run equals the uninterrupted one. Also: old workdirs (removed config fields, an older method-state format) and a
rerun of a finished workdir."""
import contextlib
import json
import os
import signal

import pytest

import incremental_jax
from configs import iekd, lucir, m2kd
from incremental_jax import checkpoint as ckpt_lib
from incremental_jax import faults, preemption
from incremental_jax import train as train_lib
from incremental_jax.errors import CheckpointError


def _lucir_cbf():
  c = lucir.get_config('test')
  c.method.cb_finetune = True
  c.method.cbf_epochs = 3
  return c


@contextlib.contextmanager
def _sigterm_at(point: str, n: int):
  """SIGTERM to this process the n-th time `point` is reached (as `main.py` installs it)."""
  previous = signal.getsignal(signal.SIGTERM)
  preemption.install()
  faults.configure(f'{point}:{n}:term')
  try:
    yield
  finally:
    faults.configure('')
    signal.signal(signal.SIGTERM, previous)
    preemption.reset()


def _epoch_descs(monkeypatch, make_config, workdir) -> tuple[dict, list]:
  """An uninterrupted run's results and the progress description of each epoch end, in order (every loop:
  phases and networks a method trains)."""
  descs, original = [], train_lib.phase_epochs

  def phase_epochs(trainer, runs, images, desc=''):
    for end in original(trainer, runs, images, desc):
      descs.append((desc, end.epoch, int(runs[0].phase.optim.epochs)))
      yield end

  monkeypatch.setattr(train_lib, 'phase_epochs', phase_epochs)
  results = incremental_jax.train_and_evaluate(make_config(), workdir)
  monkeypatch.undo()
  return results, descs


def _stop_then_resume(make_config, workdir, n) -> tuple[str, dict]:
  with _sigterm_at('epoch_end', n), pytest.raises(preemption.Preempted) as e:
    incremental_jax.train_and_evaluate(make_config(), workdir)
  return str(e.value), incremental_jax.train_and_evaluate(make_config(), workdir)


def test_stop_in_a_balancing_phase_resumes_there(tmp_path, monkeypatch, comparable):
  reference, descs = _epoch_descs(monkeypatch, _lucir_cbf, str(tmp_path / 'reference'))
  n = next(i for i, (desc, epoch, _) in enumerate(descs) if 'balanced_finetune' in desc and epoch == 0) + 1
  message, resumed = _stop_then_resume(_lucir_cbf, str(tmp_path / 'run'), n)
  assert "stopped in step 1 (phase 'balanced_finetune', epoch 1) after saving checkpoint" in message, message
  assert comparable(resumed) == comparable(reference)


@pytest.mark.slow
def test_stop_while_a_teacher_trains_starts_it_over(tmp_path, monkeypatch, comparable):
  def config():
    c = iekd.get_config('test')
    c.method.teacher_optim.epochs = 2
    return c

  reference, descs = _epoch_descs(monkeypatch, config, str(tmp_path / 'reference'))
  assert descs[0][0] == 'step 0 teacher'
  message, resumed = _stop_then_resume(config, str(tmp_path / 'run'), 1)
  assert 'stopped while training step 0 teacher (epoch 1; this network is trained again from its start on resume) ' \
         'before any checkpoint' in message, message
  assert comparable(resumed) == comparable(reference)


@pytest.mark.slow
def test_stop_while_a_pruned_snapshot_trains_keeps_the_task(tmp_path, monkeypatch, comparable):
  reference, descs = _epoch_descs(monkeypatch, lambda: m2kd.get_config('test'), str(tmp_path / 'reference'))
  n = next(i for i, (desc, epoch, epochs) in enumerate(descs) if desc.startswith('step 1 ') and epoch + 1 < epochs) + 1
  trained, original = [], train_lib.phase_epochs
  with _sigterm_at('epoch_end', n), pytest.raises(preemption.Preempted) as e:
    incremental_jax.train_and_evaluate(m2kd.get_config('test'), str(tmp_path / 'run'))
  message = str(e.value)
  assert 'stopped while training step 1 ' in message and 'this network is trained again' in message, message

  def counting(trainer, runs, images, desc=''):
    trained.append(desc)
    return original(trainer, runs, images, desc)

  monkeypatch.setattr(train_lib, 'phase_epochs', counting)
  resumed = incremental_jax.train_and_evaluate(m2kd.get_config('test'), str(tmp_path / 'run'))
  assert not any(d.startswith('step 1/') for d in trained), trained   # task 1's phases came from the checkpoint
  assert comparable(resumed) == comparable(reference)


# ---- old and finished workdirs ------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('finished') / 'run')
  return workdir, incremental_jax.train_and_evaluate(lucir.get_config('test'), workdir)


def _edit_latest_meta(workdir, edit) -> int:
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  path = os.path.join(workdir, 'checkpoints', str(steps[-1]), 'meta', 'metadata')
  with open(path) as f:
    meta = json.load(f)
  edit(meta)
  with open(path, 'w') as f:
    json.dump(meta, f)
  return steps[-1]


def test_a_finished_workdir_is_not_rewritten(finished):
  workdir, results = finished
  before = open(os.path.join(workdir, 'results.json')).read()
  again = incremental_jax.train_and_evaluate(lucir.get_config('test'), workdir)
  assert open(os.path.join(workdir, 'results.json')).read() == before
  assert again['compilations'] == results['compilations'] > 0


def test_removed_config_fields_are_ignored_with_one_line(finished, tmp_path, capsys):
  import shutil
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished[0], workdir)
  os.remove(os.path.join(workdir, 'results.json'))   # the rerun then writes it from the checkpoint
  _edit_latest_meta(workdir, lambda m: m['config']['model'].update(bn_impl='fused', conv_impl='auto'))
  results = incremental_jax.train_and_evaluate(lucir.get_config('test'), workdir)
  err = capsys.readouterr().err
  assert [line for line in err.splitlines() if 'removed since' in line] == [
      'note: the checkpoint config sets model.bn_impl, model.conv_impl, removed since (they did not change results): '
      'ignored']
  assert results['steps'] == finished[1]['steps']


def test_an_older_method_state_format_is_refused_in_one_line(finished, tmp_path):
  import shutil
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished[0], workdir)
  step = _edit_latest_meta(workdir, lambda m: m.update(method_state_format=0))
  with pytest.raises(CheckpointError) as e:
    incremental_jax.train_and_evaluate(lucir.get_config('test'), workdir)
  assert str(e.value) == (
      f'checkpoint {step} in {os.path.join(workdir, "checkpoints")} holds lucir method state of format 0; this '
      'version reads format 1. Resume it with the incremental_jax version that wrote it, or use a new --workdir.')


def test_m2kd_checkpoints_without_a_format_are_the_old_snapshot_stack():
  """M2KD's fixed snapshot stack is format 2; a checkpoint that names none was written before it (format 1)."""
  from incremental_jax.methods.base import Method
  from incremental_jax.methods.m2kd import M2KD
  assert (Method.state_format, M2KD.state_format) == (1, 2)
  assert ckpt_lib.removed_fields({'model': {'bn_impl': 'flax', 'depth': 8}}) == ['model.bn_impl']
