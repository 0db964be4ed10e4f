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


@pytest.mark.parametrize('method', ['podnet', 'lucir', 'icarl', 'lwf'])
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
