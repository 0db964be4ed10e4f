"""ResNet backbones in flax.nnx: the CIFAR ResNet-20/32/56/110 (He et al. 2016, Sec. 4.2; the ResNet-32 of
iCaRL/LUCIR/PODNet) and the ImageNet ResNet-18/34/50 (He et al. 2016, Table 1).

A backbone maps images [B, H, W, C] to `{'stages': (feature map after each stage, ...), 'embedding': [B, D]}`;
distillation methods read the stage maps (POD, auxiliary distillation, IE-KD factors). Sub-modules are named
attributes (`stage2_block0`), never lists, so that parameter trees are string-keyed dicts that round-trip
through checkpoints unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from incremental_jax.errors import ConfigError
from incremental_jax.models import conv as conv_lib
from incremental_jax.registry import Registry

# PyTorch ResNets initialise convolutions with kaiming_normal(mode='fan_out', nonlinearity='relu').
_CONV_INIT = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')


@dataclasses.dataclass(frozen=True)
class Layers:
  """How the backbone's layers compute: `conv_lowering` names the convolution (`models.conv.LOWERINGS`; the
  network builder takes the one `backend_tuning` gives the backend), `dtype` the compute dtype (None: float32;
  bfloat16 for mixed precision). Parameters are always float32."""
  conv_lowering: str = 'xla'
  dtype: Optional[Any] = None
  bn_running_var: str = 'unbiased'   # `model.bn_running_var`: BatchNorm's running-variance update (BATCH_NORMS)

  def conv(self, cin: int, cout: int, kernel: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding=[(kernel // 2, kernel // 2)] * 2,
                    use_bias=False, kernel_init=_CONV_INIT, dtype=self.dtype,
                    conv_general_dilated=conv_lib.LOWERINGS.lookup(self.conv_lowering, 'conv_lowering'), rngs=rngs)

  def bn(self, c: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # PyTorch's BatchNorm2d(momentum=0.1, eps=1e-5) in Flax's convention.
    kind = BATCH_NORMS.lookup(self.bn_running_var, 'model.bn_running_var')
    return kind(c, momentum=0.9, epsilon=1e-5, dtype=self.dtype, rngs=rngs)


class TorchBatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` whose running variance follows PyTorch's `BatchNorm2d` (ATen's `batch_norm` update,
  running_var <- (1 - m) running_var + m * var * n / (n - 1)): the batch's unbiased variance over its n values per
  channel (real examples times spatial positions), where flax's update uses the biased one. The batch itself is
  normalised by its biased variance, in both. Same variables, so checkpoints are unchanged; the difference is
  1 / (n - 1) of the update (2e-3 at n = 512, e.g. batch 8 on an 8x8 map), which the teacher of a distillation
  method sees in inference mode."""

  def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None, *,
               mask: Optional[jax.Array] = None) -> jax.Array:
    frozen = self.use_running_average if use_running_average is None else use_running_average
    if frozen:
      return super().__call__(x, use_running_average=True, mask=mask)
    before = self.var[...]
    y = super().__call__(x, use_running_average=False, mask=mask)
    real = jnp.ones(x.shape, jnp.float32) if mask is None else jnp.broadcast_to(mask, x.shape).astype(jnp.float32)
    n = real.sum() / x.shape[-1]
    after = self.var[...]   # momentum * before + (1 - momentum) * biased variance
    self.var[...] = jax.lax.stop_gradient(after + (after - self.momentum * before) / jnp.maximum(n - 1.0, 1.0))
    return y


# model.bn_running_var -> the BatchNorm class: 'unbiased' (PyTorch's update, every official code's) or 'biased'
# (flax's, the library's before issue 33; the value of checkpoints written before the field).
BATCH_NORMS: Registry[type] = Registry('a BatchNorm running-variance update', {'unbiased': TorchBatchNorm,
                                                                              'biased': nnx.BatchNorm})


def batch_norm(bn: nnx.BatchNorm, x: jax.Array, train: bool, mask: Optional[jax.Array] = None) -> jax.Array:
  """`bn(x)` with batch statistics (`train`) or the running ones. In training mode with `mask` [B] (True for a
  real example, False for the padding of a last partial batch) the batch mean and (biased) variance are those of
  the real examples only, and the running statistics are updated from them (flax's masked statistics: the
  padding changes nothing, as if the batch held the real examples alone); every example is normalised by them.
  Without `mask` it is flax's plain call."""
  if mask is None or not train:
    return bn(x, use_running_average=not train)
  return bn(x, use_running_average=False, mask=mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)))


