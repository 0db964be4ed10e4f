import jax
import jax.numpy as jnp
import numpy as np
import pytest
from incremental_jax import config as cfglib

from incremental_jax.models import build_model
from incremental_jax.train import head_update_mask


def _jit_apply(model, train):
  return jax.jit(lambda p, s, x: model.apply(p, s, x, train=train))


def _cfg(**kw):
  c = cfglib.base_config().model
  c.update(dict(dict(backbone='cifar_resnet', depth=32, width=16, head='linear', last_relu=True, shortcut='conv'),
                **kw))
  return c


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_resnet32_size_and_outputs():
  model = build_model(_cfg(), 100, (32, 32, 3))
  params, stats = model.init_variables()
  # stem 3*3*3*16 + BN 32; stage 1: 5 * (2 * 2304 + 64); stage 2: (4608 + 9216 + 128 + 512 + 64) + 4 * 18560;
  # stage 3: (18432 + 36864 + 256 + 2048 + 128) + 4 * 73984; head 64 * 100 + 100
  assert _count(params) == 464 + 23_360 + 88_768 + 353_664 + 6_500
  out, new_stats = _jit_apply(model, True)(params, stats, jnp.ones((2, 32, 32, 3)))
  assert out['logits'].shape == (2, 100) and out['embedding'].shape == (2, 64)
  assert [s.shape for s in out['stages']] == [(2, 32, 32, 16), (2, 16, 16, 32), (2, 8, 8, 64)]
  # training mode updates the running statistics, inference mode leaves them alone
  assert not np.allclose(jax.tree.leaves(new_stats)[0], jax.tree.leaves(stats)[0])
  _, same = _jit_apply(model, False)(params, stats, jnp.ones((2, 32, 32, 3)))
  jax.tree.map(np.testing.assert_array_equal, same, stats)


def test_last_relu_off_gives_negative_features_and_pad_shortcut_has_no_projection():
  model = build_model(_cfg(depth=8, width=4, last_relu=False, shortcut='pad'), 5, (8, 8, 1))
  params, stats = model.init_variables()
  assert 'shortcut' not in str(jax.tree_util.tree_structure(params))
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
  out, _ = _jit_apply(model, True)(params, stats, x)
  assert float(out['stages'][-1].min()) < 0
  relu_model = build_model(_cfg(depth=8, width=4), 5, (8, 8, 1))
  out2, _ = _jit_apply(relu_model, True)(*relu_model.init_variables(), x)
  assert float(out2['stages'][-1].min()) >= 0


@pytest.mark.parametrize('depth,expected', [(18, 11_689_512), (50, 25_557_032)])
def test_imagenet_resnet_sizes_match_torchvision(depth, expected):
  model = build_model(_cfg(backbone='resnet', depth=depth, width=64, stem='imagenet'), 1000, (224, 224, 3))
  assert _count(model.params_template) == expected  # torchvision resnet18 / resnet50 (shapes only, no init)


def test_bad_depth_and_names_are_clear_errors():
  with pytest.raises(ValueError, match='6n\\+2'):
    build_model(_cfg(depth=30), 10, (8, 8, 1))
  with pytest.raises(ValueError, match='valid names'):
    build_model(_cfg(head='nope'), 10, (8, 8, 1))


def test_head_update_mask():
  model = build_model(_cfg(depth=8, width=4), 6, (8, 8, 1))
  params, _ = model.init_variables()
  mask = head_update_mask(model, params, jnp.array([0, 0, 1, 1, 0, 0.]))
  assert mask['head']['kernel'].shape == (1, 6) and mask['head']['kernel'].tolist() == [[0, 0, 1, 1, 0, 0]]
  assert float(mask['backbone']['stem_conv']['kernel']) == 1.0
  head_only = head_update_mask(model, params, jnp.ones(6), backbone=False)
  assert float(head_only['backbone']['stem_conv']['kernel']) == 0.0


def _conv3x3_same(x, kernel):
  """NumPy reference of a stride-1 3x3 convolution, zero padding 1, NHWC input and HWIO kernel."""
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(np.einsum('bhwi,io->bhwo', xp[:, i:i + h, j:j + w], kernel[i, j]) for i in range(3) for j in range(3))


def test_rebuffi_resnet_returns_the_four_official_pod_maps():
  w = 4
  model = build_model(_cfg(backbone='rebuffi', width=w, last_relu=False, shortcut='pad'), 10, (32, 32, 3))
  params, stats = model.init_variables()
  bb = params['backbone']
  # 5 + 5 + 4 + 1 blocks: the same blocks as the 3-stage ResNet-32 with option-A shortcuts, regrouped.
  assert sorted({k.split('_')[0] for k in bb if k.startswith('stage')}) == ['stage0', 'stage1', 'stage2', 'stage3']
  assert [sum(k.startswith(f'stage{s}_') for k in bb) for s in range(4)] == [5, 5, 4, 1]
  plain = build_model(_cfg(width=w, last_relu=False, shortcut='pad'), 10, (32, 32, 3))
  assert _count(params) == _count(plain.init_variables()[0])
  assert all(np.all(np.asarray(bb[k]['bn2']['scale']) == 0) for k in bb if k.startswith('stage'))  # zero_residual
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  out, _ = _jit_apply(model, False)(params, stats, x)
  maps = [np.asarray(m) for m in out['stages']]
  assert [m.shape for m in maps] == [(2, 32, 32, w), (2, 16, 16, 2 * w), (2, 8, 8, 4 * w), (2, 8, 8, 4 * w)]
  # At initialisation every block is its shortcut (second BN scale 0): the maps are the stem's output, then
  # subsampled with zero channels appended (the official 'stride' downsampling), and stage 4 keeps stage 3's.
  stem = np.maximum(_conv3x3_same(x, np.asarray(bb['stem_conv']['kernel'])) / np.sqrt(1 + 1e-5), 0)
  pad = lambda m: np.concatenate([m[:, ::2, ::2], np.zeros_like(m[:, ::2, ::2])], axis=-1)
  for got, want in zip(maps, [stem, pad(stem), pad(pad(stem)), pad(pad(stem))]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out['embedding'], maps[3].mean(axis=(1, 2)), rtol=1e-6)
  # Trained residual branches: no ReLU after any addition, so every map and the embedding can be negative; the
  # official last_relu option puts a ReLU between the blocks of stages 1-3 (after the map is recorded).
  embeddings = []
  for last_relu in (False, True):
    m = build_model(_cfg(backbone='rebuffi', width=w, last_relu=last_relu, shortcut='pad'), 10, (32, 32, 3))
    p, s = m.init_variables()
    p = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.ones_like(v) if 'bn2' in jax.tree_util.keystr(path) and 'scale' in jax.tree_util.keystr(path) else v, p)
    o, _ = _jit_apply(m, False)(p, s, x)
    assert all(float(np.min(a)) < 0 for a in o['stages']) and float(np.min(o['embedding'])) < 0
    embeddings.append(np.asarray(o['embedding']))
  assert not np.allclose(*embeddings)
