"""Preemption: SIGTERM makes a run checkpoint at its next epoch boundary, say where it stopped and exit with
`preemption.EXIT_CODE`; the same command resumes to the results of an uninterrupted run."""
import json
import os
import random
import re
import signal
import subprocess
import sys

import pytest

import incremental_jax
from configs import icarl
from incremental_jax import faults, preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigterm_is_a_request_kept_until_the_run_stops():
  previous = signal.getsignal(signal.SIGTERM)
  preemption.reset()
  try:
    preemption.install()
    assert not preemption.requested()
    os.kill(os.getpid(), signal.SIGTERM)   # handled by Python at the next bytecode: the process goes on
    assert preemption.requested() and preemption.requested()   # kept for the next boundary
  finally:
    signal.signal(signal.SIGTERM, previous)
    preemption.reset()
  assert not preemption.requested()
  preemption.reset()


def test_fault_spec_can_send_sigterm(monkeypatch):
  assert faults.parse_signals('train_step:7:term') == {'train_step': (7, signal.SIGTERM)}
  with pytest.raises(ValueError, match='point one of'):
    faults.parse('train_step:7:stop')
  sent = []
  monkeypatch.setattr(faults.os, 'kill', lambda pid, sig: sent.append(sig))
  faults.configure('train_step:2:term,epoch_end:1')
  try:
    faults.reached('train_step')
    faults.reached('train_step')
    faults.reached('epoch_end')
  finally:
    faults.configure('')
  assert sent == [signal.SIGTERM, signal.SIGKILL]


def run_main(workdir, fault=''):
  env = {k: v for k, v in os.environ.items() if k != faults.ENV_VAR}
  if fault:
    env[faults.ENV_VAR] = fault
  cmd = [sys.executable, 'main.py', '--config=configs/icarl.py:test', f'--workdir={workdir}', '--config.progress=True']
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_sigterm_at_a_random_step_checkpoints_exits_and_resumes_identically(tmp_path, comparable):
  """SIGTERM after a random train step n of the iCaRL `test` run (3 tasks of 2 epochs; no `every_epochs`
  checkpoints): the run saves checkpoint S at the end of that epoch (n <= S < n + one epoch's steps), prints one
  line, exits with code 75; the same command resumes and ends with the uninterrupted run's results.json."""
  reference = incremental_jax.train_and_evaluate(icarl.get_config('test'), str(tmp_path / 'reference'))
  ends = sorted(int(n) for n in os.listdir(tmp_path / 'reference' / 'checkpoints'))   # tasks 1 and 2 end
  last_epoch = (ends[1] - ends[0]) // 2
  n = random.Random().randint(1, ends[1] - last_epoch)   # a SIGTERM in the final epoch simply lets the run end
  workdir = str(tmp_path / 'run')
  out = run_main(workdir, fault=f'train_step:{n}:term')
  assert out.returncode == preemption.EXIT_CODE, (n, out.stderr[-3000:])
  line = out.stderr.strip().splitlines()[-1]
  m = re.fullmatch(r'preempted \(SIGTERM\): stopped (in step \d \(phase .train., epoch 1\)|after step \d) after '
                   rf'saving checkpoint (\d+) in {re.escape(workdir)}; run the same command again to resume from it\.',
                   line)
  assert m, (n, line)
  saved = int(m.group(2))
  assert n <= saved < n + 18, (n, saved)   # the next epoch boundary (at most 18 steps per epoch here)
  assert str(saved) in os.listdir(os.path.join(workdir, 'checkpoints'))

  out = run_main(workdir)
  assert out.returncode == 0, (n, out.stderr[-3000:])
  assert f'(checkpoint step {saved})' in out.stdout, (n, out.stdout[-2000:])
  final = json.loads(open(os.path.join(workdir, 'results.json')).read())
  assert comparable(final) == comparable(reference), n


def test_sigterm_while_the_command_starts_stops_the_run_at_its_first_boundary(tmp_path):
  """SIGTERM during the command's start-up, where a multi-process run has just joined the distributed runtime
  (`distributed_init`, before the config is read): the stop handler is installed first of all, so the run is not
  killed but stops at its first boundary (task 0's first epoch end, checkpoint 18) with exit status 75."""
  workdir = str(tmp_path / 'run')
  out = run_main(workdir, fault='distributed_init:1:term')
  assert out.returncode == preemption.EXIT_CODE, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1] == (
      f"preempted (SIGTERM): stopped in step 0 (phase 'train', epoch 1) after saving checkpoint 18 in {workdir}; "
      'run the same command again to resume from it.')
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['18']


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted iCaRL `test` run (one process), computed once for this module's comparisons."""
  return incremental_jax.train_and_evaluate(icarl.get_config('test'), str(tmp_path_factory.mktemp('reference')))


