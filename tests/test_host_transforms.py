"""The official ImageNet inputs: RandomResizedCrop's box sampling and resize (against PIL and hand-worked boxes),
torchvision's multiplicative brightness (against NumPy and PIL), the Grain train loader (deterministic, independent
of the worker count) and ImageNet-100's class lists."""
import hashlib
import multiprocessing
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from incremental_jax.config import base_config
from incremental_jax.data import augment, host_transforms, image_folder, pipeline
from incremental_jax.data.sources import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- RandomResizedCrop ---------------------------------------------------------------------------------
def _boxes(width, height, n=4000, seed=0, **kw):
  rng = np.random.default_rng(seed)
  return np.array([host_transforms.random_resized_crop_box(rng, width, height, **kw) for _ in range(n)])


def test_fixed_size_boxes_are_placed_uniformly():
  # scale 1/4 and ratio 1 of a 400 x 400 image: always a 200 x 200 box, its corner uniform over 0..200.
  boxes = _boxes(400, 400, scale=(0.25, 0.25), ratio=(1.0, 1.0))
  assert (boxes[:, 2] == 200).all() and (boxes[:, 3] == 200).all()
  for corner in (boxes[:, 0], boxes[:, 1]):
    assert corner.min() == 0 and corner.max() == 200
    assert abs(corner.mean() - 100) < 3            # uniform over 201 values: sd of the mean ~0.9
    counts = np.bincount(corner // 40, minlength=6)[:5]
    assert counts.min() > 0.8 * counts.mean()


def test_box_sides_follow_area_and_aspect_ratio():
  # 100 x 100, area fraction 1/2, aspect 2: w = round(sqrt(5000 * 2)) = 100, h = round(sqrt(5000 / 2)) = 50.
  boxes = _boxes(100, 100, n=50, scale=(0.5, 0.5), ratio=(2.0, 2.0))
  assert (boxes[:, 2] == 50).all() and (boxes[:, 3] == 100).all() and (boxes[:, 1] == 0).all()


def test_the_central_fallback_when_no_draw_fits():
  # A 100-wide, 400-high image with scale 1: every draw is wider than the image; the fallback box keeps the
  # width and clamps the aspect ratio to 3/4: h = round(100 / 0.75) = 133, centred: top = (400 - 133) // 2.
  boxes = _boxes(100, 400, n=20, scale=(1.0, 1.0))
  assert (boxes == [133, 0, 133, 100]).all()
  boxes = _boxes(400, 100, n=20, scale=(1.0, 1.0))   # the wide case: w = round(100 * 4/3) = 133
  assert (boxes == [0, 133, 100, 133]).all()
  boxes = _boxes(120, 100, n=20, scale=(1.0, 1.0), ratio=(1.0, 1.0))   # ratio 1.2 outside [1, 1]: clamped
  assert (boxes == [0, 10, 100, 100]).all()


def test_default_box_statistics():
  # torchvision's defaults on a square image: boxes inside the image, aspect ratio log-uniform on
  # [log 3/4, log 4/3] when the area is small enough for any ratio to fit, area fraction uniform on [0.08, 1]
  # among the draws that fit (most do; those that do not are redrawn).
  boxes = _boxes(1000, 1000, n=6000)
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= 1000).all() and (left + w <= 1000).all()
  area = h * w / 1e6
  assert area.min() >= 0.079 and area.max() <= 1.0
  small = area < 0.5
  log_ratio = np.log(w[small] / h[small])
  lo, hi = np.log(3 / 4), np.log(4 / 3)
  assert log_ratio.min() >= lo - 0.02 and log_ratio.max() <= hi + 0.02
  assert abs(log_ratio.mean()) < 0.01
  assert abs(np.var(log_ratio) - (hi - lo) ** 2 / 12) < 0.003     # the variance of a uniform, not a normal
  below = np.mean(area < 0.5)
  assert 0.45 < below < 0.6   # uniform on [0.08, 1]: 0.457 before rejecting large boxes that do not fit


def test_resized_crop_equals_pil_crop_then_resize():
  rng = np.random.default_rng(3)
  img = Image.fromarray(rng.integers(0, 256, (57, 83, 3), dtype=np.uint8))
  box = (5, 11, 40, 31)   # top, left, h, w
  want = np.asarray(img.crop((11, 5, 11 + 31, 5 + 40)).resize((24, 24), Image.BILINEAR))
  np.testing.assert_array_equal(host_transforms.resized_crop(img, box, 24), want)


def test_decode_draws_its_box_from_the_given_generator(tmp_path):
  rng = np.random.default_rng(4)
  path = str(tmp_path / 'a.png')
  Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
  got = host_transforms.decode_random_resized_crop(path, 16, np.random.default_rng(9))
  top, left, h, w = host_transforms.random_resized_crop_box(np.random.default_rng(9), 70, 50)
  want = np.asarray(Image.open(path).convert('RGB').crop((left, top, left + w, top + h)).resize((16, 16),
                                                                                               Image.BILINEAR))
  np.testing.assert_array_equal(got, want)


