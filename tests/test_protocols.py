"""Every row of docs/protocols.md's table (method, preset, field, value) matches that preset's config."""
import ast
import importlib
import os

import pytest

DOC = os.path.join(os.path.dirname(__file__), '..', 'docs', 'protocols.md')


def _rows():
  rows = []
  for line in open(DOC):
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) == 5 and cells[0] not in ('method', '---') and '.' in cells[2]:
      rows.append(tuple(cells[:4]))
  return rows


def test_the_table_covers_every_cifar_and_imagenet_preset():
  rows = _rows()
  assert len(rows) > 300
  covered = {(m, p) for m, p, _, _ in rows}
  for method in ('podnet', 'lucir'):
    presets = importlib.import_module(f'configs.{method}').PRESETS
    assert {(method, p) for p in presets if p.startswith(('cifar100', 'imagenet'))} <= covered


@pytest.mark.parametrize('method', ['podnet', 'lucir', 'icarl', 'lwf', 'bake', 'iekd', 'train'])
def test_each_preset_matches_the_protocol_table(method):
  module = importlib.import_module(f'configs.{method}')
  for m, preset, field, value in _rows():
    if m != method:
      continue
    got = module.get_config(preset)
    for part in field.split('.'):
      got = got[part]
    want = ast.literal_eval(value)
    if isinstance(want, float):
      assert got == pytest.approx(want, abs=1e-6), (preset, field)
    else:
      assert got == want, (preset, field, got, want)


def test_nme_views_are_a_mirror_and_a_channel_reversal():
  """`predict(..., flip=view)`: 'hflip' equals the model on width-mirrored images, 'channel_reverse' (LUCIR's
  official NME view) the model on RGB->BGR images; the two differ."""
  import jax
  import numpy as np
  from incremental_jax import evaluate, parallel
  from incremental_jax.config import base_config, test_preset
  from incremental_jax.models import build_model
  cfg = test_preset(base_config())
  model = build_model(cfg.model, 4, (8, 8, 3), seed=0)
  params, stats = model.init_variables()
  predict = evaluate.make_predict_fn(model, parallel.make_mesh(), lambda x: x.astype(np.float32) / 255.0, 4)
  images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3)).astype(np.uint8)
  emb = lambda imgs, view=False: predict(params, stats, imgs, flip=view)['embedding']
  np.testing.assert_allclose(emb(images, 'channel_reverse'), emb(images[..., ::-1].copy()), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(emb(images, 'hflip'), emb(images[:, :, ::-1].copy()), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(emb(images, 'hflip'), emb(images, True))
  assert not np.allclose(emb(images, 'channel_reverse'), emb(images, 'hflip'), atol=1e-4)
  assert sorted(evaluate.VIEWS) == ['channel_reverse', 'hflip'] and jax.device_count() >= 1
