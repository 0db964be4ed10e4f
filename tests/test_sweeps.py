"""Sweeps (`config.sweep`, incremental_jax.sweeps): the spec, the runs it names, one workdir of subfolders with one
summary.json, resuming, and the paper tables `report` prints beside ours."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import incremental_jax
from incremental_jax import report, sweeps
from incremental_jax.configs import lucir, podnet
from incremental_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(spec='', **fields):
  c = lucir.get_config('test')
  c.sweep = spec
  for k, v in fields.items():
    c[k] = v
  return c


# ---- the spec ----------------------------------------------------------------------------------------------
def test_product_and_zip_give_the_runs_in_order_with_the_fields_types():
  c = _config()
  runs = sweeps.parse('optim.lr=0.05,0.1 * method.lambda_base=2,5 * seed=0,1', c)
  assert len(runs) == 8
  assert runs[0] == {'optim.lr': 0.05, 'method.lambda_base': 2.0, 'seed': 0}
  assert runs[1] == {'optim.lr': 0.05, 'method.lambda_base': 2.0, 'seed': 1}     # the last term varies fastest
  assert runs[7] == {'optim.lr': 0.1, 'method.lambda_base': 5.0, 'seed': 1}
  assert [type(v) for v in runs[0].values()] == [float, float, int]
  zipped = sweeps.parse('data.increment=2,3 + optim.epochs=4,5 * seed=0,1', c)
  assert zipped == [{'data.increment': 2, 'optim.epochs': 4, 'seed': 0}, {'data.increment': 2, 'optim.epochs': 4, 'seed': 1},
                    {'data.increment': 3, 'optim.epochs': 5, 'seed': 0}, {'data.increment': 3, 'optim.epochs': 5, 'seed': 1}]
  odd = sweeps.parse("optim.milestones=(80,120),(40,) * optim.weight_decay=1e-4,5e+4 * data.named_order='a:0',b:1 "
                     '* memory.nme_flip=true,False', c)
  assert [r['optim.milestones'] for r in odd[::8]] == [(80, 120), (40,)]
  assert sorted({r['optim.weight_decay'] for r in odd}) == [1e-4, 5e4]
  assert sorted({r['data.named_order'] for r in odd}) == ['a:0', 'b:1']
  assert {r['memory.nme_flip'] for r in odd} == {True, False}
  assert sweeps.parse('', c) == []


def test_helpers_write_the_spec_that_parses_back():
  spec = sweeps.product(sweeps.zipped(sweeps.axis('optim.lr', [0.05, 0.1]), sweeps.axis('optim.milestones', [(1, 2), ()])),
                        sweeps.axis('seed', range(2)))
  assert spec == 'optim.lr=0.05,0.1 + optim.milestones=(1,2),() * seed=0,1'
  assert sweeps.parse(spec, _config())[2] == {'optim.lr': 0.1, 'optim.milestones': (), 'seed': 0}


@pytest.mark.parametrize('spec,match', [
    ('optim.lrr=0.1,0.2', r"has no field 'lrr'.*optim\.lr"),
    ('optimm.lr=0.1', "the config has no field 'optimm'"),
    ('seed=0,1.5', "seed='1.5' is not a valid int"),
    ('memory.nme_flip=maybe', 'not a valid true/false'),
    ('optim.lr=0.1,x', "optim.lr='x' is not a valid float"),
    ('optim=0.1', 'is a section'),
    ('num_runs=2,3', 'num_runs cannot be swept'),
    ('seed=0,1 + optim.lr=0.1', 'need one length'),
    ('seed=0,1 * seed=2', 'appears twice'),
    ('seed 0,1', 'is not FIELD=VALUE'),
])
def test_a_bad_spec_is_one_config_error(spec, match):
  with pytest.raises(ConfigError, match=match):
    sweeps.sweep_runs(_config(spec))


def test_a_bad_spec_stops_the_command_before_training(tmp_path):
  out = subprocess.run([sys.executable, 'main.py', '--config=configs/lucir.py:test', f'--workdir={tmp_path / "w"}',
                        '--config.sweep=optim.lr=0.1 * method.lambda_bse=2,5'], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and "has no field 'lambda_bse'" in lines[0] and 'lambda_base' in lines[0], out.stderr
  assert not (tmp_path / 'w').exists()


def test_run_names_configs_and_groups():
  c = _config('optim.lr=0.05,0.1 * method.lambda_base=2,5 * seed=0,1')
  runs = sweeps.sweep_runs(c)
  assert runs[1].name == 'lr=0.05,lambda_base=2,seed=1'
  r = runs[6].config
  assert (r.optim.lr, r.method.lambda_base, r.seed, r.sweep) == (0.1, 5.0, 0, '')
  assert c.optim.lr == lucir.get_config('test').optim.lr      # the sweep's config is not changed
  # runs that differ only in seed, order and traced numbers train together; a shape, a static field, or whether a
  # weight is 0 splits them
  assert sweeps.train_groups(runs) == [list(range(8))]
  assert sweeps.train_groups(sweeps.sweep_runs(_config('model.width=4,8 * optim.weight_decay=0.1,0.2'))) == [[0, 1],
                                                                                                           [2, 3]]
  assert sweeps.train_groups(sweeps.sweep_runs(_config('method.mr_weight=0,1,2'))) == [[0], [1, 2]]
  assert sweeps.train_groups(sweeps.sweep_runs(_config('optim.milestones=(1,),(2,),(1,2)'))) == [[0, 1], [2]]
  assert sweeps.train_groups(sweeps.sweep_runs(_config('method.num_hard_negatives=1,2'))) == [[0], [1]]
  # a value that is not a file name, and two fields of one last name
  named = sweeps.sweep_runs(_config('data.named_order=podnet_cifar100:1 * optim.milestones=(1,2)'))
  assert named[0].name == 'named_order=podnet_cifar100_1,milestones=1-2'
  assert sweeps.short_names(['model.depth', 'method.teacher_model.depth', 'seed']) == {
      'model.depth': 'model.depth', 'method.teacher_model.depth': 'method.teacher_model.depth', 'seed': 'seed'}


def test_num_runs_repeats_each_point_of_the_sweep():
  c = _config('method.lambda_base=2,5', num_runs=2)
  runs = sweeps.sweep_runs(c)
  assert [r.name for r in runs] == ['lambda_base=2,run=0', 'lambda_base=2,run=1', 'lambda_base=5,run=0',
                                    'lambda_base=5,run=1']
  assert [(r.config.seed, r.config.data.class_order_seed, r.config.num_runs) for r in runs[:2]] == [(0, 1993, 1),
                                                                                                      (1, 1994, 1)]
  assert sweeps.train_groups(runs) == [[0, 1, 2, 3]]
  assert [sweeps.setting_of(r.overrides) for r in runs[1:3]] == [{'method.lambda_base': 2.0},
                                                                 {'method.lambda_base': 5.0}]


# ---- training a sweep --------------------------------------------------------------------------------------
def test_runs_differing_in_traced_numbers_train_as_one_group_each_as_alone():
  """Two runs of one phase differing in lr, weight decay, momentum, milestones, gamma and a registered method's own
  hyperparameter, trained together (one compilation): each run's parameters and losses equal those of the run
  alone (its own compiled step, its numbers as constants)."""
  import jax
  from ml_collections import ConfigDict
  from incremental_jax import config as cfglib, parallel, train
  from incremental_jax.data import augment
  from incremental_jax.losses import cross_entropy
  from incremental_jax.methods.base import Method, Phase
  from incremental_jax.models import build_model

  class Scaled(Method):   # a user's method: CE times its own traced `scale`
    hyperparameters = ('scale',)

    def loss(self, outputs, batch, task, teacher, params):
      ce = cross_entropy(outputs['logits'], batch['label'], task.seen).mean()
      return self.hp(task, 'scale') * ce, {'ce': ce}

  config = cfglib.test_preset(cfglib.base_config())
  config.method = cfglib.method_section('scaled', scale=1.0)
  mesh, shape = parallel.make_mesh(), (8, 8, 1)
  aug = augment.make_augment_fn(config.data.augment, (0.5,), (0.25,))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (96, 8, 8, 1)).astype(np.uint8)
  labels = rng.integers(0, 4, 96)
  numbers = [dict(lr=0.05, weight_decay=5e-4, momentum=0.9, milestones=(1,), gamma=0.1, scale=1.0),
             dict(lr=0.02, weight_decay=1e-3, momentum=0.5, milestones=(2,), gamma=0.5, scale=3.0)]

  def run_of(n, seed=3):
    c = config.copy_and_resolve_references()
    c.method.scale = n['scale']
    method = Scaled(c, 4, shape)
    optim = ConfigDict(dict(c.optim, epochs=3, batch_size=16, **{k: v for k, v in n.items() if k != 'scale'}))
    task = train.make_task_info(type('S', (), {'class_masks': lambda self, t: {
        'old': np.zeros(4, np.float32), 'new': np.ones(4, np.float32), 'seen': np.ones(4, np.float32)}})(), 0,
        np.ones(4, np.float32)).replace(hparams=method.hyperparameter_values())
    state = train.init_train_state(build_model(c.model, 4, shape, seed=seed), mesh, train.make_optimizer(optim))
    return method, train.PhaseRun(state, None, task, Phase('train', method.loss, np.arange(96), optim), labels,
                                  (seed, 0, 0), seed)

  (m0, r0), (_, r1) = run_of(numbers[0]), run_of(numbers[1])
  trainer = train.Trainer(m0.model, m0, mesh, aug, show_progress=False)
  group = train.run_phase(trainer, [r0, r1], images)
  assert trainer.compile_count == 1
  for k, n in enumerate(numbers):
    method, run = run_of(n)
    (solo,) = train.run_phase(train.Trainer(method.model, method, mesh, aug, show_progress=False), [run], images)
    for a, b in zip(jax.tree.leaves(group[k].state.params), jax.tree.leaves(solo.state.params)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([m['loss'] for m in group[k].epoch_metrics], [m['loss'] for m in solo.epoch_metrics],
                               rtol=1e-5)
    np.testing.assert_allclose([m['lr'] for m in group[k].epoch_metrics], [m['lr'] for m in solo.epoch_metrics])
  # the two runs really differ (every number is another), by much more than the tolerance
  assert abs(group[0].epoch_metrics[-1]['loss'] - group[1].epoch_metrics[-1]['loss']) > 1e-2


def _without_timings(results: dict) -> dict:
  return {**{k: v for k, v in results.items() if k != 'steps'},
          'steps': [{k: v for k, v in s.items() if k != 'train_seconds'} for s in results['steps']]}


# 2 loss weights x 2 learning rates x 2 seeds; learning rates at which this tiny network does not amplify float
# rounding (see tests/test_runs.py::_stable), so a run trained in the group and alone agree to the tolerance of
# `num_runs` groups.
SPEC = 'method.lambda_base=2,5 * optim.lr=0.01,0.005 * seed=0,1'
NAMES = [f'lambda_base={w},lr={lr},seed={s}' for w in (2, 5) for lr in ('0.01', '0.005') for s in (0, 1)]


@pytest.fixture(scope='module')
def swept(tmp_path_factory):
  """The 8-run LUCIR sweep of SPEC on the test preset, trained by one call: (workdir, summary)."""
  workdir = tmp_path_factory.mktemp('sweep') / 'sweep'
  return workdir, incremental_jax.train_and_evaluate(_config(SPEC), str(workdir))


@pytest.mark.slow
def test_an_8_run_sweep_is_one_group_with_one_compilation_per_phase_and_each_run_as_alone(swept, tmp_path):
  """The 8 runs (loss weight x lr x seed) train as one vmapped group with LUCIR's 2 compiled steps (the first
  task's, without a teacher, and the later one); each subfolder is what its config alone writes (the run with the
  last lr and weight and seed 1 against that config alone, to the tolerance of `num_runs` groups: class orders and
  memory sizes exactly, accuracies to one point, per-epoch losses to 1e-4); summary.json's mean and std per
  setting are numpy's over the subfolders' results.json; the same command again trains nothing."""
  workdir, summary = swept
  assert sorted(os.listdir(workdir)) == sorted(NAMES + ['summary.json'])
  assert [g['runs'] for g in summary['train_groups']] == [NAMES]
  assert summary['train_groups'][0]['compilations'] == 2
  results = {n: json.loads((workdir / n / 'results.json').read_text()) for n in NAMES}
  assert json.loads((workdir / 'summary.json').read_text()) == json.loads(json.dumps(summary))
  assert [s['name'] for s in summary['settings']] == ['lambda_base=2,lr=0.01', 'lambda_base=2,lr=0.005',
                                                      'lambda_base=5,lr=0.01', 'lambda_base=5,lr=0.005']
  for k, setting in enumerate(summary['settings']):
    members = NAMES[2 * k:2 * k + 2]
    assert setting['runs'] == members and setting['compilations'] == 2
    for key in ('avg_incremental_accuracy', 'last_accuracy'):
      vals = [results[n][key]['cnn'] for n in members]
      assert setting[key]['cnn'] == {'mean': pytest.approx(np.mean(vals)), 'std': pytest.approx(np.std(vals)), 'n': 2}
  swept_run = results['lambda_base=5,lr=0.005,seed=1']
  assert (swept_run['config']['method']['lambda_base'], swept_run['config']['optim']['lr'],
          swept_run['config']['seed'], swept_run['config']['sweep']) == (5.0, 0.005, 1, '')
  solo_cfg = _config()
  solo_cfg.optim.lr, solo_cfg.seed, solo_cfg.method.lambda_base = 0.005, 1, 5.0
  solo = incremental_jax.train_and_evaluate(solo_cfg, str(tmp_path / 'solo'))
  assert swept_run['class_order'] == solo['class_order']
  for a, b in zip(swept_run['steps'], solo['steps']):
    assert a['memory_size'] == b['memory_size']
    for kind in ('cnn', 'nme'):
      for part in ('all', 'old', 'new'):
        if b[kind].get(part) is not None:
          assert abs(a[kind][part] - b[kind][part]) <= 1.0, (kind, part, a[kind][part], b[kind][part])
    np.testing.assert_allclose(a['epoch_losses']['train'], b['epoch_losses']['train'], rtol=1e-4)
  # runs that differ in one number differ by much more than the tolerance
  for other in ('lambda_base=2,lr=0.005,seed=1', 'lambda_base=5,lr=0.01,seed=1'):
    losses = results[other]['steps'][1]['epoch_losses']['train']
    assert abs(losses[-1] - swept_run['steps'][1]['epoch_losses']['train'][-1]) > 1e-3, other
  again = incremental_jax.train_and_evaluate(_config(SPEC), str(workdir))
  assert again == summary


@pytest.mark.slow
def test_a_sweep_killed_inside_a_task_resumes_to_the_same_summary(swept, tmp_path):
  """The same sweep by `main.py` with a checkpoint every epoch, SIGKILLed at the end of the second epoch of the
  first task (each run then has its checkpoint after the first epoch): the same command resumes every run from
  it, and summary.json (compilation counts included) and every run's results equal the uninterrupted sweep's."""
  from incremental_jax import faults
  reference_dir, reference = swept
  workdir = tmp_path / 'run'
  cmd = [sys.executable, 'main.py', '--config=configs/lucir.py:test', f'--workdir={workdir}', f'--config.sweep={SPEC}',
         '--config.checkpoint.every_epochs=1']
  env = {**os.environ, faults.ENV_VAR: 'epoch_end:2'}
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == -9, out.stderr[-3000:]
  assert not (workdir / 'summary.json').exists()
  assert all((workdir / n / 'checkpoints').exists() for n in NAMES)
  env.pop(faults.ENV_VAR)
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads((workdir / 'summary.json').read_text()) == json.loads(json.dumps(reference))
  for name in NAMES:
    resumed = json.loads((workdir / name / 'results.json').read_text())
    ref = json.loads((reference_dir / name / 'results.json').read_text())
    assert _without_timings(resumed)['steps'] == _without_timings(ref)['steps']


@pytest.mark.slow
def test_the_digits_table_runs_end_to_end_and_reports_its_reference_numbers(tmp_path, capsys):
  """`configs/lucir.py:digits_table` (2 settings x 2 orders) shrunk to 1 epoch and a width-4 network: 4 runs in 2
  groups; the report prints both settings with this project's recorded numbers and ours - theirs."""
  c = lucir.get_config('digits_table')
  c.optim.epochs, c.model.width, c.progress, c.plots = 1, 4, False, False
  summary = incremental_jax.train_and_evaluate(c, str(tmp_path / 'table'))
  assert len(summary['train_groups']) == 2 and [len(g['runs']) for g in summary['train_groups']] == [2, 2]
  assert report.main([str(tmp_path / 'table'), '--out', str(tmp_path / 'out')]) == 0
  text = capsys.readouterr().out
  table = lucir.TABLES['digits']
  assert table.citation in text
  rows = {line.split('|')[1].strip(): [x.strip() for x in line.split('|')[1:-1]] for line in text.splitlines()
          if line.startswith('| ') and ' of ' in line}
  assert list(rows) == ['4 steps of 2', '2 steps of 4']
  for row, setting in zip(table.rows, summary['settings']):
    cells = rows[row.label]
    for kind, col in (('cnn', 2), ('nme', 5)):
      ours = setting['avg_incremental_accuracy'][kind]
      assert cells[col] == f"{ours['mean']:.2f} ± {ours['std']:.2f}"
      assert cells[col + 1] == f'{row.values[kind]:.2f}'
      assert cells[col + 2] == f"{ours['mean'] - row.values[kind]:+.2f}"