class Shortcut(nnx.Module):
  """Projection when shape changes: 1x1 conv + BN ('conv', option B), or subsample + zero channel padding
  ('pad', option A of He et al., the CIFAR ResNet of the original paper and of PODNet)."""

  def __init__(self, cin: int, cout: int, stride: int, kind: str, rngs: nnx.Rngs, layers: Layers = Layers()):
    self.kind, self.stride, self.pad = kind, stride, cout - cin
    if kind == 'conv':
      self.conv = layers.conv(cin, cout, 1, stride, rngs)
      self.bn = layers.bn(cout, rngs)
    elif kind != 'pad':
      raise ConfigError(f"shortcut must be 'conv' or 'pad'; got {kind!r}.")

  def __call__(self, x: jax.Array, train: bool, mask: Optional[jax.Array] = None) -> jax.Array:
    if self.kind == 'conv':
      return batch_norm(self.bn, self.conv(x), train, mask)
    x = x[:, ::self.stride, ::self.stride, :]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.pad)))


def _add_shortcut(y: jax.Array, shortcut: Optional[Shortcut], x: jax.Array, train: bool, relu: bool,
                  mask: Optional[jax.Array] = None) -> jax.Array:
  """A block's output: its last BatchNorm's output `y` plus the shortcut of its input `x` (the identity when
  `shortcut` is None), then a ReLU unless `relu` is False."""
  y = y + (x if shortcut is None else shortcut(x, train, mask))
  return jax.nn.relu(y) if relu else y


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions with a residual connection; `relu_out=False` returns the pre-activation sum
  (LUCIR removes the last ReLU so cosine-normalised features can be negative)."""
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int, shortcut: str, rngs: nnx.Rngs, relu_out: bool = True,
               layers: Layers = Layers()):
    cout = planes * self.expansion
    self.conv1, self.bn1 = layers.conv(cin, planes, 3, stride, rngs), layers.bn(planes, rngs)
    self.conv2, self.bn2 = layers.conv(planes, planes, 3, 1, rngs), layers.bn(planes, rngs)
    self.shortcut = Shortcut(cin, cout, stride, shortcut, rngs, layers) if (stride != 1 or cin != cout) else None
    self.relu_out = relu_out

  def __call__(self, x: jax.Array, train: bool, mask: Optional[jax.Array] = None) -> jax.Array:
    y = jax.nn.relu(batch_norm(self.bn1, self.conv1(x), train, mask))
    y = batch_norm(self.bn2, self.conv2(y), train, mask)
    return _add_shortcut(y, self.shortcut, x, train, self.relu_out, mask)


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 -> 1x1 bottleneck (ResNet-50 and deeper), stride on the 3x3 convolution."""
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int, shortcut: str, rngs: nnx.Rngs, relu_out: bool = True,
               layers: Layers = Layers()):
    cout = planes * self.expansion
    self.conv1, self.bn1 = layers.conv(cin, planes, 1, 1, rngs), layers.bn(planes, rngs)
    self.conv2, self.bn2 = layers.conv(planes, planes, 3, stride, rngs), layers.bn(planes, rngs)
    self.conv3, self.bn3 = layers.conv(planes, cout, 1, 1, rngs), layers.bn(cout, rngs)
    self.shortcut = Shortcut(cin, cout, stride, shortcut, rngs, layers) if (stride != 1 or cin != cout) else None
    self.relu_out = relu_out

  def __call__(self, x: jax.Array, train: bool, mask: Optional[jax.Array] = None) -> jax.Array:
    y = jax.nn.relu(batch_norm(self.bn1, self.conv1(x), train, mask))
    y = jax.nn.relu(batch_norm(self.bn2, self.conv2(y), train, mask))
    y = batch_norm(self.bn3, self.conv3(y), train, mask)
    return _add_shortcut(y, self.shortcut, x, train, self.relu_out, mask)


BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


