"""BAKE (Ge et al. 2021, "Self-distillation with Batch Knowledge Ensembling Improves ImageNet Classification"):
cross-entropy plus self-distillation towards soft targets ensembled from the other images of the batch
(`incremental_jax/losses/bake.py`), with the intra-class sampler (`data.sampler='intra_class'`: each batch is
batch_size/(M+1) anchors each followed by M images of its class; one epoch visits (M+1) times the data).

Ordinary classification (one task with every class, `data.increment=0`), method 'bake':
  cifar100 (default)  ResNet-18 (CIFAR stem), batch 128 images with M=3, SGD 0.1 (momentum 0.9), weight decay
                      1e-4, 200 epochs, lr x0.1 at epochs 100 and 150, T=4, w=0.5, r=1 (official `small_scale`
                      code). Reported: top-1 error 21.28 (best epoch; the official network is a pre-activation
                      ResNet-18 without the final BN-ReLU, ours the standard post-activation one).
  imagenet            ResNet-50 from an image-folder tree, batch 512 with M=1, SGD Nesterov 0.4, cosine over 100
                      epochs with 5 warm-up epochs, weight decay 5e-5, T=4, w=0.5, r=1 (official `imagenet`
                      configs). Reported: top-1 78.0. Deviations: warm-up is linear from 0 per step (pycls: from
                      0.1x per epoch); augmentation is padded random crop + flip (pycls: random-sized crop,
                      lighting); no precise-BN recomputation.
  digits              the embedded digits as one 10-class task (runs offline in minutes).
  digits_ce           the same run with plain cross-entropy (method 'finetune'): same sampler, seed and steps.
  test                a tiny digits run for the unit tests.

BAKE added to an incremental method (`method.aux_losses.bake`, see `add_bake`):
  lucir_digits        LUCIR's digits protocol (configs/lucir.py:digits) + BAKE (M=1).
  lucir_cifar100_b50_s10  LUCIR's CIFAR-100 B50 10-step protocol + BAKE (M=1); the sampler doubles each epoch.
  icarl_digits        iCaRL's digits protocol + BAKE (M=1).

Other small data sets in the official code: TinyImageNet (batch 128, M=1, w=0.9), CUB-200 (batch 32, M=3,
w=0.5), Stanford Dogs / MIT67 (batch 32, M=1, w=0.9).
"""
import importlib

import ml_collections

from incremental_jax import config as cfglib


def add_bake(c: ml_collections.ConfigDict, weight: float = 1.0, temperature: float = 4.0, omega: float = 0.5,
             same_class_per_anchor: int = 1) -> ml_collections.ConfigDict:
  """Adds BAKE to any method's config as an auxiliary loss term (`method.aux_losses.bake`: weight r,
  temperature T, propagation weight w) and switches to the intra-class sampler with M same-class partners per
  anchor. Note that the sampler makes an epoch (M+1) times longer."""
  c.method.aux_losses = ml_collections.ConfigDict(
      {'bake': {'weight': weight, 'temperature': temperature, 'omega': omega}})
  c.data.sampler = 'intra_class'
  c.data.same_class_per_anchor = same_class_per_anchor
  return c


def single_task(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Ordinary classification: one task with every class."""
  c.data.initial_classes = 0
  c.data.increment = 0
  return c


def cifar100(c):
  c.data.name = 'cifar100'
  c.data.same_class_per_anchor = 3
  c.model.update(backbone='resnet', depth=18, width=64, stem='cifar')
  c.optim.update(batch_size=128, lr=0.1, weight_decay=1e-4, epochs=200, milestones=(100, 150))
  return c


def imagenet(c):
  c = single_task(cfglib.imagenet_subset(0, 0, num_classes=1000)(c))
  c.data.same_class_per_anchor = 1
  c.model.depth = 50
  c.optim.update(batch_size=512, lr=0.4, nesterov=True, weight_decay=5e-5, epochs=100, schedule='cosine',
                 milestones=(), warmup_epochs=5,
                 schedule_offset=0)   # pycls sets epoch e's lr from e at its start (pycls/core/trainer.py)
  return c


def digits(c):
  c = single_task(cfglib.digits(c))
  c.data.same_class_per_anchor = 3   # batch 32 = 8 anchors x (1 + 3 partners): 179 steps per epoch
  c.optim.epochs = 10
  c.optim.milestones = (5, 8)
  return c


def digits_ce(c):
  c = digits(c)
  c.method = cfglib.method_section('finetune')
  return c


def test(c):
  c = single_task(cfglib.test_preset(c))
  c.data.same_class_per_anchor = 3
  c.optim.epochs = 1
  return c


def on_method(config_module: str, preset: str, same_class_per_anchor: int = 1):
  """A preset: `configs/<config_module>.py:<preset>` with BAKE added (`add_bake`)."""

  def build(c):
    del c  # built from the other method's config instead
    base = importlib.import_module(f'incremental_jax.configs.{config_module}').get_config(preset)
    return add_bake(base, same_class_per_anchor=same_class_per_anchor)

  build.__doc__ = f'configs/{config_module}.py:{preset} + BAKE (M={same_class_per_anchor}).'
  return build


PRESETS = cfglib.preset_table({
    'cifar100': cifar100,
    'imagenet': imagenet,
    'digits': digits,
    'digits_ce': digits_ce,
    'test': test,
    'lucir_digits': on_method('lucir', 'digits'),
    'lucir_cifar100_b50_s10': on_method('lucir', 'cifar100_b50_s10'),
    'icarl_digits': on_method('icarl', 'digits'),
})


def get_config(arg=None):
  c = single_task(cfglib.base_config())
  c.method = cfglib.method_section('bake', temperature=4.0, omega=0.5, weight=1.0)
  c.data.sampler = 'intra_class'
  c.optim.schedule_offset = -1    # small_scale/train.py sets the lr after each epoch from that epoch
                                  # (adjust_learning_rate): epochs 0 and 1 train at 0.1, the drops come one late
  return cfglib.apply_preset(c, arg, PRESETS, default='cifar100')
