"""The example notebook `examples/quickstart.ipynb` runs in a fresh kernel and shows what the code computes: its
report table holds the accuracies of the run's results.json, its plot is the report's report.png."""
import base64
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'examples', 'quickstart.ipynb')


def _outputs(nb, tag: str) -> list:
  cells = [c for c in nb.cells if c.cell_type == 'code' and tag in c.metadata.get('tags', [])]
  assert len(cells) == 1, tag
  return cells[0].outputs


def _markdown(outputs) -> str:
  return ''.join(o['data']['text/markdown'] for o in outputs if 'text/markdown' in o.get('data', {}))


def _png(outputs) -> bytes:
  images = [o['data']['image/png'] for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) == 1
  return base64.b64decode(images[0])


def _avg_cells(results: dict) -> list:
  """The report's cells of a single run's average incremental accuracy (CNN, NME)."""
  return [f"| {results['avg_incremental_accuracy'][k]:.2f} |" for k in ('cnn', 'nme')]


def test_the_notebook_is_stored_without_outputs():
  nbformat = pytest.importorskip('nbformat')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert all(not c.get('outputs') and c.get('execution_count') is None for c in nb.cells if c.cell_type == 'code')


@pytest.mark.slow
def test_quickstart_notebook_runs_and_shows_the_results(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  kernelspec = pytest.importorskip('ipykernel.kernelspec')
  # A kernel of this Python (the installed `python3` spec may name another `python` on PATH), with this checkout on
  # its path; it inherits the session's environment (compilation cache).
  kernelspec.write_kernel_spec(str(tmp_path / 'jupyter' / 'kernels' / 'this_python'))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('PYTHONPATH', ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=900, kernel_name='this_python',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()

  workdir = tmp_path / 'runs' / 'quickstart'
  results = json.loads((workdir / 'lucir' / 'results.json').read_text())
  assert results['complete'] and len(results['steps']) == 5
  assert results['config']['optim']['epochs'] == 4 and results['config']['method']['name'] == 'lucir'
  # the training cell shows the run's numbers
  shown = _outputs(nb, 'train')[-1]['data']['text/plain']
  assert shown == repr(results['avg_incremental_accuracy'])
  # the report cell: the table of report.md, with the run's accuracies, and the plot of report.png
  outputs = _outputs(nb, 'report')
  table = _markdown(outputs)
  assert table == (workdir / 'report' / 'report.md').read_text()
  assert all(cell in table for cell in _avg_cells(results))
  assert _png(outputs) == (workdir / 'report' / 'report.png').read_bytes()
  summary = json.loads((workdir / 'lambda_sweep' / 'summary.json').read_text())
  assert sorted(s['name'] for s in summary['settings']) == ['lambda_base=1', 'lambda_base=5']
  outputs = _outputs(nb, 'sweep')
  table = _markdown(outputs)
  assert len(table.strip().splitlines()) == 2 + 3      # header, rule, the single run and the two settings
  for name, lam in (('lambda_base=1', 1.0), ('lambda_base=5', 5.0)):
    swept = json.loads((workdir / 'lambda_sweep' / name / 'results.json').read_text())
    assert swept['config']['method']['lambda_base'] == lam
    assert all(cell in table for cell in _avg_cells(swept))
  assert _png(outputs) == (workdir / 'sweep_report' / 'report.png').read_bytes()