# ---- brightness ----------------------------------------------------------------------------------------
def test_multiplicative_brightness_matches_numpy_and_pil():
  images = jax.random.randint(jax.random.key(0), (16, 6, 5, 3), 0, 256).astype(jnp.uint8)
  key, b = jax.random.key(1), 63 / 255
  got = np.asarray(augment.multiply_brightness(key, images, b))
  factor = np.asarray(jax.random.uniform(key, (16, 1, 1, 1), minval=1 - b, maxval=1 + b))
  want = np.floor(np.clip(np.asarray(images, np.float32) * factor, 0, 255))
  np.testing.assert_array_equal(got, want)
  assert (factor > 1).any() and (want == 255).any()   # the clip is exercised
  for i in range(16):   # PIL's ImageEnhance.Brightness, what ColorJitter runs on the official 8-bit images
    pil = ImageEnhance.Brightness(Image.fromarray(np.asarray(images[i]))).enhance(float(factor[i, 0, 0, 0]))
    np.testing.assert_array_equal(got[i], np.asarray(pil))


def test_brightness_factor_range_and_lower_clamp():
  images = jnp.full((4000, 1, 1, 1), 100, jnp.uint8)
  f = np.asarray(augment.multiply_brightness(jax.random.key(2), images, 0.5)).ravel() / 100
  assert f.min() >= 0.5 - 0.01 and f.max() <= 1.5 and abs(f.mean() - 1.0) < 0.02
  f = np.asarray(augment.multiply_brightness(jax.random.key(3), images, 1.5)).ravel() / 100
  assert f.min() >= 0.0 and abs(f.mean() - 1.25) < 0.03   # factors from [max(0, 1 - 1.5), 2.5]


def test_augment_fn_modes():
  images = jax.random.randint(jax.random.key(0), (8, 6, 6, 3), 0, 256).astype(jnp.uint8)
  cfg = base_config().data.augment
  cfg.crop_padding, cfg.flip, cfg.brightness = 0, False, 0.3
  key = jax.random.key(5)
  k_bright = jax.random.split(key, 3)[2]
  mult = augment.make_augment_fn(cfg, (0.0,) * 3, (1.0,) * 3)(key, images)
  np.testing.assert_allclose(mult * 255, augment.multiply_brightness(k_bright, images, 0.3), atol=1e-3)
  cfg.brightness_mode = 'add'
  add = augment.make_augment_fn(cfg, (0.0,) * 3, (1.0,) * 3)(key, images)
  delta = jax.random.uniform(k_bright, (8, 1, 1, 1), minval=-0.3, maxval=0.3)
  np.testing.assert_allclose(add, np.clip(np.asarray(images, np.float32) / 255 + delta, 0, 1), atol=1e-6)
  cfg.random_resized_crop, cfg.crop_padding, cfg.brightness = True, 4, 0.0   # the host cropped: no crop here
  np.testing.assert_allclose(augment.make_augment_fn(cfg, (0.0,) * 3, (1.0,) * 3)(key, images) * 255,
                             np.asarray(images, np.float32), atol=1e-4)


# ---- the Grain train loader ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('folder')
  rng = np.random.default_rng(0)
  for split, n in (('train', 5), ('val', 2)):
    for c in ('n02', 'n01', 'n03'):
      os.makedirs(root / split / c)
      for i in range(n):
        h, w = rng.integers(30, 70, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / c / f'{i}.JPEG')
  return str(root)


def _data_cfg(root, **augment_fields):
  c = base_config().data
  c.name, c.data_dir, c.image_size, c.resize, c.workers = 'image_folder', root, 16, 20, 0
  for k, v in augment_fields.items():
    c.augment[k] = v
  return c


def _reference_batches(images, rows):
  """Each batch element decoded by hand: the crop of column b of a row keyed by the row's digest."""
  out = []
  for row in rows:
    k0, k1 = host_transforms.row_keys(row[None])[0]
    out.append(np.stack([host_transforms.decode_random_resized_crop(
        images.paths[i], 16, host_transforms.item_rng(k0, k1, b)) for b, i in enumerate(row)]))
  return np.stack(out)


def test_loader_batches_are_the_keyed_crops(folder):
  ds = image_folder.load_image_folder(_data_cfg(folder, random_resized_crop=True))
  rows = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [0, 0, 7, 14]])
  got = np.stack(list(ds.train_images.train_batches(rows)))
  np.testing.assert_array_equal(got, _reference_batches(ds.train_images, rows))
  assert not (got[0, 0] == got[1, 3]).all()      # image 0 in another batch: another crop
  assert not (got[2, 0] == got[2, 1]).all()      # twice in one batch: two crops
  centre = image_folder.load_image_folder(_data_cfg(folder))   # without random_resized_crop: the test view
  np.testing.assert_array_equal(np.stack(list(centre.train_images.train_batches(rows))),
                                centre.train_images[rows])


