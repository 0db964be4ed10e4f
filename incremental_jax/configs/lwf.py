"""LwF (Li & Hoiem, ECCV 2016), class-incremental: CE on new classes + KD (T=2, weight 3, as PyCIL) on old ones.

Presets: digits (embedded), cifar100_b50_s10 (default) and the other shared protocols. CIFAR-100 presets follow
PyCIL's `models/lwf.py` (200 epochs on the first task, milestones 60/120/160, weight decay 5e-4; then 250
epochs, milestones 60/120/180/220, weight decay 2e-4; lr 0.1, batch 128) and its data protocol
(`configs.icarl.pycil_cifar100`). PyCIL's own run (`exps/lwf.json`) is B0 in 10 steps: `cifar100_b0_s10`."""
import ml_collections

from incremental_jax import config as cfglib
from incremental_jax.configs.icarl import pycil_cifar100


def get_config(arg=None):
  c = cfglib.base_config()
  c.method = cfglib.method_section('lwf', kd_temperature=2.0, kd_weight=3.0)
  c.optim.schedule_offset = 0      # PyCIL: scheduler.step() after each epoch (epoch e trains with the value at e)
  c = cfglib.apply_preset(c, arg, cfglib.COMMON_PRESETS, default='cifar100_b50_s10')
  if c.data.name == 'cifar100':
    c = pycil_cifar100(c)
    c.optim.update(epochs=250, milestones=(60, 120, 180, 220), weight_decay=2e-4, first_task_epochs=200,
                   first_task_milestones=(60, 120, 160), first_task_weight_decay=5e-4)   # PyCIL's init_weight_decay
  return c