STOPS = {   # fault of process 1, extra flags -> where both processes stop, checkpoint step (18 train steps per
            # epoch in task 0, 14 in task 1 (last partial batches kept), 2 epochs each: task ends at 36 and 64, epoch 1
            # ends at 18 and 50)
    'right_after_distributed_init': ('distributed_init:1:term', (), "in step 0 (phase 'train', epoch 1)", 18),
    'before_any_save': ('train_step:5:term', (), "in step 0 (phase 'train', epoch 1)", 18),
    'after_task_end_save': ('task_end:1:term', (), 'after step 0', 36),
    'every_epoch_saved': ('train_step:40:term', ('--config.checkpoint.every_epochs=1',),
                          "in step 1 (phase 'train', epoch 1)", 50),
    'while_save_finalizes': ('checkpoint_write:3:term', ('--config.checkpoint.every_epochs=1',), 'after step 1', 64),
}


@pytest.mark.slow
@pytest.mark.parametrize('case', list(STOPS))
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_checkpoint(case, tmp_path, comparable, close,
                                                                           two_process_reference, two_processes):
  """Two processes; process 1 alone gets SIGTERM: right after `jax.distributed.initialize` (whose preemption
  service, were it on, would have replaced the stop handler and swallowed it), before any checkpoint, right after
  a task-end checkpoint, after train step 40 when every epoch is saved (checkpoints 18 and 36 written before), or
  right after the third save started (`checkpoint_write`, while process 0 finalizes it in the background; the
  next boundary ends the phase, so the stop passes to the task end). Orbax drives JAX's preemption sync point with the train step on
  every save, so the stop must not depend on it: both processes save the same checkpoint, print the same line
  and exit with 75; the same command on two processes then resumes from it to the uninterrupted two-process
  results."""
  fault, args, where, saved = STOPS[case]
  workdir = tmp_path / 'run'
  outs = two_processes(workdir, {faults.ENV_VAR: fault}, args)
  for rc, _, err in outs:
    assert rc == preemption.EXIT_CODE, (rc, err[-3000:])
    assert err.strip().splitlines()[-1] == (
        f'preempted (SIGTERM): stopped {where} after saving checkpoint {saved} in {workdir}; '
        'run the same command again to resume from it.')
  assert max(int(n) for n in os.listdir(workdir / 'checkpoints') if n.isdigit()) == saved
  for rc, _, err in two_processes(workdir, args=args):
    assert rc == 0, err[-3000:]
  close(comparable(json.loads((workdir / 'results.json').read_text())), comparable(two_process_reference))


def test_a_run_after_a_preempted_one_in_the_same_process_trains(tmp_path):
  """A notebook: SIGTERM stops a run with `Preempted`; calling `train_and_evaluate` again (here: resuming it)
  trains to the end instead of stopping at its first boundary."""
  previous = signal.getsignal(signal.SIGTERM)
  preemption.install()
  faults.configure('train_step:5:term')
  try:
    with pytest.raises(preemption.Preempted, match='after saving checkpoint 18 '):
      incremental_jax.train_and_evaluate(icarl.get_config('test'), str(tmp_path))
    faults.configure('')
    results = incremental_jax.train_and_evaluate(icarl.get_config('test'), str(tmp_path))
  finally:
    faults.configure('')
    signal.signal(signal.SIGTERM, previous)
    preemption.reset()
  assert results['complete'] and len(results['steps']) == 3


def test_reset_forgets_an_answered_stop_and_keeps_an_unanswered_sigterm():
  previous = signal.getsignal(signal.SIGTERM)
  preemption.install()
  try:
    os.kill(os.getpid(), signal.SIGTERM)   # e.g. between main.py's install() and the run's start
    preemption.reset()
    assert preemption.requested()          # not lost: the run stops at its first boundary
    preemption.reset()
    assert not preemption.requested()      # answered: the next run trains
  finally:
    signal.signal(signal.SIGTERM, previous)
    preemption.reset()
