"""Factors of feature maps (Factor Transfer, Kim et al. NeurIPS 2018; IE-KD, Huang et al. CVPR 2021).

A *factor* is a compressed code of a network's last-stage feature map: an encoder of three 3x3 convolutions
(stride 1, padding 1, so the spatial size is kept) reduces C channels to round(rate * C). The teacher's
autoencoder (the "paraphraser") is trained to reconstruct the teacher's feature map from its factor and then
frozen; the student's encoders (the "translators") map parts of the student's feature map into the same factor
space, where the IE-KD losses compare them.

Layout, following the IE-KD release (`model/auto_encoder.py`, its `Coder`, used for the encoder and the decoder
alike): a LeakyReLU(0.1) on the input, then three [conv 3x3 (no bias) -> BatchNorm -> LeakyReLU(0.1)] layers; the
encoder goes C -> C -> rate*C -> rate*C and the decoder mirrors it, rate*C -> rate*C -> C -> C. The leading
LeakyReLU is the identity on an encoder's input (the ResNet's last-stage output after its final ReLU, non-negative)
but not on the decoder's: the factor is a LeakyReLU output, about half of it negative, and the decoder sees those
entries scaled by 0.1. Without it the paraphraser reconstructs from a different input and trains to different
factors, which the student then inherits from.

The decoder uses plain convolutions, not transposed ones (the paper says "deconvolution"; the IE-KD release uses
`nn.Conv2d`, the Factor Transfer release `nn.ConvTranspose2d`): at stride 1 with padding 1 a 3x3 transposed
convolution *is* a 3x3 convolution with a flipped, transposed kernel, so both express the same functions and the
choice only changes the initialisation; the plain convolution reuses the backbones' layers and initialiser.

The modules are NHWC like the backbones; factors are [B, H, W, rate*C].
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from incremental_jax.models.network import Classifier
from incremental_jax.models.resnet import Layers, batch_norm
from incremental_jax.errors import ConfigError

LEAKY_SLOPE = 0.1


def factor_channels(channels: int, rate: float) -> int:
  """Channels of the factor of a C-channel feature map at factor rate k: round(k * C), at least 1."""
  return max(1, int(round(rate * channels)))


class ConvStack(nnx.Module):
  """LeakyReLU(0.1), then three [conv 3x3 (stride 1, no bias) -> BatchNorm -> LeakyReLU(0.1)] layers through
  `channels` (c0 -> c1 -> c2 -> c3): the release's `Coder`; the encoder and the decoder of a factor autoencoder
  are both such stacks."""

  def __init__(self, channels: Sequence[int], *, rngs: nnx.Rngs, layers: Layers = Layers()):
    c = tuple(int(v) for v in channels)
    if len(c) != 4:
      raise ValueError(f'a conv stack needs 4 channel counts (input and 3 layers); got {c}.')
    self.conv0, self.bn0 = layers.conv(c[0], c[1], 3, 1, rngs), layers.bn(c[1], rngs)
    self.conv1, self.bn1 = layers.conv(c[1], c[2], 3, 1, rngs), layers.bn(c[2], rngs)
    self.conv2, self.bn2 = layers.conv(c[2], c[3], 3, 1, rngs), layers.bn(c[3], rngs)

  def __call__(self, x: jax.Array, train: bool = False, mask: Optional[jax.Array] = None) -> jax.Array:
    x = jax.nn.leaky_relu(x, LEAKY_SLOPE)   # the release's leading activation (see the module docstring)
    for i in range(3):
      conv, bn = getattr(self, f'conv{i}'), getattr(self, f'bn{i}')
      x = jax.nn.leaky_relu(batch_norm(bn, conv(x), train, mask), LEAKY_SLOPE)
    return x


def factor_encoder(in_channels: int, out_channels: int, *, rngs: nnx.Rngs) -> ConvStack:
  """Encoder C -> C -> F -> F (the paraphraser's encoder; IE-KD's inheritance/exploration encoders)."""
  return ConvStack((in_channels, in_channels, out_channels, out_channels), rngs=rngs)


class FactorAutoencoder(nnx.Module):
  """The teacher's paraphraser: `__call__(feature [B,H,W,C]) -> {'factor' [B,H,W,F], 'reconstruction'
  [B,H,W,C]}` with F = `factor_channels(C, rate)`."""

  def __init__(self, in_channels: int, rate: float = 0.5, *, rngs: nnx.Rngs):
    f = factor_channels(in_channels, rate)
    self.encoder = factor_encoder(in_channels, f, rngs=rngs)
    self.decoder = ConvStack((f, f, in_channels, in_channels), rngs=rngs)

  def __call__(self, x: jax.Array, train: bool = False, mask: Optional[jax.Array] = None) -> dict:
    factor = self.encoder(x, train, mask)
    return {'factor': factor, 'reconstruction': self.decoder(factor, train, mask)}


def channel_split(num_channels: int, mode: str = 'natural', seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Channel indices of the inheritance and exploration parts of a C-channel feature map (IE-KD's
  `divide_features`): 'natural' gives the first floor(C/2) channels to inheritance and the rest to exploration;
  'random' does the same on a permutation drawn from `np.random.default_rng(seed)`. Disjoint; together all."""
  if num_channels < 2:
    raise ConfigError(f'IE-KD splits the student feature map in two; it has {num_channels} channel(s).')
  if mode == 'natural':
    order = np.arange(num_channels)
  elif mode == 'random':
    order = np.random.default_rng(seed).permutation(num_channels)
  else:
    raise ConfigError(f"method.split must be 'natural' or 'random'; got {mode!r}.")
  half = num_channels // 2
  return np.sort(order[:half]), np.sort(order[half:])


def take_channels(x: jax.Array, index: Sequence[int]) -> jax.Array:
  """x[..., index] (a slice when the indices are contiguous)."""
  index = tuple(int(i) for i in index)
  if index == tuple(range(index[0], index[0] + len(index))):
    return x[..., index[0]:index[0] + len(index)]
  return jnp.take(x, jnp.asarray(index), axis=-1)


class IEStudent(Classifier):
  """The IE-KD student: a classifier (backbone + head) plus two trainable encoders. Its last-stage feature map
  is split along channels into an inheritance part and an exploration part (`channel_split`); each part is
  encoded into the factor space (F channels, the teacher factor's) by its own encoder.

  Outputs: the classifier's (`stages`, `embedding`, `logits`) plus `factor_inherit` and `factor_explore`
  [B, H, W, F]. Parameters: `backbone`, `head`, `inherit_encoder`, `explore_encoder`.
  """

  def __init__(self, classifier: Classifier, factor_dim: int, split: str = 'natural', split_seed: int = 0, *,
               rngs: nnx.Rngs):
    super().__init__(classifier.backbone, classifier.head)
    inherit, explore = channel_split(classifier.backbone.embedding_dim, split, split_seed)
    self.inherit_index = tuple(int(i) for i in inherit)
    self.explore_index = tuple(int(i) for i in explore)
    self.inherit_encoder = factor_encoder(len(inherit), factor_dim, rngs=rngs)
    self.explore_encoder = factor_encoder(len(explore), factor_dim, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool = False, mask: Optional[jax.Array] = None) -> dict:
    out = super().__call__(x, train, mask)
    feature = out['stages'][-1]
    out['factor_inherit'] = self.inherit_encoder(take_channels(feature, self.inherit_index), train, mask)
    out['factor_explore'] = self.explore_encoder(take_channels(feature, self.explore_index), train, mask)
    return out


class MutualPeers(nnx.Module):
  """IE-DML's pair of peers trained together: `peer_a` and `peer_b` are IE-KD students (each learns from the
  other's factor), `autoencoder_a` / `autoencoder_b` the paraphrasers of each peer's own feature map (each teaches
  the other). `__call__` returns the outputs of the peer named by `eval_peer` ('a' or 'b'), which the run
  evaluates."""

  def __init__(self, classifier_a: Classifier, classifier_b: Classifier, rate: float = 0.5,
               split: str = 'natural', split_seed: int = 0, eval_peer: str = 'a', *, rngs: nnx.Rngs):
    if eval_peer not in ('a', 'b'):
      raise ConfigError(f"method.eval_peer must be 'a' or 'b'; got {eval_peer!r}.")
    ca, cb = classifier_a.backbone.embedding_dim, classifier_b.backbone.embedding_dim
    self.peer_a = IEStudent(classifier_a, factor_channels(cb, rate), split, split_seed, rngs=rngs)
    self.peer_b = IEStudent(classifier_b, factor_channels(ca, rate), split, split_seed, rngs=rngs)
    self.autoencoder_a = FactorAutoencoder(ca, rate, rngs=rngs)
    self.autoencoder_b = FactorAutoencoder(cb, rate, rngs=rngs)
    self.eval_peer = eval_peer

  def __call__(self, x: jax.Array, train: bool = False, mask: Optional[jax.Array] = None) -> dict:
    return getattr(self, f'peer_{self.eval_peer}')(x, train, mask)
