"""The learning rate of every epoch, against the official loops' schedulers stepped where each loop steps them
(`optim.schedule_offset`, `step.learning_rate`).

The references are NumPy emulations of PyTorch's `_LRScheduler` bookkeeping (`last_epoch`, the closed forms of
`MultiStepLR` and `CosineAnnealingLR`) driven by a copy of each official loop's order of calls, so they do not
use the offset formula they check; plus numbers recorded from PyTorch itself (`TORCH_RECORDED`)."""
import bisect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from incremental_jax import step as step_lib
from incremental_jax import validate
from incremental_jax.configs import bake, icarl, lucir, lwf, podnet
from incremental_jax.errors import ConfigError
from incremental_jax.methods.base import first_task_optim
from incremental_jax.types import TaskInfo

STEPS_PER_EPOCH = 3


# ---- references ---------------------------------------------------------------------------------------------
def closed_form(kind: str, base: float, epochs: int, milestones=(), gamma: float = 0.1):
  """PyTorch's closed forms at `last_epoch` t: MultiStepLR base * gamma ** bisect_right(milestones, t),
  CosineAnnealingLR (eta_min 0) base * (1 + cos(pi t / T_max)) / 2."""
  if kind == 'multistep':
    return lambda t: base * gamma ** bisect.bisect_right(sorted(milestones), t)
  return lambda t: base * (1 + math.cos(math.pi * t / epochs)) / 2


class EmulatedScheduler:
  """`torch.optim.lr_scheduler._LRScheduler`'s bookkeeping for a schedule with closed form `lr_at(t)`.
  `torch_04=True`: PyTorch 0.4.0, whose constructor calls `step(0)` and then resets `last_epoch` to -1;
  else PyTorch >= 1.1, whose constructor leaves `last_epoch` at 0. `lr` is the optimiser's current rate."""

  def __init__(self, lr_at, torch_04: bool = False):
    self.lr_at = lr_at
    self.step(0)
    if torch_04:
      self.last_epoch = -1

  def step(self, epoch=None):
    self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
    self.lr = self.lr_at(self.last_epoch)


def pycil_loop(lr_at, epochs):
  """PyCIL `models/icarl.py::_init_train` / `_update_representation`: train the epoch, then `scheduler.step()`."""
  sched, lrs = EmulatedScheduler(lr_at), []
  for _ in range(epochs):
    lrs.append(sched.lr)
    sched.step()
  return lrs


def podnet_loop(lr_at, epochs):
  """PODNet `inclearn/models/icarl.py::_training_step`: train the epoch, then `self._scheduler.step(epoch)`."""
  sched, lrs = EmulatedScheduler(lr_at), []
  for epoch in range(epochs):
    lrs.append(sched.lr)
    sched.step(epoch)
  return lrs


def lucir_loop(lr_at, epochs, torch_04=True):
  """LUCIR `utils_incremental/incremental_train_and_eval_MR_LF.py`: `tg_lr_scheduler.step()` at the start of
  each epoch, then train it (PyTorch 0.4.0 in the official code)."""
  sched, lrs = EmulatedScheduler(lr_at, torch_04=torch_04), []
  for _ in range(epochs):
    sched.step()
    lrs.append(sched.lr)
  return lrs


def bake_small_scale_loop(base, epochs):
  """BAKE `small_scale/train.py`: train(epoch), then `adjust_learning_rate(optimizer, epoch)` (lr / 10 from
  epoch >= epochs / 2, again from >= 3 epochs / 4); the optimiser starts at `base`."""
  lr, lrs = base, []
  for epoch in range(epochs):
    lrs.append(lr)
    lr = base * (0.1 if epoch >= 0.5 * epochs else 1) * (0.1 if epoch >= 0.75 * epochs else 1)
  return lrs


# PyTorch 2.13.0 (CPU, /work/torchvenv): the optimiser's lr while each epoch trains, 12 epochs, base 0.1,
# produced by
#   opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1); sched = <scheduler>(opt, ...)
#   'after': for e in range(12): record(); sched.step()          'start': for e in ...: sched.step(); record()
#   'after_epoch': for e in range(12): record(); sched.step(e)   (the deprecated epoch argument, as PODNet)
# with MultiStepLR(milestones=[4, 8], gamma=0.1) and CosineAnnealingLR(T_max=12), values rounded to 12 digits.
TORCH_RECORDED = {
    ('multistep', 'after'): [0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001, 0.001],
    ('multistep', 'after_epoch'): [0.1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001],
    ('multistep', 'start'): [0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001, 0.001, 0.001],
    ('cosine', 'after'): [0.1, 0.098296291314, 0.093301270189, 0.085355339059, 0.075, 0.062940952255, 0.05,
        0.037059047745, 0.025, 0.014644660941, 0.006698729811, 0.001703708686],
    ('cosine', 'after_epoch'): [0.1, 0.1, 0.098296291314, 0.093301270189, 0.085355339059, 0.075, 0.062940952255,
        0.05, 0.037059047745, 0.025, 0.014644660941, 0.006698729811],
    ('cosine', 'start'): [0.098296291314, 0.093301270189, 0.085355339059, 0.075, 0.062940952255, 0.05,
        0.037059047745, 0.025, 0.014644660941, 0.006698729811, 0.001703708686, 0.0],
}


