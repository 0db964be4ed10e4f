"""A process that used the package exits without a traceback: a TensorBoard logger that never wrote (a run that
failed before its first epoch ended) holds no tensorboardX writer, whose clean-up at exit would start a thread
(refused by Python 3.12 at interpreter shutdown)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_unused_logger_opens_no_writer_and_leaves_no_traceback(tmp_path):
  code = ('import sys; from incremental_jax import tensorboard; '
          'logger = tensorboard.TensorBoardLogger(sys.argv[1]); print(logger.logdir)')
  out = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'tb')], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, 'PYTHONPATH': ROOT})
  assert out.returncode == 0 and out.stderr == ''
  assert not os.path.exists(tmp_path / 'tb')   # no writer was opened


def test_a_logger_that_wrote_is_closed_with_its_events(tmp_path):
  from incremental_jax import tensorboard
  logger = tensorboard.TensorBoardLogger(str(tmp_path / 'tb'))
  logger.log_epoch(0, 'train', 0, 5, {'loss': 1.5})
  logger.close()
  assert [f for f in os.listdir(tmp_path / 'tb') if f.startswith('events.out.tfevents')]
  assert logger._opened.file_writer is None    # tensorboardX's state of a closed SummaryWriter
