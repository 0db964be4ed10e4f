import json

import numpy as np
import pytest

from incremental_jax import metrics
from incremental_jax.data import scenario as S
from incremental_jax.evaluate import accuracy_report


def _steps(matrix, alls):
  return [{'step': i, 'num_classes': 2 * (i + 1), 'cnn': {'all': a, 'old': None, 'new': None, 'per_task': row[:i + 1]},
           'nme': None} for i, (row, a) in enumerate(zip(matrix, alls))]


def test_average_incremental_accuracy_and_forgetting_hand_computed():
  # after step 0: task0 90; step 1: task0 70, task1 80; step 2: task0 60, task1 50, task2 95
  matrix = [[90, None, None], [70, 80, None], [60, 50, 95]]
  alls = [90.0, 75.0, 68.0]
  summary = metrics.summarize(_steps(matrix, alls))
  assert summary['avg_incremental_accuracy']['cnn'] == pytest.approx((90 + 75 + 68) / 3)
  assert summary['last_accuracy']['cnn'] == 68.0
  # forgetting: task0 max(90, 70) - 60 = 30; task1 max(80) - 50 = 30 -> 30
  assert summary['average_forgetting']['cnn'] == pytest.approx(30.0)
  assert summary['accuracy_matrix']['cnn'] == matrix
  assert summary['avg_incremental_accuracy']['nme'] is None and summary['accuracy_matrix']['nme'] is None


def test_forgetting_uses_the_best_earlier_accuracy_not_the_first():
  matrix = [[50, None, None], [80, 70, None], [40, 75, 90]]
  # task0: max(50, 80) - 40 = 40; task1: max(70) - 75 = -5 (backward transfer) -> 17.5
  assert metrics.average_forgetting(matrix) == pytest.approx(17.5)
  assert metrics.average_forgetting([[100]]) is None


def test_accuracy_report_old_new_per_task():
  sc = S.Scenario(order=np.arange(6), sizes=(2, 2, 2))
  labels = np.array([0, 1, 2, 3, 4, 5, 0, 4])
  pred = np.array([0, 0, 2, 3, 5, 5, 0, 4])
  rep = accuracy_report(pred, labels, sc, 2)
  assert rep['all'] == pytest.approx(100 * 6 / 8)
  assert rep['old'] == pytest.approx(100 * 4 / 5)  # labels 0,1,2,3,0 -> 0 ok, 1 wrong, 2, 3, 0 ok
  assert rep['new'] == pytest.approx(100 * 2 / 3)  # labels 4,5,4 -> wrong, ok, ok
  assert rep['per_task'] == pytest.approx([100 * 2 / 3, 100.0, 100 * 2 / 3])


def test_result_files(tmp_path):
  matrix = [[90, None], [70, 80]]
  steps = _steps(matrix, [90.0, 75.0])
  results = {'method': 'x', 'dataset': 'd', **metrics.summarize(steps), 'steps': steps}
  metrics.write_results(str(tmp_path), results)
  assert json.loads((tmp_path / 'results.json').read_text())['average_forgetting']['cnn'] == 20.0
  rows = (tmp_path / 'results.csv').read_text().splitlines()
  assert rows[0].split(',')[:3] == ['step', 'num_classes', 'cnn_all'] and rows[2].split(',')[2] == '75.0'
  for png in ('accuracy_per_step.png', 'accuracy_matrix.png'):
    assert (tmp_path / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
