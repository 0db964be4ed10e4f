"""iCaRL (Rebuffi et al., CVPR 2017): herding exemplars, KD from the previous model, NME classification.

Presets: digits (embedded, runs offline), cifar100_b50_s10 (default), cifar100_b0_s10, and the other shared
protocols of incremental_jax.config.COMMON_PRESETS. CIFAR-100 hyperparameters follow PyCIL's iCaRL (2000
exemplars in total; 200 epochs on the first task, 170 later). Reported (PyCIL, CIFAR-100 B0 10 steps,
ResNet-32): average incremental accuracy 64.42.
"""
import ml_collections

from incremental_jax import config as cfglib


def pycil_cifar100(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """PyCIL's CIFAR-100 data protocol (`utils/data.py::iCIFAR100`, `convs/cifar_resnet.py::resnet32`): brightness
  jitter 63/255, its normalisation constants, option-A shortcuts with the last ReLU, no flipped NME view. PyCIL's
  ColorJitter is multiplicative, as `data.augment.brightness_mode='multiply'` (docs/protocols.md)."""
  c.data.augment.brightness = 63 / 255
  c.data.mean, c.data.std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
  c.model.shortcut = 'pad'
  c.memory.nme_flip = False
  return c


def get_config(arg=None):
  c = cfglib.base_config()
  c.method = cfglib.method_section('icarl', loss='ce_kd', kd_temperature=2.0, kd_weight=1.0)
  c.memory.per_class, c.memory.total = 0, 2000
  c.optim.epochs = 170
  c.optim.milestones = (80, 120)
  c.optim.weight_decay = 2e-4
  c.optim.first_task_epochs = 200
  c.optim.first_task_milestones = (60, 120, 170)
  c.optim.first_task_weight_decay = 5e-4
  c.optim.schedule_offset = 0      # PyCIL: scheduler.step() after each epoch (epoch e trains with the value at e)
  c = cfglib.apply_preset(c, arg, cfglib.COMMON_PRESETS, default='cifar100_b50_s10')
  if c.data.name == 'cifar100':
    c = pycil_cifar100(c)
  if c.data.name == 'digits':
    c.memory.total = 0
    c.optim.first_task_epochs = 0
    c.optim.first_task_milestones = ()
    c.optim.first_task_weight_decay = 0.0
  return c