# ---- ours ---------------------------------------------------------------------------------------------------
def phase_task(lr: float, epochs: int, steps_per_epoch: int = STEPS_PER_EPOCH) -> TaskInfo:
  return TaskInfo(index=jnp.int32(0), old=jnp.zeros(2), new=jnp.ones(2), seen=jnp.ones(2), trainable=jnp.ones(2),
                  lr=jnp.float32(lr), epochs=jnp.float32(epochs), steps_per_epoch=jnp.float32(steps_per_epoch))


def epoch_lrs(optim) -> np.ndarray:
  """Our learning rate of every epoch of a phase with `optim` (every step of the epoch must agree)."""
  epochs = int(optim.epochs)
  task = phase_task(optim.lr, epochs)
  steps = jnp.arange(epochs * STEPS_PER_EPOCH, dtype=jnp.int32)
  lrs = np.asarray(jax.vmap(lambda s: step_lib.learning_rate(optim, task, s))(steps)).reshape(epochs, -1)
  np.testing.assert_array_equal(lrs, np.repeat(lrs[:, :1], STEPS_PER_EPOCH, axis=1))
  return lrs[:, 0].astype(np.float64)


def assert_lrs(ours, ref):
  """float32 learning rates against float64 references."""
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-8)


def with_fields(optim, **fields):
  optim = optim.copy_and_resolve_references()
  optim.update(fields)
  return optim


# ---- PODNet -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('preset', ['cifar100_b50_s10', 'imagenet100_b50_s10', 'digits'])
def test_podnet_cosine_is_stepped_after_each_epoch_with_the_epoch(preset):
  """30 epochs of PODNet's cosine: the official log reads 0.1, 0.1, 0.099726, ..., 0.0010926."""
  optim = with_fields(podnet.get_config(preset).optim, epochs=30, lr=0.1)
  ours = epoch_lrs(optim)
  ref = podnet_loop(closed_form('cosine', 0.1, 30), 30)
  assert_lrs(ours, ref)
  assert [round(float(x), 6) for x in ours[:3]] == [0.1, 0.1, 0.099726]
  assert round(float(ours[-1]), 7) == 0.0010926
  # the textbook form (offset 0) differs: epoch 1 would already be 0.099726 and the last epoch 0.0002739
  assert round(float(epoch_lrs(with_fields(optim, schedule_offset=0))[1]), 6) == 0.099726


def test_podnet_full_length_cosine_and_constant_finetuning():
  """160 epochs at 0.1 (CIFAR) and the balanced finetuning's constant lr, which the offset leaves unchanged."""
  optim = podnet.get_config('cifar100_b50_s10').optim
  assert_lrs(epoch_lrs(optim), podnet_loop(closed_form('cosine', 0.1, 160), 160))
  finetune = with_fields(optim, epochs=20, lr=0.05, schedule='constant', milestones=())
  np.testing.assert_allclose(epoch_lrs(finetune), [0.05] * 20, rtol=1e-7)


# ---- LUCIR --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('preset', ['cifar100_b50_s10', 'imagenet100_b50_s10', 'digits'])
def test_lucir_multistep_is_stepped_at_the_start_of_each_epoch_under_pytorch_04(preset):
  optim = lucir.get_config(preset).optim
  ref = lucir_loop(closed_form('multistep', optim.lr, optim.epochs, optim.milestones, optim.gamma), optim.epochs)
  ours = epoch_lrs(optim)
  assert_lrs(ours, ref)
  first = int(optim.milestones[0])
  assert ours[first - 1] == pytest.approx(optim.lr) and ours[first] == pytest.approx(optim.lr * optim.gamma)


def test_lucir_class_balanced_finetuning_schedule():
  """The official ImageNet CBF: 20 epochs at 0.01, x0.1 at epoch 10, the same start-of-epoch step()."""
  optim = with_fields(lucir.get_config('imagenet100_b50_s10').optim, epochs=20, lr=0.01, milestones=(10,))
  assert_lrs(epoch_lrs(optim), lucir_loop(closed_form('multistep', 0.01, 20, (10,)), 20))


def test_start_of_epoch_step_under_pytorch_11_is_offset_plus_one():
  """The same loop under PyTorch >= 1.1 reaches each milestone one epoch early: `schedule_offset=1`."""
  optim = with_fields(lucir.get_config('cifar100_b50_s10').optim, schedule_offset=1)
  ref = lucir_loop(closed_form('multistep', 0.1, 160, (80, 120)), 160, torch_04=False)
  assert_lrs(epoch_lrs(optim), ref)
  assert ref[79] == pytest.approx(0.01)


