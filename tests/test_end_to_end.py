"""End to end on the embedded digits: the baselines order as the literature says they should."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_icarl_beats_finetune_and_joint_beats_both(digits_run):
  finetune = digits_run('finetune')
  icarl = digits_run('icarl')
  joint = digits_run('joint')
  ft = finetune['avg_incremental_accuracy']['cnn']
  ic_cnn, ic_nme = icarl['avg_incremental_accuracy']['cnn'], icarl['avg_incremental_accuracy']['nme']
  jt = joint['avg_incremental_accuracy']['cnn']
  print(f'finetune {ft:.2f}  icarl CNN {ic_cnn:.2f} NME {ic_nme:.2f}  joint {jt:.2f}')
  assert ic_nme >= ft + 15 and ic_cnn >= ft + 15
  assert jt > max(ic_cnn, ic_nme, ft)
  assert finetune['avg_incremental_accuracy']['nme'] is None and joint['accuracy_matrix']['nme'] is None
  # finetune forgets everything it is not trained on: old tasks fall to (near) zero
  assert finetune['average_forgetting']['cnn'] > 80
  assert icarl['average_forgetting']['nme'] < finetune['average_forgetting']['cnn']
  assert len(icarl['steps']) == 5 and icarl['steps'][-1]['memory_size'] == 5 * 10


def test_main_cli_writes_all_result_files(tmp_path):
  """The README's command on a tiny preset: results.json keys, CSV and both plots."""
  workdir = tmp_path / 'cli'
  cmd = [sys.executable, 'main.py', '--config=configs/icarl.py:test', f'--workdir={workdir}',
         '--config.optim.epochs=1', '--config.plots=True']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((workdir / 'results.json').read_text())
  for key in ('avg_incremental_accuracy', 'last_accuracy', 'average_forgetting', 'accuracy_matrix', 'steps', 'config'):
    assert key in results
  assert set(results['avg_incremental_accuracy']) == {'cnn', 'nme'}
  assert results['config']['optim']['epochs'] == 1  # the command-line override reached the run
  matrix = results['accuracy_matrix']['cnn']
  assert len(matrix) == 3 and matrix[0][1] is None and matrix[2][2] is not None
  assert (workdir / 'results.csv').read_text().count('\n') == 4
  for png in ('accuracy_per_step.png', 'accuracy_matrix.png'):
    assert (workdir / png).stat().st_size > 1000


def test_unknown_method_and_preset_are_clear_errors(tmp_path):
  from configs import icarl
  with pytest.raises(ValueError, match=r"preset='cifar1000' is not a preset; valid names: .*Did you mean"):
    icarl.get_config('cifar1000')
  import incremental_jax
  from incremental_jax.validate import ConfigError
  c = icarl.get_config('test')
  c.method.name = 'icarll'
  with pytest.raises(ConfigError, match="valid names: .*'icarl'"):
    incremental_jax.train_and_evaluate(c, str(tmp_path / 'x'))
