"""Fault tolerance: SIGKILL at chosen points (fault injection) and resume; corrupt, foreign and orphaned
workdirs are refused with a clear error; a diverging run stops naming the step and keeps its checkpoint."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import incremental_jax
from configs import icarl
from incremental_jax import checkpoint as ckpt_lib
from incremental_jax import faults
from incremental_jax import metrics as metrics_lib
from incremental_jax import preemption
from incremental_jax import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted icarl `test` run in this process: `results`, `workdir`, and `write_log`: at every
  results.json write, (steps reported, task of the latest complete checkpoint)."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  original = metrics_lib.write_results

  def write_results(wd, results, plots=True):
    done = complete_steps(wd)
    task = None
    if done:
      with open(os.path.join(wd, 'checkpoints', str(done[-1]), 'meta', 'metadata')) as f:
        task = json.load(f)['task']
    write_log.append((len(results['steps']), task))
    original(wd, results, plots)

  write_log = []
  metrics_lib.write_results = write_results
  try:
    results = incremental_jax.train_and_evaluate(icarl.get_config('test'), workdir)
  finally:
    metrics_lib.write_results = original
  return types.SimpleNamespace(results=results, workdir=workdir, write_log=write_log)


def complete_steps(workdir) -> list[int]:
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def partial_steps(workdir) -> list[str]:
  return sorted(n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'orbax-checkpoint-tmp' in n)


def run_main(workdir, fault=None, *extra):
  env = dict(os.environ)
  env.pop(faults.ENV_VAR, None)
  if fault:
    env[faults.ENV_VAR] = fault
  cmd = [sys.executable, 'main.py', '--config=configs/icarl.py:test', f'--workdir={workdir}',
         '--config.checkpoint.every_epochs=1', '--config.progress=True', *extra]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def resumed_from(out) -> int:
  m = re.search(r'resuming .* \(checkpoint step (\d+)\)', out.stdout)
  assert m, out.stdout[-2000:] + out.stderr[-3000:]
  return int(m.group(1))


# ---- the fault-injection hook ------------------------------------------------------------------------------
def test_fault_spec_parsing_and_counting(monkeypatch):
  assert faults.parse('train_step:3, checkpoint_write:1') == {'train_step': 3, 'checkpoint_write': 1}
  for bad in ('train_step', 'train_step:0', 'nowhere:2', 'train_step:x'):
    with pytest.raises(ValueError, match='point one of'):
      faults.parse(bad)
  killed = []
  monkeypatch.setattr(faults.os, 'kill', lambda pid, sig: killed.append((pid, sig)))
  faults.configure('epoch_end:3')
  try:
    assert faults.armed('epoch_end') and not faults.armed('train_step')
    for _ in range(2):
      faults.reached('epoch_end')
      faults.reached('train_step')
    assert killed == []
    faults.reached('epoch_end')
    assert killed == [(os.getpid(), faults.signal.SIGKILL)]
    faults.reached('epoch_end')  # only the n-th occurrence
    assert len(killed) == 1
  finally:
    faults.configure('')


def test_retention_keeps_task_ends_and_the_latest_checkpoint():
  class Info:
    def __init__(self, step):
      self.step = step
  kinds = {10: 'task_end', 15: 'mid_task', 20: 'task_end', 25: 'mid_task', 30: 'task_end', 35: 'mid_task',
           37: 'mid_task'}
  infos = [Info(s) for s in sorted(kinds)]
  is_mid_task = lambda step: kinds[step] == 'mid_task'
  keep = ckpt_lib._KeepTaskEnds(2, is_mid_task).should_preserve(infos)
  assert [i.step for i, k in zip(infos, keep) if k] == [20, 30, 37]
  keep_all = ckpt_lib._KeepTaskEnds(None, is_mid_task).should_preserve(infos)
  assert [i.step for i, k in zip(infos, keep_all) if k] == [10, 20, 30, 37]


# ---- SIGKILL and resume --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_at_any_point_then_resume_equals_uninterrupted_run(tmp_path, reference, comparable):
  """Kills `main.py` (a checkpoint every epoch) while a checkpoint is being written, during exemplar selection
  and inside a task's training; every restart resumes from the last complete checkpoint, and the final
  results equal the uninterrupted run's. Orbax's `save` first waits for the previous save, so a kill at the
  k-th `checkpoint_write` leaves checkpoint k-1 complete and k half-written."""
  ref_results, ref_dir = reference.results, reference.workdir
  workdir = str(tmp_path / 'run')

  # 1. checkpoint writes: after epoch 1 of task 0 (mid-task), end of task 0 <- killed while it is written
  out = run_main(workdir, 'checkpoint_write:2')
  assert out.returncode == -9, out.stderr[-3000:]
  (mid0,) = complete_steps(workdir)
  (tmp,) = partial_steps(workdir)
  end0 = int(tmp.split('.')[0])
  assert end0 == 2 * mid0  # 2 epochs of n0 steps
  assert not os.path.exists(tmp_path / 'run' / 'results.json')  # written only once a checkpoint is complete

  # 2. resumes inside task 0 (the half-written checkpoint is never read), killed choosing task 0's exemplars
  out = run_main(workdir, 'exemplar_selection:2')
  assert out.returncode == -9, out.stderr[-3000:]
  assert resumed_from(out) == mid0 and "in step 0 (phase 'train', epoch 1)" in out.stdout
  assert complete_steps(workdir) == [mid0] and not partial_steps(workdir)  # leftovers are cleaned up

  # 3. resumes there again, finishes task 0, killed on the 2nd step of task 1's 2nd epoch
  end1, end2 = complete_steps(ref_dir)  # the two task-end checkpoints the reference keeps
  n0, n1 = mid0, (end1 - end0) // 2
  out = run_main(workdir, f'train_step:{n0 + n1 + 2}')
  assert out.returncode == -9, out.stderr[-3000:]
  assert resumed_from(out) == mid0
  done = complete_steps(workdir)  # task 0's end, and the mid-task checkpoint of task 1 if its write finished
  assert done in ([end0], [end0, end0 + n1]), done

  # 4. resumes from the last complete checkpoint and finishes
  out = run_main(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert resumed_from(out) == done[-1]
  assert complete_steps(workdir) == [end1, end2]  # mid-task checkpoints are removed
  final = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert ckpt_lib.config_differences(final['config'], ref_results['config']) == []
  assert comparable(final) == comparable(ref_results)


def test_results_json_never_reports_a_task_whose_checkpoint_is_incomplete(reference):
  # results.json of task t is written once its checkpoint is complete (at the next task end, which waits for
  # the save started at task t, or at the run's end); each time, the last reported task's checkpoint is complete
  assert [n for n, _ in reference.write_log] == [1, 2, 3]
  assert all(task is not None and task >= n - 1 for n, task in reference.write_log), reference.write_log


# ---- refused workdirs ----------------------------------------------------------------------------------------
def _tree_digest(path) -> str:
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      h.update(os.path.relpath(os.path.join(root, f), path).encode())
      with open(os.path.join(root, f), 'rb') as fh:
        h.update(fh.read())
  return h.hexdigest()


def _copy(reference, tmp_path) -> str:
  dst = str(tmp_path / 'run')
  shutil.copytree(reference.workdir, dst)
  return dst


def _largest_train_file(workdir, step) -> str:
  d = os.path.join(workdir, 'checkpoints', str(step), 'train')
  files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if os.sep + 'd' + os.sep in os.path.join(r, f)]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize('damage', ['garble', 'truncate'])
def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_overwritten(tmp_path, reference, damage):
  workdir = _copy(reference, tmp_path)
  latest = complete_steps(workdir)[-1]
  path = _largest_train_file(workdir, latest)
  data = bytearray(open(path, 'rb').read())
  if damage == 'garble':
    data[len(data) // 4:] = bytes(b ^ 0x5A for b in data[len(data) // 4:])
  else:
    data = data[:len(data) // 2]
  with open(path, 'wb') as f:
    f.write(bytes(data))
  before = _tree_digest(workdir)
  with pytest.raises(ckpt_lib.CheckpointError, match=rf'cannot restore checkpoint {latest} .*corrupt') as e:
    incremental_jax.train_and_evaluate(icarl.get_config('test'), workdir)
  assert f'delete {os.path.join(workdir, "checkpoints", str(latest))}' in str(e.value)
  assert len(str(e.value)) < 1500  # one readable paragraph, not a TensorStore spec dump
  assert _tree_digest(workdir) == before


def test_foreign_orbax_checkpoint_is_refused(tmp_path):
  import orbax.checkpoint as ocp
  ckpt_dir = tmp_path / 'run' / 'checkpoints'
  with ocp.CheckpointManager(str(ckpt_dir)) as manager:
    manager.save(7, args=ocp.args.StandardSave({'w': np.ones(3, np.float32)}))
    manager.wait_until_finished()
  with pytest.raises(ckpt_lib.CheckpointError, match='checkpoint 7 .*not written by incremental_jax'):
    incremental_jax.train_and_evaluate(icarl.get_config('test'), str(tmp_path / 'run'))
  assert os.listdir(ckpt_dir) == ['7']


def test_results_without_checkpoints_are_not_overwritten(tmp_path, reference):
  workdir = _copy(reference, tmp_path)
  shutil.rmtree(os.path.join(workdir, 'checkpoints'))
  before = open(os.path.join(workdir, 'results.json')).read()
  with pytest.raises(ckpt_lib.CheckpointError, match='results of 3 finished task.*no checkpoint to resume from'):
    incremental_jax.train_and_evaluate(icarl.get_config('test'), workdir)
  assert open(os.path.join(workdir, 'results.json')).read() == before


# ---- non-finite loss -----------------------------------------------------------------------------------------
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  """Task 0 trains normally (first_task_lr); task 1's lr of 1e30 makes the first update explode, so the loss of
  task 1's second step (global step 2 n0 + 1) is not finite. Task 0's checkpoint is left as it was."""
  c = icarl.get_config('test')
  c.optim.first_task_lr = c.optim.lr
  c.optim.lr = 1e30
  workdir = str(tmp_path / 'run')
  snapshots = []
  original = train_lib.phase_epochs

  def run_phase(trainer, runs, *args, **kwargs):
    if int(runs[0].task.index) == 1:   # task 0's checkpoint may still be written in the background
      for _ in range(600):
        if complete_steps(workdir) and not partial_steps(workdir):
          break
        time.sleep(0.1)
      snapshots.append(_tree_digest(os.path.join(workdir, 'checkpoints')))
    return original(trainer, runs, *args, **kwargs)

  monkeypatch.setattr(train_lib, 'phase_epochs', run_phase)
  with pytest.raises(FloatingPointError) as e:
    incremental_jax.train_and_evaluate(c, workdir)
  (end0,) = complete_steps(workdir)
  assert re.search(rf'step 1/2 train: the loss became (nan|inf|-inf) at global step {end0 + 1} \(step 2 of epoch 1\)',
                   str(e.value)), str(e.value)
  assert len(snapshots) == 1 and _tree_digest(os.path.join(workdir, 'checkpoints')) == snapshots[0]
  results = json.loads(open(os.path.join(workdir, 'results.json')).read())
  assert len(results['steps']) == 1 and results['complete'] is False


def test_non_finite_parameters_are_never_checkpointed():
  import jax.numpy as jnp
  state = train_lib.TrainState(step=jnp.int32(12), phase_step=jnp.int32(0), opt_state={},
                               params={'w': jnp.ones(3), 'b': jnp.zeros(2)}, batch_stats={'n': jnp.ones(1)})
  train_lib.check_finite(state, 'ok')
  bad = state.replace(params={'w': jnp.array([1.0, jnp.inf, 0.0]), 'b': jnp.zeros(2)})
  with pytest.raises(FloatingPointError, match='not finite after global step 12'):
    train_lib.check_finite(bad, 'task 1')
  with pytest.raises(FloatingPointError):
    train_lib.check_finite(state.replace(batch_stats={'n': jnp.array([jnp.nan])}), 'task 1')


# ---- several processes -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_give_the_results_of_one(tmp_path, reference, close, comparable, two_processes):
  """`main.py` as two CPU processes (one device each, gloo collectives) joined by jax.distributed: each loads
  half of every batch; the results equal the single-process run with the same global batch, only process 0
  writes, and a single process resumes from the checkpoint they wrote together."""
  ref_results = reference.results
  workdir = tmp_path / 'run'
  outs = two_processes(workdir, args=('--config.progress=True',))
  for returncode, _, stderr in outs:
    assert returncode == 0, stderr[-3000:]
  reports = [[line for line in stdout.splitlines() if not line.startswith('[Gloo]')] for _, stdout, _ in outs]
  assert 'results written to' in reports[0][-1] and reports[1] == []  # only process 0 reports
  results = json.loads((workdir / 'results.json').read_text())
  assert results['complete'] and len(results['steps']) == 3
  close(comparable(results), comparable(ref_results))

  resumed = incremental_jax.train_and_evaluate(icarl.get_config('test'), str(workdir))  # nothing left to train
  close(comparable(resumed), comparable(ref_results))


# ---- a lost process -------------------------------------------------------------------------------------------


_GLOO_ERROR = ('UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read error '
               '[127.0.0.1]:8619: Connection reset by peer')


def test_a_failed_collective_with_a_gone_peer_is_told_from_other_errors(monkeypatch):
  import jax
  monkeypatch.setattr(jax, 'process_count', lambda: 1)
  assert preemption.lost_process(ValueError(_GLOO_ERROR)) is None   # one process: no peer to lose
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  assert preemption.lost_process(ValueError(_GLOO_ERROR)) == 'process 1'
  assert preemption.lost_process(jax.errors.JaxRuntimeError('UNKNOWN: Gloo all-reduce failed: x')) == 'process 1'
  assert preemption.lost_process(jax.errors.JaxRuntimeError('INTERNAL: Connection closed by peer')) == 'process 1'
  for other in (OSError('Connection reset by peer'),   # e.g. a bucket's connection: not a collective
                jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory'), MemoryError(), KeyboardInterrupt()):
    assert preemption.lost_process(other) is None, other
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  assert preemption.lost_process(ValueError(_GLOO_ERROR)) == 'process 0'
  monkeypatch.setattr(jax, 'process_count', lambda: 4)
  assert preemption.lost_process(ValueError(_GLOO_ERROR)) == 'a process (the peer at 127.0.0.1:8619)'
  assert preemption.lost_message('process 1', ValueError(_GLOO_ERROR), 'gs://b/run', 34) == (
      'lost process 1 (Gloo AllGather failed: Read error [127.0.0.1]:8619: Connection reset by peer); the last '
      'complete checkpoint is 34 in gs://b/run: run the same command again on every process to resume from it.')
  assert 'no checkpoint of gs://b/run is complete' in preemption.lost_message('process 1', ValueError('x'),
                                                                             'gs://b/run', None)


LOST = {   # process 1's SIGKILL after task 0's checkpoint (step 36): during its exemplar selection of task 1 (no save
           # in flight), and right after it started task 1's save (step 64), which cannot complete without it
    'between_saves': 'exemplar_selection:5',
    'save_in_flight': 'task_end:2',
}


@pytest.mark.slow
@pytest.mark.parametrize('case', list(LOST))
def test_a_lost_process_stops_the_other_with_one_line_and_the_run_resumes(case, tmp_path, two_process_reference, close,
                                                                          comparable, two_processes):
  """Two processes, process 1 SIGKILLed after task 0's checkpoint: process 0's next collective fails, and it exits
  at once with `preemption.EXIT_CODE` and one line naming process 1 and the checkpoint to resume from, instead of
  a traceback and an abort (exit 134) at JAX's shutdown barrier once process 1's heartbeat times out (100 s; the
  fixture's 900 s timeout is the failure bound). The same command on two processes then resumes to the
  uninterrupted two-process results."""
  workdir = tmp_path / 'run'
  (rc0, _, err0), (rc1, _, _) = two_processes(workdir, {faults.ENV_VAR: LOST[case]})
  assert rc1 == -signal.SIGKILL
  assert rc0 == preemption.EXIT_CODE, err0[-3000:]
  lines = [line for line in err0.strip().splitlines() if not re.match(r'I\d{4} ', line)]   # JAX's start-up INFO logs
  assert len(lines) == 1, err0[-3000:]
  assert re.fullmatch(rf'lost process 1 \(Gloo \S+ failed: .*Connection (reset|closed) by peer[^)]*\); the last complete '
                      rf'checkpoint is 36 in {re.escape(str(workdir))}: run the same command again on every process '
                      r'to resume from it\.', lines[0]), lines[0]
  assert complete_steps(workdir) == [36]
  for rc, _, err in two_processes(workdir):
    assert rc == 0, err[-3000:]
  close(comparable(json.loads((workdir / 'results.json').read_text())), comparable(two_process_reference))


# ---- a failing disk -------------------------------------------------------------------------------------------
def test_failed_checkpoint_write_is_one_error_and_the_workdir_resumes(tmp_path, reference, comparable, monkeypatch):
  """The background write of task 1's checkpoint fails (a storage error from Orbax's commit futures, as a full
  disk or a lost bucket connection gives): the run stops with one CheckpointError naming the cause, results.json
  and the checkpoints name task 0 only, and the same command then resumes to the uninterrupted results."""
  import orbax.checkpoint as ocp
  original, task_end_saves = ocp.StandardCheckpointHandler.async_save, []

  class FailingCommit:
    def result(self, timeout=None):
      raise OSError(28, 'No space left on device (injected)')

  async def async_save(self, directory, *args, **kwargs):
    futures = list(await original(self, directory, *args, **kwargs) or [])
    item = getattr(kwargs.get('args'), 'item', None)
    if isinstance(item, dict) and 'memory' in item:   # the task-end checkpoint's `extra`
      task_end_saves.append(directory)
      if len(task_end_saves) == 2:
        futures.append(FailingCommit())
    return futures

  workdir = str(tmp_path / 'run')
  monkeypatch.setattr(ocp.StandardCheckpointHandler, 'async_save', async_save)
  with pytest.raises(ckpt_lib.CheckpointError, match='could not be written .*No space left on device') as e:
    incremental_jax.train_and_evaluate(icarl.get_config('test'), workdir)
  assert '\n' not in str(e.value)
  done = complete_steps(workdir)
  assert len(done) == 1
  with open(os.path.join(workdir, 'checkpoints', str(done[0]), 'meta', 'metadata')) as f:
    assert json.load(f)['task'] == 0
  assert len(json.loads(open(os.path.join(workdir, 'results.json')).read())['steps']) == 1
  monkeypatch.setattr(ocp.StandardCheckpointHandler, 'async_save', original)
  resumed = incremental_jax.train_and_evaluate(icarl.get_config('test'), workdir)
  assert comparable(resumed) == comparable(reference.results)
