"""Hosts that cannot disagree: host-computed decisions used by every process are broadcast from process 0
(herding exemplars, PODNet's k-means imprinting) or checked equal (epoch plans, M2KD's pruning masks). A
2-process run in which process 1 computes one of them differently (`faults.PERTURB_VAR`) either stays equal to
the 1-process run or stops naming the decision and the task."""
import json
import os

import numpy as np
import pytest

import incremental_jax
from configs import icarl
from incremental_jax import faults, parallel, pruning


def test_one_process_returns_its_own_decision_and_perturbation_changes_it():
  x = np.arange(12).reshape(3, 4)
  np.testing.assert_array_equal(parallel.broadcast_decision(x, 'herding', 'in task 0'), x)
  np.testing.assert_array_equal(parallel.check_agreement([x], 'epoch_plan', 'of task 0')[0], x)
  faults.configure('', perturb='herding,prune_masks')
  try:
    assert not np.array_equal(parallel.broadcast_decision(x, 'herding', 'in task 0'), x)
    np.testing.assert_array_equal(parallel.check_agreement([x], 'epoch_plan', 'of task 0')[0], x)  # not perturbed
    w = np.array([[3.0, -1.0], [0.5, 2.0]])
    assert pruning.magnitude_mask(w, 0.5).tolist() != [[True, False], [False, True]]
  finally:
    faults.configure('', perturb='')
  assert pruning.magnitude_mask(w, 0.5).tolist() == [[True, False], [False, True]]
  assert parallel._digest([x]).shape == (32,) and not np.array_equal(parallel._digest([x]), parallel._digest([x + 1]))


@pytest.mark.slow
def test_a_host_with_other_exemplars_is_overruled_and_the_run_equals_one_process(tmp_path, comparable, close, two_processes):
  (rc0, _, err0), (rc1, _, err1) = two_processes(tmp_path / 'run', {faults.PERTURB_VAR: 'herding'})
  assert rc0 == 0 and rc1 == 0, err0[-3000:] + err1[-3000:]
  for t in range(3):
    assert (f'warning: process 1 computed the herding exemplar indices in task {t} differently from process 0; '
            "using process 0's.") in err1
  assert 'warning' not in err0
  results = json.loads((tmp_path / 'run' / 'results.json').read_text())
  reference = incremental_jax.train_and_evaluate(icarl.get_config('test'), str(tmp_path / 'one_process'))
  close(comparable(results), comparable(reference))


@pytest.mark.slow
def test_a_host_with_another_epoch_plan_stops_the_run_naming_it(tmp_path, two_processes):
  outs = two_processes(tmp_path / 'run', {faults.PERTURB_VAR: 'epoch_plan'})
  for rc, _, err in outs:
    assert rc != 0, err[-3000:]
    assert ("HostDisagreement: process(es) [1] computed the sampler's epoch plan of task 0 phase 'train' "
            'differently from process 0') in err.strip().splitlines()[-1], err[-3000:]
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints' / '0')