# ---- paper tables -------------------------------------------------------------------------------------------
def _fake_results(name, overrides, accs, seed=1):
  n = len(accs)
  return {'method': 'podnet', 'dataset': 'cifar100', 'num_tasks': n, 'task_sizes': [50] + [50 // (n - 1)] * (n - 1),
          'config': {'seed': seed}, 'class_order': list(range(100)),
          'avg_incremental_accuracy': {'cnn': float(np.mean(accs)), 'nme': float(np.mean(accs)) + 1.0},
          'last_accuracy': {'cnn': accs[-1], 'nme': accs[-1] + 1.0},
          'average_forgetting': {'cnn': 10.0, 'nme': 9.0},
          'steps': [{'num_classes': 50 + k * (50 // (n - 1)), 'cnn': {'all': a}, 'nme': {'all': a + 1.0}}
                    for k, a in enumerate(accs)]}


def test_report_prints_podnet_table1_beside_ours(tmp_path, capsys):
  """A faked PODNet Table 1 sweep workdir (12 results.json written here): the report prints every setting with
  our mean ± std over the 3 orders, the paper's CNN and NME numbers, the differences and the citation."""
  c = podnet.get_config('table1')
  runs = sweeps.sweep_runs(c)
  assert len(runs) == 12 and len(sweeps.train_groups(runs)) == 4
  workdir = tmp_path / 'table1'
  results = []
  for k, r in enumerate(runs):
    inc = r.overrides['data.increment']
    accs = [80.0] + [60.0 + k % 3] * (50 // inc)      # order k%3 ends 1 point higher than order k%3 - 1
    res = _fake_results(r.name, r.overrides, accs)
    os.makedirs(workdir / r.name)
    (workdir / r.name / 'results.json').write_text(json.dumps(res))
    results.append(res)
  summary = sweeps.summarize(c.sweep, runs, results, [{'runs': g, 'compilations': 3} for g in sweeps.train_groups(runs)],
                             c.reference_table)
  (workdir / 'summary.json').write_text(json.dumps(summary))
  assert report.main([str(workdir), '--out', str(tmp_path / 'out')]) == 0
  text = capsys.readouterr().out
  assert 'Douillard et al., PODNet, ECCV 2020, Table 1' in text
  lines = {line.split('|')[1].strip(): line for line in text.splitlines() if line.startswith('| ') and 'steps |' in line}
  assert list(lines) == ['50 steps', '25 steps', '10 steps', '5 steps']
  for label, inc, cnn, nme in (('50 steps', 1, 57.98, 61.40), ('25 steps', 2, 60.72, 62.71),
                               ('10 steps', 5, 63.19, 64.03), ('5 steps', 10, 64.83, 64.48)):
    n = 50 // inc
    ours = [np.mean([80.0] + [60.0 + o] * n) for o in range(3)]
    cells = [x.strip() for x in lines[label].split('|')[1:-1]]
    assert cells[1] == '3'
    assert cells[2] == f'{np.mean(ours):.2f} ± {np.std(ours):.2f}' and cells[3] == f'{cnn:.2f}'
    assert cells[4] == f'{np.mean(ours) - cnn:+.2f}'
    assert cells[5] == f'{np.mean(ours) + 1:.2f} ± {np.std(ours):.2f}' and cells[6] == f'{nme:.2f}'
    assert cells[7] == f'{np.mean(ours) + 1 - nme:+.2f}'
  csv_rows = (tmp_path / 'out' / 'paper.csv').read_text().splitlines()
  assert csv_rows[0].startswith('setting,runs,cnn_mean,cnn_std,cnn_paper,cnn_diff')
  assert (tmp_path / 'out' / 'paper.png').stat().st_size > 0


def test_every_paper_table_row_selects_runs_of_its_preset():
  """Each table's rows name settings that its sweep preset trains (a misspelt field or value would select none)."""
  from incremental_jax.configs import bake, iekd
  presets = {'podnet:table1': (podnet, 'table1'), 'lucir:podnet_table1': (lucir, 'podnet_table1'),
             'lucir:cifar100': (lucir, 'cifar100_table'), 'lucir:digits': (lucir, 'digits_table'),
             'bake:cifar100': (bake, 'cifar100_table'), 'iekd:cifar10': (iekd, 'cifar10_table'),
             'iekd:cifar100': (iekd, 'cifar100_table')}
  for name, (module, preset) in presets.items():
    c = module.get_config(preset)
    assert c.reference_table == name
    table = sweeps.find_table(name)
    summary = {'runs': [{'name': r.name, 'overrides': json.loads(json.dumps(r.overrides))}
                        for r in sweeps.sweep_runs(c)]}
    for row in table.rows:
      assert report._row_runs(summary, row), (name, row.label)
  with pytest.raises(ConfigError, match='has the tables'):
    sweeps.find_table('podnet:table9')
