"""Device memory of the images: `data.on_device='auto'` checks a data set's train and test images together
against one budget, and the runs of a `num_runs` group share one placed copy of each split."""
import incremental_jax
from configs import finetune, icarl
from incremental_jax import parallel
from incremental_jax import run_spec as run_lib
from incremental_jax.data import pipeline, sources


def _split_bytes(cfg) -> tuple[int, int]:
  ds = sources.load_dataset(cfg.data)
  return ds.train_images.nbytes, ds.test_images.nbytes


def test_auto_places_train_and_test_against_one_budget(tmp_path, monkeypatch):
  cfg = finetune.get_config('test')
  train, test = _split_bytes(cfg)
  mesh = parallel.make_mesh()
  assert max(train, test) < train + test - 1   # each split alone would fit the smaller budget
  for budget, placed in ((train + test - 1, False), (train + test, True)):
    monkeypatch.setattr(pipeline, 'device_budget_bytes', lambda budget=budget: budget)
    spec = run_lib.build_run_spec(cfg, str(tmp_path / str(budget)), mesh)
    assert isinstance(spec.train_images, pipeline.DeviceImages) == placed, budget
    assert isinstance(spec.test_images, pipeline.DeviceImages) == placed, budget


def test_a_three_run_group_places_one_train_and_one_test_copy(tmp_path, monkeypatch):
  """Every device array of images the group creates (training, herding, NME and evaluation of each run) is
  counted: one train and one test copy in all."""
  cfg = icarl.get_config('test')
  cfg.num_runs, cfg.progress, cfg.plots = 3, False, False
  placed = {}   # id -> the device array (kept alive, so ids stay distinct)
  device = pipeline.DeviceImages.device

  def counted(self):
    array = device.fget(self)
    placed[id(array)] = array
    return array

  monkeypatch.setattr(pipeline.DeviceImages, 'device', property(counted))
  summary = incremental_jax.train_and_evaluate(cfg, str(tmp_path))
  assert summary['num_runs'] == 3
  assert sorted(a.nbytes for a in placed.values()) == sorted(_split_bytes(cfg))
