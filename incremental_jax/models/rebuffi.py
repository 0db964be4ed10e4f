"""PODNet's CIFAR network, the "rebuffi" ResNet-32 (arthurdouillard/incremental_learning.pytorch,
`inclearn/convnet/my_resnet.py::CifarResNet` as built by `resnet_rebuffi()` for `convnet: rebuffi` in
`options/podnet/podnet_cnn_cifar100.yaml`), in flax.nnx.

With n = (depth - 2) / 6 (5 for ResNet-32) and width w (16):

- stem: 3x3 convolution to w channels, BatchNorm, ReLU;
- stage 1: n blocks at w channels; stage 2: a stride-2 block to 2w then n - 1 blocks; stage 3: a stride-2 block
  to 4w then n - 2 blocks; stage 4: one block at 4w (3n blocks, 6n + 2 layers with the classifier);
- every block is conv-BN-ReLU-conv-BN plus the shortcut, with no ReLU after the residual addition; the
  official `last_relu` option (`model.last_relu=True` here) applies a ReLU between the blocks of stages 1-3 only,
  after the map is recorded; PODNet's configs leave it off;
- the shortcut of a stride-2 block is the official 'stride' downsampling (every second pixel, zero channels
  appended: `model.shortcut='pad'`) or a 1x1 conv + BN ('conv', its `downsampling: conv`);
- the second BatchNorm of every block starts with scale 0 (the official `zero_residual=True`);
- `stages` holds the four maps the official code hands to POD (`attention`): the last block's output of stages
  1-3 and stage 4's output, all before any ReLU ([B, 32, 32, w], [B, 16, 16, 2w], [B, 8, 8, 4w], [B, 8, 8, 4w]
  on CIFAR); `embedding` is the global average of stage 4's output without ReLU (PODNet classifies and extracts
  the `raw_features`: `classifier_no_act=True`, `extract_no_act=True`).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from incremental_jax.errors import ConfigError
from incremental_jax.models.resnet import BasicBlock, Layers, batch_norm


class RebuffiResNet(nnx.Module):
  """The official PODNet CIFAR ResNet (module docstring). `last_relu` is the official option of the same name
  (a ReLU between the blocks of stages 1-3), not a ReLU at the network's end."""

  def __init__(self, in_channels: int, depth: int = 32, width: int = 16, *, shortcut: str = 'pad',
               last_relu: bool = False, layers: Layers = Layers(), rngs: nnx.Rngs):
    if depth < 14 or (depth - 2) % 6:
      raise ConfigError(f'model.depth={depth}: the rebuffi ResNet needs depth 6n+2 with n >= 2 (14, 20, 32, 56).')
    n = (depth - 2) // 6
    self.block_relu = bool(last_relu)
    self.stem_conv = layers.conv(in_channels, width, 3, 1, rngs)
    self.stem_bn = layers.bn(width, rngs)
    # (channels, blocks, stride of the first block) of stages 1-4.
    self.layout = ((width, n, 1), (2 * width, n, 2), (4 * width, n - 1, 2), (4 * width, 1, 1))
    cin = width
    for s, (planes, blocks, stride) in enumerate(self.layout):
      for b in range(blocks):
        block = BasicBlock(cin, planes, stride if b == 0 else 1, shortcut, rngs, relu_out=False, layers=layers)
        block.bn2.scale[...] = jnp.zeros_like(block.bn2.scale[...])   # zero_residual
        setattr(self, f'stage{s}_block{b}', block)
        cin = planes
    self.embedding_dim = cin

  def __call__(self, x: jax.Array, train: bool = False, mask: Optional[jax.Array] = None) -> dict:
    """`mask` [B]: in training mode, the real examples of a padded batch (`resnet.batch_norm`); None: all."""
    x = jax.nn.relu(batch_norm(self.stem_bn, self.stem_conv(x), train, mask))
    stages = []
    for s, (_, blocks, _) in enumerate(self.layout):
      for b in range(blocks):
        x = getattr(self, f'stage{s}_block{b}')(x, train, mask)
        if b == blocks - 1:
          stages.append(x.astype(jnp.float32))
        if self.block_relu and s < 3:
          x = jax.nn.relu(x)
    return {'stages': tuple(stages), 'embedding': x.astype(jnp.float32).mean(axis=(1, 2))}


def rebuffi_resnet(in_channels: int, depth: int = 32, width: int = 16, *, rngs: nnx.Rngs, **kw) -> RebuffiResNet:
  """`model.backbone='rebuffi'`: PODNet's CIFAR ResNet (module docstring)."""
  return RebuffiResNet(in_channels, depth, width, rngs=rngs, **kw)
