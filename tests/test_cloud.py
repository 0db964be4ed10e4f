"""Runs whose workdir is a bucket: `--workdir=gs://test-bucket/...` against a local Cloud Storage emulator
(conftest `gcs_emulator`). Checkpoints (Orbax: TensorStore for the arrays, etils.epath for the rest), results,
plots, TensorBoard events and the report all go into the bucket; a run killed inside a task resumes from the
bucket to the results of an uninterrupted run on local disk."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import incremental_jax
from configs import icarl, iekd, m2kd
from incremental_jax import checkpoint as ckpt_lib
from incremental_jax import faults, method_store, metrics, parallel, paths, report, validate
from incremental_jax.methods import build_method
from incremental_jax.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bucket_files(gcs_emulator, prefix: str) -> list[str]:
  """Object names under gs://test-bucket/<prefix>, read with a client of its own (not the code under test)."""
  import gcsfs
  fs = gcsfs.GCSFileSystem(endpoint_url=gcs_emulator.url, token='anon', skip_instance_cache=True)
  return sorted(p[len(f'test-bucket/{prefix}/'):] for p in fs.find(f'test-bucket/{prefix}'))


def read_bucket(gcs_emulator, name: str) -> bytes:
  import gcsfs
  fs = gcsfs.GCSFileSystem(endpoint_url=gcs_emulator.url, token='anon', skip_instance_cache=True)
  return fs.cat(f'test-bucket/{name}')


def test_result_files_and_report_round_trip_through_the_bucket(gcs_emulator, tmp_path):
  steps = [{'step': 0, 'num_classes': 2, 'memory_size': 4, 'train_seconds': 1.0,
            'cnn': {'all': 90.0, 'old': None, 'new': 90.0, 'per_task': [90.0]}, 'nme': None},
           {'step': 1, 'num_classes': 4, 'memory_size': 4, 'train_seconds': 1.0,
            'cnn': {'all': 70.0, 'old': 60.0, 'new': 80.0, 'per_task': [60.0, 80.0]}, 'nme': None}]
  results = {'method': 'm', 'dataset': 'digits', 'num_tasks': 2, 'class_order': [0, 1, 2, 3], 'task_sizes': [2, 2],
             'config': {}, **metrics.summarize(steps), 'steps': steps}
  metrics.write_results('gs://test-bucket/unit/run', results, plots=True)
  assert bucket_files(gcs_emulator, 'unit/run') == ['accuracy_matrix.png', 'accuracy_per_step.png', 'results.csv',
                                                    'results.json']
  assert json.loads(read_bucket(gcs_emulator, 'unit/run/results.json')) == results
  assert read_bucket(gcs_emulator, 'unit/run/accuracy_matrix.png')[:8] == b'\x89PNG\r\n\x1a\n'
  text = report.write_report(['gs://test-bucket/unit/run'], 'gs://test-bucket/unit/report')
  assert '| m | digits | 2 + 2 | 1 | 2/2 | 80.00 |' in text  # read back from the bucket
  assert bucket_files(gcs_emulator, 'unit/report') == ['report.csv', 'report.md', 'report.png']
  assert read_bucket(gcs_emulator, 'unit/report/report.md').decode() == text
  assert not os.path.exists(os.path.join(os.getcwd(), 'gs:'))  # nothing went to a local 'gs:' folder


def test_a_bucket_with_foreign_files_is_refused(gcs_emulator):
  paths.atomic_write('gs://test-bucket/foreign/checkpoints/notes.txt', 'mine')
  with pytest.raises(CheckpointError, match=r"gs://test-bucket/foreign/checkpoints holds files that are not "
                                            r"checkpoints .*notes\.txt"):
    ckpt_lib.RunCheckpointer('gs://test-bucket/foreign/checkpoints')


ICARL = ('--config=configs/icarl.py:test', '--config.checkpoint.every_epochs=1', '--config.plots=True')


def run_main(workdir: str, env: dict, fault: str = '', args=ICARL) -> subprocess.CompletedProcess:
  env = {**{k: v for k, v in os.environ.items() if k != faults.ENV_VAR}, **env}
  if fault:
    env[faults.ENV_VAR] = fault
  cmd = [sys.executable, 'main.py', *args, f'--workdir={workdir}', '--config.progress=True']
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_bucket_run_killed_inside_a_task_resumes_to_the_local_results(gcs_emulator, tmp_path, comparable):
  """iCaRL `test` preset with a checkpoint every epoch and `--workdir=gs://test-bucket/run`, SIGKILLed while it
  selects the exemplars of task 1 (its first epochs are checkpointed in the bucket), then run again: it resumes
  from the bucket, and its results.json equals the uninterrupted run's on local disk (timings aside)."""
  workdir = 'gs://test-bucket/run'
  out = run_main(workdir, gcs_emulator.env, fault='exemplar_selection:5')  # task 0 has 4 classes
  assert out.returncode == -9, out.stderr[-3000:]
  killed = bucket_files(gcs_emulator, 'run')
  steps_in_bucket = sorted({int(f.split('/')[1]) for f in killed if f.startswith('checkpoints/')
                            and f.split('/')[1].isdigit()})
  assert len(steps_in_bucket) >= 2, killed  # at least task 0's end and a mid-task checkpoint of task 1
  assert 'results.json' in killed and len(json.loads(read_bucket(gcs_emulator, 'run/results.json'))['steps']) == 1

  out = run_main(workdir, gcs_emulator.env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resuming gs://test-bucket/run in step 1' in out.stdout or 'resuming gs://test-bucket/run after step 0' \
      in out.stdout, out.stdout[-2000:]
  final = json.loads(read_bucket(gcs_emulator, 'run/results.json'))
  files = bucket_files(gcs_emulator, 'run')
  assert {'results.json', 'results.csv', 'accuracy_per_step.png', 'accuracy_matrix.png'} <= set(files)
  assert any(f.startswith('tensorboard/events.out.tfevents') for f in files), files
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))

  local = incremental_jax.train_and_evaluate(icarl.get_config('test'), str(tmp_path / 'local'))
  assert final['complete'] and len(final['steps']) == 3
  assert comparable(final) == comparable(local)


