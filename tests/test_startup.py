"""The start-up summary: what a run found and how it is set up, in results.json's numbering (step 0 = base)."""
import jax
import numpy as np

from incremental_jax import parallel, run, startup


def _lines(text):
  """{field: value} of the summary's '  field  value' lines."""
  out = {}
  for line in text.splitlines()[1:]:
    key, value = line.strip().split('  ', 1)
    out[key] = value.strip()
  return out


def test_summary_of_a_new_lucir_run(tmp_path):
  from configs import lucir
  cfg = lucir.get_config('test')
  spec, _, state = run.open_run(cfg, str(tmp_path / 'w'), parallel.make_mesh())
  text = startup.session_summary([spec], [state], str(tmp_path / 'w'), cfg)
  assert text.startswith('run set-up:\n')
  f = _lines(text)
  ds = spec.data.dataset
  assert f['data set'] == 'digits, read from scikit-learn (bundled, sklearn.datasets.load_digits)'
  assert f['classes'] == f'10; {len(ds.train_labels)} train and {len(ds.test_labels)} test images of shape 8×8×1'
  assert len(ds.train_labels) + len(ds.test_labels) == 1797
  assert f['normalisation'] == f'mean ({ds.mean[0]:.4f}), std ({ds.std[0]:.4f}) per channel on the [0, 1] scale'
  order = np.random.RandomState(1993).permutation(10).tolist()   # the iCaRL protocol's seeded order
  assert f['class order'] == f"[{', '.join(map(str, order))}] (seed 1993)"
  assert f['tasks'] == '3 steps (0..2): 4 + 2×3 classes'
  assert f['method'].startswith('lucir: ') and 'lambda_base=5.0' in f['method'] and 'margin=0.5' in f['method']
  assert f['optimiser'].startswith('2 epochs, batch 32, lr 0.05 (multistep, no milestones)')
  assert f['memory'] == '3 per class, herding'
  params = sum(x.size for x in jax.tree.leaves(state.train.params))
  assert f['network'] == f'cifar_resnet-8 width 4, cosine head, float32; {params:,} parameters'
  assert f['devices'] == f'{jax.device_count()} cpu device(s), 1 process(es)'
  assert f['workdir'] == f"{tmp_path / 'w'} (new run; steps 0..2 to train)"


def _summary(cfg, **kw):
  args = dict(dataset_name='cifar100', location='/data/cifar-100-python', num_classes=100, num_train=50000,
              num_test=10000, image_shape=(32, 32, 3), mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
              class_order=list(range(100))[::-1], task_sizes=(50,) + (5,) * 10, num_params=470000, uses_memory=False,
              num_devices=8, platform='gpu', num_processes=2)
  return _lines(startup.startup_summary(cfg, '/runs/x', **{**args, **kw}))


def test_summary_resume_memory_and_groups():
  from configs import finetune
  cfg = finetune.get_config('cifar100_b50_s10')
  f = _summary(cfg)
  assert f['class order'] == '[99, 98, 97, 96, 95, 94, 93, 92, 91, 90, ...] (seed 1993)'
  assert f['tasks'] == '11 steps (0..10): 50 + 10×5 classes'
  assert f['memory'] == 'none' and f['method'] == 'finetune'
  assert f['normalisation'] == ('mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762) per channel on the '
                                '[0, 1] scale')
  assert f['network'].endswith('; 470,000 parameters') and f['devices'] == '8 gpu device(s), 2 process(es)'
  assert f['optimiser'] == ('160 epochs, batch 128, lr 0.1 (multistep x0.1 at epochs (80, 120)), momentum 0.9, '
                            'weight decay 0.0005')
  assert _summary(cfg, start_task=3)['workdir'] == '/runs/x (resumes after step 2; steps 3..10 to train)'
  mid = {'task': 4, 'phase_name': 'train', 'epoch': 20}
  assert _summary(cfg, start_task=4, mid=mid)['workdir'] == (
      "/runs/x (resumes inside step 4 (phase 'train' after epoch 20); steps 4..10 to train)")
  assert _summary(cfg, start_task=11)['workdir'] == '/runs/x (resumes a finished run (steps 0..10 done))'
  cfg.memory.total = 2000
  assert _summary(cfg, uses_memory=True)['memory'] == '2000 in total, herding'
  g = _summary(cfg, num_runs=3)
  assert g['class order'].endswith('(run 0 of 3; run k: class order seed 1993 + k)')
  assert g['workdir'].endswith('; 3 runs in run_0..run_2')
