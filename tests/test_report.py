"""The comparison report (`python -m incremental_jax.report`) on small workdirs: two `test`-preset runs and a
2-run group (the session's `tiny_workdirs`)."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from incremental_jax import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _results(path):
  with open(os.path.join(path, 'results.json')) as f:
    return json.load(f)


def _csv_rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_protocol_names():
  assert report.protocol([2, 2, 2, 2, 2]) == '2 + 4×2'
  assert report.protocol([50, 5, 5]) == '50 + 2×5'
  assert report.protocol([4, 3, 2]) == '4 + 3 + 2'
  assert report.protocol([4, 6]) == '4 + 6'
  assert report.protocol([10]) == '10'


def test_report_numbers_equal_results_json(tiny_workdirs, tmp_path, capsys):
  dirs = [tiny_workdirs[k] for k in ('finetune', 'lucir', 'lucir_group')]
  assert report.main([*dirs, '--out', str(tmp_path / 'rep')]) == 0
  printed = capsys.readouterr().out
  md = (tmp_path / 'rep' / 'report.md').read_text()
  assert md in printed
  rows = _csv_rows(tmp_path / 'rep' / 'report.csv')
  assert [r['method'] for r in rows] == ['finetune', 'lucir', 'lucir']
  assert [r['run'] for r in rows] == ['finetune', 'lucir (lucir)', 'lucir (lucir_group)']
  assert {r['protocol'] for r in rows} == {'4 + 2×3'} and {r['dataset'] for r in rows} == {'digits'}
  assert [r['runs'] for r in rows] == ['1', '1', '2']
  # single runs: the numbers of results.json, no std
  for row, key in zip(rows[:2], ('finetune', 'lucir')):
    res = _results(tiny_workdirs[key])
    for metric in ('avg_incremental_accuracy', 'last_accuracy', 'average_forgetting'):
      for kind in ('cnn', 'nme'):
        want = res[metric][kind]
        assert row[f'{metric}_{kind}_mean'] == ('' if want is None else str(want))
        assert row[f'{metric}_{kind}_std'] == ''
    assert int(row['compilations']) == res['compilations']
    assert float(row['train_seconds']) == pytest.approx(sum(s['train_seconds'] for s in res['steps']), abs=0.05)
  assert rows[0]['avg_incremental_accuracy_nme_mean'] == ''   # finetune has no NME
  # the group: mean and (ddof=0) std of its two runs, by hand
  runs = [_results(os.path.join(tiny_workdirs['lucir_group'], f'run_{k}')) for k in (0, 1)]
  for metric in ('avg_incremental_accuracy', 'last_accuracy', 'average_forgetting'):
    for kind in ('cnn', 'nme'):
      a, b = (r[metric][kind] for r in runs)
      assert float(rows[2][f'{metric}_{kind}_mean']) == pytest.approx((a + b) / 2, abs=1e-12)
      assert float(rows[2][f'{metric}_{kind}_std']) == pytest.approx(abs(a - b) / 2, abs=1e-12)
  with open(os.path.join(tiny_workdirs['lucir_group'], 'summary.json')) as f:
    assert int(rows[2]['compilations']) == json.load(f)['compilations']
  # the Markdown shows the same numbers, a group as mean ± std
  a, b = (r['avg_incremental_accuracy']['cnn'] for r in runs)
  assert f'| {(a + b) / 2:.2f} ± {abs(a - b) / 2:.2f} |' in md
  lucir = _results(tiny_workdirs['lucir'])
  assert f"| {lucir['last_accuracy']['nme']:.2f} |" in md
  assert len(md.strip().splitlines()) == 2 + 3
  import matplotlib.image
  image = matplotlib.image.imread(tmp_path / 'rep' / 'report.png')
  assert image.shape[1] > image.shape[0] > 200    # two panels side by side (CNN and NME)


def test_group_curve_is_the_mean_of_its_runs(tiny_workdirs):
  entry = report.load_entry(tiny_workdirs['lucir_group'])
  x, y = entry.curve('cnn')
  runs = [_results(os.path.join(tiny_workdirs['lucir_group'], f'run_{k}')) for k in (0, 1)]
  assert x.tolist() == [4, 7, 10]
  np.testing.assert_array_equal(y, [[s['cnn']['all'] for s in r['steps']] for r in runs])
  assert report.load_entry(tiny_workdirs['finetune']).curve('nme') is None


def test_mixed_protocols_are_refused_unless_asked(tiny_workdirs, tmp_path, capsys):
  other = tmp_path / 'b4_s6'
  shutil.copytree(tiny_workdirs['finetune'], other, ignore=shutil.ignore_patterns('checkpoints', 'tensorboard'))
  res = _results(other)
  res['task_sizes'] = [4, 6]
  res['steps'] = res['steps'][:2]
  (other / 'results.json').write_text(json.dumps(res))
  out = tmp_path / 'rep'
  assert report.main([tiny_workdirs['lucir'], str(other), '--out', str(out)]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('error: runs of different protocols')
  assert 'lucir: digits 4 + 2×3' in err and 'b4_s6: digits 4 + 6' in err and '--mix-protocols' in err
  assert not out.exists()
  assert report.main([tiny_workdirs['lucir'], str(other), '--out', str(out), '--mix-protocols']) == 0
  assert [r['protocol'] for r in _csv_rows(out / 'report.csv')] == ['4 + 2×3', '4 + 6']


def test_cli_refuses_a_directory_without_results(tmp_path):
  (tmp_path / 'empty').mkdir()
  out = subprocess.run([sys.executable, '-m', 'incremental_jax.report', str(tmp_path / 'empty'), '--out',
                        str(tmp_path / 'rep')], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      f'error: {tmp_path / "empty"} holds neither results.json (a run) nor summary.json (a num_runs group); pass '
      'the --workdir of a run.']