@pytest.mark.slow
def test_iekd_bucket_run_killed_after_its_teacher_resumes_without_training_it_again(gcs_emulator, tmp_path,
                                                                                     comparable):
  """IE-KD `test` preset in gs://test-bucket/iekd, SIGKILLed at the end of the student's epoch (after its teacher
  and the teacher's autoencoder were trained and saved in the bucket), then run again: both networks are loaded
  from the bucket (no sub-network is compiled, so none is trained) and the results equal an uninterrupted local
  run's. The bucket's teacher folder is then a `method.teacher_workdir` the config check accepts, and it holds the
  teacher the local run trained."""
  args = ('--config=configs/iekd.py:test',)
  out = run_main('gs://test-bucket/iekd', gcs_emulator.env, fault='epoch_end:3', args=args)
  assert out.returncode == -9, out.stderr[-3000:]  # epochs: the teacher's, its autoencoder's, the student's
  assert {'teacher', 'teacher_autoencoder'} <= {f.split('/')[0] for f in bucket_files(gcs_emulator, 'iekd')}

  out = run_main('gs://test-bucket/iekd', gcs_emulator.env, args=args)
  assert out.returncode == 0, out.stderr[-3000:]
  resumed = json.loads(read_bucket(gcs_emulator, 'iekd/results.json'))
  assert 'subnetwork_compilations' not in resumed, resumed  # neither the teacher nor its autoencoder trained

  cfg = iekd.get_config('test')
  local = incremental_jax.train_and_evaluate(cfg, str(tmp_path / 'local'))
  assert local.pop('subnetwork_compilations') == 2
  assert resumed['complete'] and comparable(resumed) == comparable(local)

  cfg.method.teacher_workdir = 'gs://test-bucket/iekd/teacher'
  validate.validate_config(cfg)
  teacher = build_method(cfg, 10, (8, 8, 1)).networks['teacher']
  mesh = parallel.make_mesh()
  in_bucket, meta = method_store.load_network(cfg.method.teacher_workdir, teacher, mesh)
  trained_here, _ = method_store.load_network(str(tmp_path / 'local' / 'teacher'), teacher, mesh)
  jax.tree.map(np.testing.assert_array_equal, in_bucket, trained_here)
  assert meta['class_order'] == local['class_order']
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))


@pytest.mark.slow
def test_m2kd_bucket_run_killed_inside_a_task_resumes_to_the_local_results(gcs_emulator, tmp_path, comparable):
  """M2KD `test` preset (1 epoch of pruned-snapshot retraining) in gs://test-bucket/m2kd with a checkpoint every
  epoch, SIGKILLed at the end of task 1's second epoch: task 0's m2kd_snapshots.json is in the bucket; resumed,
  the run's results and its m2kd_snapshots.json (the sizes of all three snapshots, carried in the checkpoint)
  equal a local run's."""
  args = ('--config=configs/m2kd.py:test', '--config.method.prune_finetune_epochs=1',
          '--config.checkpoint.every_epochs=1')
  # epochs: task 0's two, its snapshot's retraining, task 1's first (then a checkpoint) and second
  out = run_main('gs://test-bucket/m2kd', gcs_emulator.env, fault='epoch_end:5', args=args)
  assert out.returncode == -9, out.stderr[-3000:]
  assert len(json.loads(read_bucket(gcs_emulator, 'm2kd/m2kd_snapshots.json'))['snapshots']) == 1

  out = run_main('gs://test-bucket/m2kd', gcs_emulator.env, args=args)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resuming gs://test-bucket/m2kd in step 1' in out.stdout or 'resuming gs://test-bucket/m2kd after step 0' \
      in out.stdout, out.stdout[-2000:]
  cfg = m2kd.get_config('test')
  cfg.method.prune_finetune_epochs = 1
  local = incremental_jax.train_and_evaluate(cfg, str(tmp_path / 'local'))
  resumed = json.loads(read_bucket(gcs_emulator, 'm2kd/results.json'))
  assert resumed['complete'] and comparable(resumed) == comparable(local)
  with open(tmp_path / 'local' / 'm2kd_snapshots.json') as f:
    assert json.loads(read_bucket(gcs_emulator, 'm2kd/m2kd_snapshots.json')) == json.load(f)
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))
