"""Hosts that cannot disagree: host-computed decisions used by every process are broadcast from process 0
(herding exemplars, PODNet's and LUCIR's imprinting, whether the images fit the device) or checked equal (epoch
plans, M2KD's pruning masks). A
2-process run in which process 1 computes one of them differently (`faults.PERTURB_VAR`) either stays equal to
the 1-process run or stops naming the decision and the task."""
import json
import os

import numpy as np
import pytest

import incremental_jax
from configs import icarl
from incremental_jax import faults, parallel, pruning
from incremental_jax.data import pipeline


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


def test_a_perturbed_placement_keeps_images_that_fit_on_the_host():
  images = np.zeros((4, 2, 2, 1), np.uint8)
  mesh = parallel.make_mesh()
  assert isinstance(pipeline.place_images(images, mesh, 'auto'), pipeline.DeviceImages)
  faults.configure('', perturb='on_device')
  try:
    assert pipeline.place_images(images, mesh, 'auto') is images   # this host's budget says 'does not fit'
    assert isinstance(pipeline.place_images(images, mesh, True), pipeline.DeviceImages)   # the config's choice
  finally:
    faults.configure('', perturb='')


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


@pytest.mark.slow
def test_a_host_whose_images_do_not_fit_and_whose_lucir_imprint_differs_follows_process_0(
    tmp_path, comparable, close, two_processes):
  """The reference is the 2-process run without perturbation: LUCIR's 2-process results on this preset differ from
  the 1-process ones by more than rounding (the imprinted kernels agree to 5e-7, training amplifies that)."""
  lucir_args = ('--config=configs/lucir.py:test',)
  (rc0, _, err0), (rc1, _, err1) = two_processes(tmp_path / 'run', {faults.PERTURB_VAR: 'on_device,lucir_imprint'},
                                                 args=lucir_args)
  assert rc0 == 0 and rc1 == 0, err0[-3000:] + err1[-3000:]
  assert ("warning: process 1 computed the images' placement (data.on_device='auto': whether they fit the device) "
          "for the data set differently from process 0; using process 0's.") in err1
  for t in (1, 2):
    assert (f"warning: process 1 computed LUCIR's imprinted class weights in task {t} differently from process 0; "
            "using process 0's.") in err1
  assert 'warning' not in err0
  assert all(rc == 0 for rc, _, _ in two_processes(tmp_path / 'reference', args=lucir_args))
  results, reference = (json.loads((tmp_path / w / 'results.json').read_text()) for w in ('run', 'reference'))
  assert results['method'] == 'lucir'
  close(comparable(results), comparable(reference))
