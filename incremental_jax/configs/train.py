"""Plain supervised training: cross-entropy on one task with every class (`data.increment=0`, the `finetune`
method). It trains the teachers of the distillation methods (configs/iekd.py loads a workdir of this config
through `--config.method.teacher_workdir=<workdir>`) and the scratch baselines of their students.

Presets `<data>_<network>`: cifar10_resnet{20,32,56,110}, cifar100_resnet{20,32,56,110} (CIFAR ResNets with 1x1
projection shortcuts, "option B" as the IE-KD release), imagenet_resnet{18,34}; digits (the digits teacher,
CIFAR ResNet-20 of width 16), digits_resnet8 (the digits student trained from scratch), and test.

CIFAR recipe (IE-KD release `config/ind/*`): 160 epochs, batch 128, SGD lr 0.1 with Nesterov momentum 0.9,
x0.1 at epochs 80 and 120, weight decay 5e-4, random crops (pad 4; zero padding, the release pads by reflection)
and flips.
ImageNet: the standard 90 epochs, batch 256, lr 0.1 x0.1 at 30 and 60, weight decay 1e-4.
"""
import ml_collections

from incremental_jax import config as cfglib


def single_task(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.data.initial_classes = 0
  c.data.increment = 0            # one task with every class: ordinary classification
  return c


def cifar(name: str):
  def preset(c):
    c.data.name = name
    c.optim.nesterov = True
    return single_task(c)
  return preset


def imagenet(c):
  c = cfglib.imagenet_subset(0, 0, 1000)(c)
  c.data.initial_classes = 0
  c.data.increment = 0
  c.optim.batch_size = 256
  c.optim.nesterov = True
  return c


def digits(c):
  """scikit-learn's digits as one 10-class task: ResNet-20 (width 16) for the teacher, 30 epochs of batch 32."""
  c = single_task(cfglib.digits(c))
  c.model.depth = 20
  c.optim.nesterov = True
  return c


def test(c):
  """A tiny digits run for the tests."""
  c = single_task(cfglib.test_preset(c))
  c.model.depth = 8
  c.model.width = 4
  c.optim.epochs = 1
  c.optim.nesterov = True
  return c


def with_network(data_preset, backbone: str, depth: int, width: int = 16):
  def preset(c):
    c = data_preset(c)
    c.model.backbone, c.model.depth, c.model.width = backbone, depth, width
    return c
  return preset


def _digits_resnet8(c):
  return with_network(digits, 'cifar_resnet', 8)(c)


PRESETS = cfglib.preset_table({
    **{f'{d}_resnet{n}': with_network(cifar(d), 'cifar_resnet', n) for d in ('cifar10', 'cifar100')
       for n in (20, 32, 56, 110)},
    'imagenet_resnet18': with_network(imagenet, 'resnet', 18, 64),
    'imagenet_resnet34': with_network(imagenet, 'resnet', 34, 64),
    'digits': digits,
    'digits_resnet8': _digits_resnet8,
    'test': test,
})


def get_config(arg=None):
  c = cfglib.base_config()
  c.method = cfglib.method_section('finetune')
  return cfglib.apply_preset(c, arg, PRESETS, default='cifar10_resnet56')
