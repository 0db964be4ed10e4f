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


def _tree(workdir) -> dict:
  return {os.path.relpath(os.path.join(r, f), workdir): os.path.getsize(os.path.join(r, f))
          for r, _, fs in os.walk(workdir) for f in fs}


def test_a_finished_workdir_is_not_rewritten(finished):
  workdir, results = finished
  before, files = open(os.path.join(workdir, 'results.json')).read(), _tree(workdir)
  again = incremental_jax.train_and_evaluate(lucir.get_config('test'), workdir)
  assert open(os.path.join(workdir, 'results.json')).read() == before
  assert _tree(workdir) == files   # no new TensorBoard events file either
  assert again['compilations'] == results['compilations'] > 0


def test_a_finished_workdir_whose_final_write_was_lost_gets_it(finished, tmp_path):
  """A process that died after the last checkpoint but before the final results.json left it one task behind:
  the same command writes the results of every task the checkpoints hold."""
  import shutil
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished[0], workdir)
  path = os.path.join(workdir, 'results.json')
  with open(path) as f:
    stale = json.load(f)
  stale.update(steps=stale['steps'][:-1], complete=False)
  with open(path, 'w') as f:
    json.dump(stale, f)
  again = incremental_jax.train_and_evaluate(lucir.get_config('test'), workdir)
  assert again['complete'] and again['steps'] == finished[1]['steps']
  assert json.load(open(path))['steps'] == finished[1]['steps']


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


def test_checkpoints_without_a_format_are_told_apart_by_their_structure():
  """M2KD's fixed snapshot stack (with its `valid` mask) is format 2; a checkpoint that names no format is 2 when
  its stack has the mask (written between that change and the format field) and 1 without it (a growing stack)."""
  from incremental_jax.methods.base import Method
  from incremental_jax.methods.m2kd import M2KD
  assert (Method.state_format, M2KD.state_format) == (1, 2)
  assert M2KD.unversioned_state_format({'frozen': {'tree': {'groups': 0, 'valid': 0, 'params': 0}}}) == 2
  assert M2KD.unversioned_state_format({'frozen': {'tree': {'params': 0, 'batch_stats': 0}}}) == 1
  assert Method.unversioned_state_format({'frozen': {}}) == 1
  assert ckpt_lib.removed_fields({'model': {'bn_impl': 'flax', 'depth': 8}}) == ['model.bn_impl']


@pytest.mark.slow
def test_an_m2kd_workdir_from_before_the_format_field_resumes(tmp_path):
  """An M2KD run stopped in its last task, its checkpoints' metadata stripped of the format field (as written
  before it existed): the same command resumes it instead of refusing it."""
  workdir = str(tmp_path / 'run')
  with _sigterm_at('epoch_end', 5), pytest.raises(preemption.Preempted):
    incremental_jax.train_and_evaluate(m2kd.get_config('test'), workdir)
  for step in os.listdir(os.path.join(workdir, 'checkpoints')):
    path = os.path.join(workdir, 'checkpoints', step, 'meta', 'metadata')
    with open(path) as f:
      meta = json.load(f)
    del meta['method_state_format']
    with open(path, 'w') as f:
      json.dump(meta, f)
  assert len(incremental_jax.train_and_evaluate(m2kd.get_config('test'), workdir)['steps']) == 3


def test_config_fields_added_since_a_checkpoint():
  """A checkpoint written before `data.augment.brightness_mode` jittered additively: resuming it under today's
  multiplicative default is a difference (refused in one line), unless the run has no jitter; the loader's
  worker count and prefetch may change on resume."""
  from configs import finetune, podnet
  from incremental_jax import config as cfglib

  def old_and_new(c):
    new = json.loads(c.to_json_best_effort())
    old = json.loads(c.to_json_best_effort())
    del old['data']['augment']['brightness_mode']
    return old, new

  old, new = old_and_new(podnet.get_config('cifar100_b50_s10'))
  assert ckpt_lib.config_differences(old, new, cfglib.flat_defaults()) == [
      "data.augment.brightness_mode: checkpoint has 'add', config has 'multiply'"]
  new['data']['augment']['brightness_mode'] = 'add'
  assert ckpt_lib.config_differences(old, new, cfglib.flat_defaults()) == []
  old, new = old_and_new(finetune.get_config('digits'))   # no jitter
  new['data'].update(workers=4, prefetch=8)
  assert ckpt_lib.config_differences(old, new, cfglib.flat_defaults()) == []
  # before `data.drop_last`, every epoch dropped its last partial batch: today's default (keep it) differs
  del old['data']['drop_last']
  assert ckpt_lib.config_differences(old, new, cfglib.flat_defaults()) == [
      'data.drop_last: checkpoint has True, config has False']
  new['data']['drop_last'] = True
  assert ckpt_lib.config_differences(old, new, cfglib.flat_defaults()) == []
  # issue 33: checkpoints before `optim.schedule_offset` and `method.finetune_bn_train` ran with 0 and False
  new = json.loads(podnet.get_config('cifar100_b50_s10').to_json_best_effort())
  old = json.loads(json.dumps(new))
  del old['optim']['schedule_offset'], old['method']['finetune_bn_train']
  assert ckpt_lib.config_differences(old, new, cfglib.flat_defaults()) == [
      'method.finetune_bn_train: checkpoint has False, config has True',
      'optim.schedule_offset: checkpoint has 0, config has -1']
  new['optim']['schedule_offset'], new['method']['finetune_bn_train'] = 0, False
  assert ckpt_lib.config_differences(old, new, cfglib.flat_defaults()) == []
  # before `model.bn_running_var`, BatchNorm's running variance took the batch's biased variance (flax's update)
  del old['model']['bn_running_var']
  assert ckpt_lib.config_differences(old, new, cfglib.flat_defaults()) == [
      "model.bn_running_var: checkpoint has 'biased', config has 'unbiased'"]
  new['model']['bn_running_var'] = 'biased'
  assert ckpt_lib.config_differences(old, new, cfglib.flat_defaults()) == []