class ResNet(nnx.Module):
  """A residual network: stem, then stages of blocks, then global average pooling.

  Args:
    in_channels: image channels.
    stage_channels: planes of each stage (the first stage keeps the resolution, later ones halve it).
    stage_blocks: number of blocks per stage.
    block: 'basic' or 'bottleneck'.
    stem: 'cifar' (3x3 conv, stride 1) or 'imagenet' (7x7 conv stride 2, then 3x3 max-pool stride 2).
    shortcut: 'conv' or 'pad' (see Shortcut).
    last_relu: False drops the ReLU at the end of the last block (LUCIR, PODNet).
    layers: convolution lowering and compute dtype (`Layers`); the stage maps and the embedding are returned
      in float32 whatever the compute dtype.
  """

  def __init__(self, in_channels: int, stage_channels: Sequence[int], stage_blocks: Sequence[int], *,
               block: str = 'basic', stem: str = 'cifar', shortcut: str = 'conv', last_relu: bool = True,
               layers: Layers = Layers(), rngs: nnx.Rngs):
    if stem not in ('cifar', 'imagenet'):
      raise ConfigError(f"stem must be 'cifar' or 'imagenet'; got {stem!r}.")
    if block not in BLOCKS:
      raise ConfigError(f'block must be one of {sorted(BLOCKS)}; got {block!r}.')
    block_cls = BLOCKS[block]
    self.stem_kind = stem
    self.stem_conv = layers.conv(in_channels, stage_channels[0], 3 if stem == 'cifar' else 7,
                                 1 if stem == 'cifar' else 2, rngs)
    self.stem_bn = layers.bn(stage_channels[0], rngs)
    self.layout = tuple(int(n) for n in stage_blocks)
    cin = stage_channels[0]
    for s, (planes, n) in enumerate(zip(stage_channels, stage_blocks)):
      for b in range(n):
        last = s == len(stage_blocks) - 1 and b == n - 1
        stride = 2 if (s > 0 and b == 0) else 1
        setattr(self, f'stage{s}_block{b}',
                block_cls(cin, planes, stride, shortcut, rngs, relu_out=last_relu or not last, layers=layers))
        cin = planes * block_cls.expansion
    self.embedding_dim = cin

  def __call__(self, x: jax.Array, train: bool = False, mask: Optional[jax.Array] = None) -> dict:
    """`mask` [B]: in training mode, the real examples of a padded batch (`batch_norm`); None: all."""
    x = jax.nn.relu(batch_norm(self.stem_bn, self.stem_conv(x), train, mask))
    if self.stem_kind == 'imagenet':
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    stages = []
    for s, n in enumerate(self.layout):
      for b in range(n):
        x = getattr(self, f'stage{s}_block{b}')(x, train, mask)
      stages.append(x.astype(jnp.float32))
    return {'stages': tuple(stages), 'embedding': x.astype(jnp.float32).mean(axis=(1, 2))}


def cifar_resnet(in_channels: int, depth: int = 32, width: int = 16, *, rngs: nnx.Rngs, **kw) -> ResNet:
  """CIFAR ResNet of depth 6n+2 (20, 32, 44, 56, 110): three stages of n basic blocks, width/2w/4w channels."""
  if depth < 8 or (depth - 2) % 6:
    raise ConfigError(f'CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, 110); got {depth}.')
  n = (depth - 2) // 6
  return ResNet(in_channels, (width, 2 * width, 4 * width), (n, n, n), block='basic', rngs=rngs, **kw)


IMAGENET_LAYOUTS = {10: ('basic', (1, 1, 1, 1)), 18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)),
                    50: ('bottleneck', (3, 4, 6, 3)), 101: ('bottleneck', (3, 4, 23, 3)),
                    152: ('bottleneck', (3, 8, 36, 3))}


def imagenet_resnet(in_channels: int, depth: int = 18, width: int = 64, *, rngs: nnx.Rngs, stem: str = 'imagenet',
                    **kw) -> ResNet:
  """ImageNet ResNet-18/34/50/101/152 (and a tiny 10-layer variant for tests); `stem='cifar'` gives the
  small-image variant used for CIFAR ResNet-18 (BAKE)."""
  if depth not in IMAGENET_LAYOUTS:
    raise ConfigError(f'ResNet depth must be one of {sorted(IMAGENET_LAYOUTS)}; got {depth}.')
  block, layout = IMAGENET_LAYOUTS[depth]
  return ResNet(in_channels, tuple(width * 2**i for i in range(4)), layout, block=block, stem=stem, rngs=rngs, **kw)