@pytest.mark.slow
def test_loader_batches_do_not_depend_on_the_worker_count(folder):
  ds = image_folder.load_image_folder(_data_cfg(folder, random_resized_crop=True))
  rows = np.random.default_rng(1).integers(0, 15, (44, 4))   # more rows than a 2-worker stream's ring (40): it wraps
  batches = []
  for workers in (0, 1, 2):
    ds.train_images.workers = workers
    batches.append(np.stack(list(ds.train_images.train_batches(rows))))
  np.testing.assert_array_equal(batches[1], batches[0])
  np.testing.assert_array_equal(batches[2], batches[0])


def test_loader_workers_persist_across_calls_and_an_unfinished_call_leaves_no_stale_batch(folder):
  ds = image_folder.load_image_folder(_data_cfg(folder, random_resized_crop=True))
  images = ds.train_images
  images.workers = 1
  rows = np.random.default_rng(3).integers(0, 15, (3, 5, 4))   # three "epochs" of 5 rows
  try:
    np.testing.assert_array_equal(np.stack(list(images.train_batches(rows[0]))), _reference_batches(images, rows[0]))
    workers = {p.pid for p in multiprocessing.active_children()}
    np.testing.assert_array_equal(np.stack(list(images.train_batches(rows[1]))), _reference_batches(images, rows[1]))
    assert workers and {p.pid for p in multiprocessing.active_children()} == workers   # the same processes
    unfinished = images.train_batches(rows[0])
    next(unfinished)
    unfinished.close()   # 4 rows published, their batches maybe made: none may reach the next call
    np.testing.assert_array_equal(np.stack(list(images.train_batches(rows[2]))), _reference_batches(images, rows[2]))
  finally:
    images.close()
  assert not {p.pid for p in multiprocessing.active_children()} & workers


@pytest.mark.slow
def test_loader_workers_stop_cleanly_at_exit(folder):
  script = (f'import numpy as np\nfrom tests.test_host_transforms import _data_cfg\n'
            f'from incremental_jax.data import image_folder\n'
            f'if __name__ == "__main__":\n'
            f'  ds = image_folder.load_image_folder(_data_cfg({folder!r}, random_resized_crop=True))\n'
            f'  ds.train_images.workers = 2\n'
            f'  rows = np.arange(24).reshape(6, 4) % 15\n'
            f'  unfinished = ds.train_images.train_batches(rows)\n'
            f'  next(unfinished)\n'
            f'  unfinished.close()\n'
            f'  print(len(list(ds.train_images.train_batches(rows))))\n')
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.split() == ['6'], out.stderr[-2000:]
  assert 'leaked' not in out.stderr and 'Warning' not in out.stderr, out.stderr[-2000:]


def test_host_chunks_feed_the_loader_batches(folder):
  ds = image_folder.load_image_folder(_data_cfg(folder, random_resized_crop=True))
  mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rows = np.random.default_rng(2).integers(0, 15, (4, 1, 3))   # 4 steps, 1 run, batch 3
  labels = [ds.train_labels]
  chunks = list(pipeline.host_chunks(ds.train_images, labels, [rows[:2], rows[2:]], mesh))
  image = np.concatenate([np.asarray(c['image']) for c in chunks])
  np.testing.assert_array_equal(image[:, 0], _reference_batches(ds.train_images, rows[:, 0]))
  np.testing.assert_array_equal(np.concatenate([np.asarray(c['label']) for c in chunks])[:, 0],
                                ds.train_labels[rows[:, 0]])


# ---- ImageNet-100 class lists ------------------------------------------------------------------------
def test_packaged_imagenet100_lists():
  podnet = image_folder.class_list('imagenet100_podnet')
  lucir = image_folder.class_list('imagenet100_lucir')
  for names in (podnet, lucir):
    assert len(names) == 100 == len(set(names)) and all(n.startswith('n') and len(n) == 9 for n in names)
  assert podnet[0] == 'n01440764' and podnet[-1] == 'n01855672'   # PODNet's labels 0 and 99 (val_100.txt)
  # LUCIR's gen_imagenet_subset.py: np.random.seed(1993); np.random.choice(sorted 1000 synsets, 100, replace=False)
  # (checked by hand against the 1000 synsets of PODNet's val_1000.txt); kept sorted, as ImageFolder reads them
  assert lucir[:3] == ['n01514668', 'n01531178', 'n01537544'] and lucir != podnet
  assert hashlib.sha256('\n'.join(lucir).encode()).hexdigest()[:16] == 'fce943fa2f5b5888'


def test_data_classes_selects_class_folders(folder, tmp_path):
  listed = tmp_path / 'classes.txt'
  listed.write_text('# two of three\nn03\nn01\n')
  cfg = _data_cfg(folder)
  cfg.classes = str(listed)
  ds = image_folder.load_image_folder(cfg)
  assert ds.class_names == ['n01', 'n03'] and len(ds.train_labels) == 10 and len(ds.test_labels) == 4
  listed.write_text('n01\nn09\n')
  with pytest.raises(DataError, match="n09"):
    image_folder.load_image_folder(cfg)
  cfg.classes = 'no_such_list'
  with pytest.raises(DataError, match='imagenet100_lucir'):
    image_folder.load_image_folder(cfg)