# ---- PyCIL (iCaRL, LwF) -------------------------------------------------------------------------------------
@pytest.mark.parametrize('module', [icarl, lwf])
def test_pycil_multistep_is_stepped_after_each_epoch(module):
  """First task with the `first_task_*` overrides (200 epochs, PyCIL's init_milestones), later tasks with the
  others; both stepped after each epoch."""
  optim = module.get_config('cifar100_b0_s10').optim
  for task in (0, 1):
    o = first_task_optim(optim, task)
    assert o.schedule_offset == 0
    ref = pycil_loop(closed_form('multistep', o.lr, o.epochs, o.milestones, o.gamma), o.epochs)
    assert_lrs(epoch_lrs(o), ref)
  assert first_task_optim(optim, 0).epochs == 200 and first_task_optim(optim, 1).epochs == optim.epochs


def test_first_task_overrides_keep_the_offset():
  optim = with_fields(podnet.get_config('cifar100_b50_s10').optim, first_task_epochs=30, first_task_lr=0.2)
  first = first_task_optim(optim, 0)
  assert (first.epochs, first.lr, first.schedule_offset) == (30, 0.2, -1)
  assert_lrs(epoch_lrs(first), podnet_loop(closed_form('cosine', 0.2, 30), 30))


# ---- BAKE ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('preset', ['cifar100', 'digits', 'digits_ce'])
def test_bake_small_scale_lr_is_set_after_each_epoch(preset):
  optim = bake.get_config(preset).optim
  ref = bake_small_scale_loop(optim.lr, optim.epochs)
  assert_lrs(epoch_lrs(optim), ref)


def test_bake_imagenet_cosine_is_set_at_the_start_of_each_epoch_with_the_warm_up_unshifted():
  """pycls `get_epoch_lr(e)` for the cosine part; the warm-up factor is ours (linear per step from 0)."""
  optim = bake.get_config('imagenet').optim
  assert optim.schedule_offset == 0
  cos = [0.5 * 0.4 * (1 + math.cos(math.pi * e / 100)) for e in range(100)]
  assert_lrs(epoch_lrs(with_fields(optim, warmup_epochs=0)), cos)


def test_warm_up_multiplies_the_shifted_schedule():
  optim = with_fields(podnet.get_config('digits').optim, epochs=10, lr=0.1, warmup_epochs=2)
  task = phase_task(0.1, 10, steps_per_epoch=4)
  for s in (0, 3, 4, 6, 8, 13):
    e = max(0, s // 4 - 1)
    want = 0.1 * 0.5 * (1 + math.cos(math.pi * e / 10)) * min(1.0, (s + 1) / 8)
    assert float(step_lib.learning_rate(optim, task, jnp.int32(s))) == pytest.approx(want, rel=1e-6)


def test_step_unit_shifts_the_continuous_epoch():
  optim = with_fields(podnet.get_config('digits').optim, epochs=10, lr=0.1, schedule_unit='step')
  task = phase_task(0.1, 10, steps_per_epoch=4)
  for s, x in ((0, 0.0), (5, 0.25), (22, 4.5)):
    want = 0.1 * 0.5 * (1 + math.cos(math.pi * x / 10))
    assert float(step_lib.learning_rate(optim, task, jnp.int32(s))) == pytest.approx(want, rel=1e-6)


# ---- recorded from PyTorch ----------------------------------------------------------------------------------
@pytest.mark.parametrize('key', sorted(TORCH_RECORDED))
def test_recorded_pytorch_schedules(key):
  schedule, loop = key
  ref = TORCH_RECORDED[key]
  fields = dict(epochs=12, lr=0.1, schedule=schedule, milestones=(4, 8) if schedule == 'multistep' else (),
                schedule_offset={'after': 0, 'after_epoch': -1, 'start': 1}[loop])
  optim = with_fields(lucir.get_config('digits').optim, **fields)
  assert_lrs(epoch_lrs(optim), ref)
  emulated = {'after': pycil_loop, 'after_epoch': podnet_loop,
              'start': lambda f, n: lucir_loop(f, n, torch_04=False)}[loop]
  np.testing.assert_allclose(emulated(closed_form(schedule, 0.1, 12, fields['milestones']), 12), ref, rtol=1e-9,
                             atol=1e-12)


# ---- validation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('value', [2, -2, True, None])
def test_schedule_offset_outside_minus_one_to_one_is_a_config_error(value):
  c = podnet.get_config('test')
  c.optim.schedule_offset = value
  with pytest.raises(ConfigError, match=r'optim.schedule_offset must be -1, 0 or 1'):
    validate.validate_config(c)


def test_every_method_config_sets_a_valid_offset():
  for module, preset, want in ((podnet, 'cifar100_b50_s10', -1), (podnet, 'imagenet100_b50_s10', -1),
                               (lucir, 'cifar100_b50_s10', 0), (icarl, 'cifar100_b0_s10', 0),
                               (lwf, 'cifar100_b0_s10', 0), (bake, 'cifar100', -1), (bake, 'imagenet', 0),
                               (bake, 'lucir_cifar100_b50_s10', 0)):
    c = module.get_config(preset)
    validate.validate_config(c)
    assert c.optim.schedule_offset == want, (module.__name__, preset)
