"""CIFAR (pickle folder and TFDS) and image-folder sources, on tiny data written by the tests themselves."""
import collections
import os
import pickle

import ml_collections
import numpy as np
import pytest
from PIL import Image

from incremental_jax import config as cfglib
from incremental_jax.data import cifar, image_folder
from incremental_jax.data.sources import DataError, channel_stats, check_dataset


def data_cfg(**fields) -> ml_collections.ConfigDict:
  """The base config's data section with `fields` set (2 decoding threads)."""
  c = cfglib.base_config().data
  c.update(dict(dict(name='cifar100', num_workers=2), **fields))
  return c


# ---------------------------------------------------------------------------------------------------------
# CIFAR python pickles.


def write_pickle(path, obj):
  with open(path, 'wb') as f:
    pickle.dump(obj, f, protocol=2)  # the real files are protocol-2 pickles with bytes keys


def random_batch(rng, n, num_classes, label_key):
  data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
  labels = rng.integers(0, num_classes, n).tolist()
  labels[:num_classes] = list(range(num_classes))  # every class present
  return {b'batch_label': b'batch', label_key: labels, b'data': data,
          b'filenames': [b'img_%d.png' % i for i in range(n)]}


def expected_nhwc(data):
  """NHWC images by value from CIFAR rows (red 32x32 plane, then green, then blue)."""
  n = len(data)
  out = np.empty((n, 32, 32, 3), np.uint8)
  for c in range(3):
    out[..., c] = data[:, c * 1024:(c + 1) * 1024].reshape(n, 32, 32)
  return out


@pytest.fixture
def cifar100_dir(tmp_path):
  rng = np.random.default_rng(0)
  folder = tmp_path / 'cifar-100-python'
  folder.mkdir()
  train, test = random_batch(rng, 7, 3, b'fine_labels'), random_batch(rng, 5, 3, b'fine_labels')
  # a known pixel: (row 1, column 2) of train image 0 is (11, 22, 33)
  for c, value in enumerate((11, 22, 33)):
    train[b'data'][0, c * 1024 + 1 * 32 + 2] = value
  for batch in (train, test):
    batch[b'coarse_labels'] = [0] * len(batch[b'fine_labels'])
  write_pickle(folder / 'train', train)
  write_pickle(folder / 'test', test)
  write_pickle(folder / 'meta', {b'fine_label_names': [b'apple', b'bear', b'cloud'],
                                 b'coarse_label_names': [b'things']})
  return tmp_path, train, test


@pytest.mark.parametrize('inner', [False, True])
def test_cifar100_pickles(cifar100_dir, inner):
  root, train, test = cifar100_dir
  data_dir = root / 'cifar-100-python' if inner else root
  ds = check_dataset(cifar.load_cifar100(data_cfg(data_dir=str(data_dir))))
  assert ds.train_images.dtype == np.uint8 and ds.train_images.shape == (7, 32, 32, 3)
  assert ds.test_images.shape == (5, 32, 32, 3)
  np.testing.assert_array_equal(ds.train_images[0, 1, 2], [11, 22, 33])
  np.testing.assert_array_equal(ds.train_images, expected_nhwc(train[b'data']))
  np.testing.assert_array_equal(ds.test_images, expected_nhwc(test[b'data']))
  np.testing.assert_array_equal(ds.train_labels, train[b'fine_labels'])
  np.testing.assert_array_equal(ds.test_labels, test[b'fine_labels'])
  assert ds.train_labels.dtype == np.int32
  assert ds.class_names == ['apple', 'bear', 'cloud'] and ds.num_classes == 3
  mean, std = channel_stats(ds.train_images)
  np.testing.assert_allclose(ds.mean, mean, atol=1e-9)
  np.testing.assert_allclose(ds.std, std, atol=1e-9)


def test_cifar10_pickles(tmp_path):
  rng = np.random.default_rng(1)
  folder = tmp_path / 'cifar-10-batches-py'
  folder.mkdir()
  batches = [random_batch(rng, 4 + i, 2, b'labels') for i in range(5)]
  for i, batch in enumerate(batches):
    write_pickle(folder / f'data_batch_{i + 1}', batch)
  test = random_batch(rng, 3, 2, b'labels')
  write_pickle(folder / 'test_batch', test)
  write_pickle(folder / 'batches.meta', {b'label_names': [b'airplane', b'automobile'], b'num_vis': 3072,
                                         b'num_cases_per_batch': 4})
  ds = check_dataset(cifar.load_cifar10(data_cfg(name='cifar10', data_dir=str(tmp_path))))
  all_data = np.concatenate([b[b'data'] for b in batches])  # batches 1..5 in order
  np.testing.assert_array_equal(ds.train_images, expected_nhwc(all_data))
  np.testing.assert_array_equal(ds.train_labels, sum((b[b'labels'] for b in batches), []))
  np.testing.assert_array_equal(ds.test_images, expected_nhwc(test[b'data']))
  assert ds.class_names == ['airplane', 'automobile'] and ds.name == 'cifar10'


def test_corrupt_pickle_names_the_file(cifar100_dir):
  root, _, _ = cifar100_dir
  path = root / 'cifar-100-python' / 'train'
  path.write_bytes(path.read_bytes()[:100])  # truncated download
  with pytest.raises(DataError, match='cifar-100-python/train'):
    cifar.load_cifar100(data_cfg(data_dir=str(root)))


def test_incomplete_pickle_folder(cifar100_dir):
  root, _, _ = cifar100_dir
  os.remove(root / 'cifar-100-python' / 'meta')
  with pytest.raises(DataError, match=r"cifar-100-python is incomplete: it lacks \['meta'\]"):
    cifar.load_cifar100(data_cfg(data_dir=str(root)))


def test_pickle_with_foreign_objects_is_refused(cifar100_dir):
  root, _, _ = cifar100_dir
  path = root / 'cifar-100-python' / 'meta'
  write_pickle(path, {b'fine_label_names': collections.OrderedDict()})  # not something CIFAR files contain
  with pytest.raises(DataError, match='collections.OrderedDict'):
    cifar.load_cifar100(data_cfg(data_dir=str(root)))


def test_uint8_channel_stats_matches_channel_stats():
  images = np.random.default_rng(2).integers(0, 256, (20, 5, 6, 3), dtype=np.uint8)
  for got, want in zip(cifar.uint8_channel_stats(images, chunk=7), channel_stats(images)):
    np.testing.assert_allclose(got, want, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# CIFAR through tfds.data_source.


def test_tfds_mock_data(tmp_path):
  # tfds.testing.mock_data (tfds 4.9.10) serves tfds.data_source with random but deterministic examples,
  # already decoded (numpy images), for any data_dir. Its batched `__getitems__` is broken in this version (an
  # unbound functools.partial: TypeError) and raw-bytes reading needs TensorFlow to PNG-encode the fake images,
  # so mocked sources go through the loader's generic one-example-at-a-time path; the fast raw array_record path
  # is tested below on a real (tiny) prepared data set.
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6):
    ds = cifar.load_cifar100(data_cfg(data_dir=str(tmp_path)))  # 6 random labels: not every class present
    sources = {s: tfds.data_source('cifar100', split=s) for s in ('train', 'test')}
    expected = {s: [src[i] for i in range(6)] for s, src in sources.items()}
  for split, images, labels in (('train', ds.train_images, ds.train_labels), ('test', ds.test_images, ds.test_labels)):
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
    assert 0 <= labels.min() and labels.max() < 100
    np.testing.assert_array_equal(images, np.stack([ex['image'] for ex in expected[split]]))
    np.testing.assert_array_equal(labels, [int(ex['label']) for ex in expected[split]])
  assert ds.num_classes == 100 and len(ds.class_names) == 100


def fake_image(i):
  return np.random.default_rng(100 + i).integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def tfds_prepared_dir(tmp_path_factory):
  """A real TFDS-prepared `cifar100` (array_record files, PNG-encoded tf.train.Example records), generated
  without TensorFlow or a download: the TFDS CIFAR-100 builder with its example generator replaced."""
  tfds = pytest.importorskip('tensorflow_datasets')
  pytest.importorskip('array_record')
  import io
  from tensorflow_datasets.image_classification import cifar as tfds_cifar

  def png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format='PNG')
    return buf.getvalue()

  class TinyCifar100(tfds_cifar.Cifar100, skip_registration=True):
    name = 'cifar100'

    def _split_generators(self, dl_manager):
      self.info.features['label'].names = [f'class_{i}' for i in range(100)]
      return {'train': self._tiny('train', range(0, 12)), 'test': self._tiny('test', range(50, 56))}

    def _tiny(self, prefix, labels):
      for i in labels:  # label i has image fake_image(i): values can be checked whatever the record order
        yield i, {'id': f'{prefix}_{i}', 'image': png(fake_image(i)), 'label': i, 'coarse_label': i % 20}

  root = tmp_path_factory.mktemp('tfds')
  TinyCifar100(data_dir=str(root), file_format='array_record').download_and_prepare(
      download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return str(root)


def test_tfds_prepared_array_record(tfds_prepared_dir):
  ds = cifar.load_cifar100(data_cfg(data_dir=tfds_prepared_dir))
  assert ds.train_images.shape == (12, 32, 32, 3) and ds.test_images.shape == (6, 32, 32, 3)
  assert sorted(ds.train_labels.tolist()) == list(range(12))
  assert sorted(ds.test_labels.tolist()) == list(range(50, 56))
  for images, labels in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
    for image, label in zip(images, labels):
      np.testing.assert_array_equal(image, fake_image(label))
  assert ds.class_names[:2] == ['class_0', 'class_1'] and ds.num_classes == 100


def test_tfds_raw_path_matches_tfds_decoding(tfds_prepared_dir):
  source = cifar.open_tfds_split('cifar100', 'train', tfds_prepared_dir)
  raw = cifar.underlying_array_record(source)
  assert raw is not None  # the fast path is the one taken for real array_record data
  fast = cifar.arrays_from_raw(raw, tfds_prepared_dir)
  slow = cifar.arrays_from_decoded(source)
  for a, b in zip(fast, slow):
    np.testing.assert_array_equal(a, b)


def test_pickles_win_over_tfds(cifar100_dir):
  tfds = pytest.importorskip('tensorflow_datasets')
  root, train, _ = cifar100_dir
  with tfds.testing.mock_data(num_examples=3):
    ds = cifar.load_cifar100(data_cfg(data_dir=str(root)))
  np.testing.assert_array_equal(ds.train_images, expected_nhwc(train[b'data']))


@pytest.mark.parametrize('name, folder', [('cifar100', 'cifar-100-python'), ('cifar10', 'cifar-10-batches-py')])
def test_missing_data_message(tmp_path, name, folder):
  with pytest.raises(DataError) as info:
    cifar.load_cifar(name, data_cfg(name=name, data_dir=str(tmp_path)))
  message = str(info.value)
  for needle in (str(tmp_path / folder), str(tmp_path / name), 'tfds', folder, 'digits', 'data_dir',
                 'https://www.cs.toronto.edu/~kriz/cifar.html', f"tfds.data_source('{name}', download=True)"):
    assert needle in message, needle


def test_missing_data_message_without_data_dir(tmp_path, monkeypatch):
  tfds_constants = pytest.importorskip('tensorflow_datasets.core.constants')
  monkeypatch.chdir(tmp_path)  # the pickle folder is looked for in ./data
  monkeypatch.setattr(tfds_constants, 'DATA_DIR', str(tmp_path / 'tfds_home'))  # TFDS's default data dir
  with pytest.raises(DataError) as info:
    cifar.load_cifar100(data_cfg())
  assert str(tmp_path / 'data' / 'cifar-100-python') in str(info.value)
  assert str(tmp_path / 'tfds_home' / 'cifar100') in str(info.value)


def test_unreadable_tfds_data_is_reported(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  version = tmp_path / 'cifar100' / '3.0.2'
  version.mkdir(parents=True)
  (version / 'dataset_info.json').write_text('{not json')
  with pytest.raises(DataError, match='Found TFDS cifar100 at .*3.0.2'):
    cifar.load_cifar100(data_cfg(data_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------------------------------
# Image folders.


def write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8)).save(path)


def solid(colour, height, width):
  return np.broadcast_to(np.asarray(colour, np.uint8), (height, width, 3))


def colour_of(class_index, image_index, split):
  return (40 * class_index + 10, 20 * image_index + 5, 100 if split == 'train' else 200)


CLASSES = ('cat', 'ant', 'bee')  # created unsorted: ids follow the sorted names ant, bee, cat


@pytest.fixture
def folder_tree(tmp_path):
  """<tmp>/train/<class>/<i>.png (3 per class) and <tmp>/val/<class>/<i>.png (2 per class), solid colours of
  varying sizes (landscape and portrait), so every resized, cropped pixel has a known value."""
  for split, count in (('train', 3), ('val', 2)):
    for name in CLASSES:
      c = sorted(CLASSES).index(name)
      for i in range(count):
        height, width = (6, 9) if i % 2 else (10, 7)
        write_png(tmp_path / split / name / f'{i}.png', solid(colour_of(c, i, split), height, width))
  return tmp_path


def folder_cfg(data_dir, **fields):
  return data_cfg(name='image_folder', data_dir=str(data_dir), image_size=4, resize=5, **fields)


def test_image_folder_lazy_pixels_and_labels(folder_tree):
  ds = check_dataset(image_folder.load_image_folder(folder_cfg(folder_tree)))
  assert ds.class_names == ['ant', 'bee', 'cat'] and ds.num_classes == 3
  assert isinstance(ds.train_images, image_folder.LazyImages)
  assert ds.train_images.shape == (9, 4, 4, 3) and ds.test_images.shape == (6, 4, 4, 3)
  assert ds.train_images.dtype == np.uint8 and len(ds.train_images) == 9 and ds.image_shape == (4, 4, 3)
  np.testing.assert_array_equal(ds.train_labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(ds.test_labels, [0, 0, 1, 1, 2, 2])
  batch = ds.train_images[np.array([8, 0, 4])]
  assert batch.shape == (3, 4, 4, 3) and batch.dtype == np.uint8
  for row, idx in zip(batch, (8, 0, 4)):
    np.testing.assert_array_equal(row, solid(colour_of(ds.train_labels[idx], idx % 3, 'train'), 4, 4))
  every = ds.test_images[np.arange(6)]
  for idx in range(6):
    np.testing.assert_array_equal(every[idx], solid(colour_of(ds.test_labels[idx], idx % 2, 'val'), 4, 4))
  np.testing.assert_array_equal(ds.test_images[-1], every[5])  # a single int gives one image
  np.testing.assert_array_equal(ds.test_images[1:3], every[1:3])
  np.testing.assert_array_equal(ds.test_images[[5, 5]], every[[5, 5]])
  assert ds.test_images[np.array([], np.int64)].shape == (0, 4, 4, 3)
  with pytest.raises(IndexError):
    ds.test_images[np.array([6])]
  assert ds.mean == image_folder.IMAGENET_MEAN and ds.std == image_folder.IMAGENET_STD


def test_image_folder_resize_then_centre_crop(tmp_path):
  # three vertical bands 2 | 4 | 2 pixels wide: only the centre band survives the centre crop, with or
  # without resizing the shorter side first
  stripes = np.zeros((4, 8, 3), np.uint8)
  stripes[:, :2], stripes[:, 2:6], stripes[:, 6:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
  for split in ('train', 'test'):
    write_png(tmp_path / split / 'a' / 'wide.png', stripes)
    write_png(tmp_path / split / 'a' / 'tall.png', stripes.transpose(1, 0, 2))
  for resize in (4, 8):
    ds = image_folder.load_image_folder(data_cfg(data_dir=str(tmp_path), image_size=4, resize=resize,
                                                 num_workers=1))
    for image in ds.test_images[np.arange(2)]:
      np.testing.assert_array_equal(image, solid((0, 255, 0), 4, 4))


def test_image_folder_resize_is_smooth(tmp_path):
  # a one-pixel checkerboard halved: an antialiasing (bilinear) resize greys it out, nearest would keep 0/255
  board = (np.indices((8, 8)).sum(axis=0) % 2 * 255).astype(np.uint8)
  for split in ('train', 'val'):
    write_png(tmp_path / split / 'a' / 'board.png', np.repeat(board[..., None], 3, axis=2))
  image = image_folder.load_image_folder(data_cfg(data_dir=str(tmp_path), image_size=4)).train_images[0]
  assert image.shape == (4, 4, 3) and 96 <= image.min() and image.max() <= 160


def test_index_array():
  np.testing.assert_array_equal(image_folder.index_array(np.array([-1, 0, 2]), 3), [2, 0, 2])
  np.testing.assert_array_equal(image_folder.index_array(np.array([True, False, True]), 3), [0, 2])
  np.testing.assert_array_equal(image_folder.index_array(slice(None, None, -2), 3), [2, 0])
  for bad in (np.array([3]), np.array([-4]), np.array([0.5]), np.array([True])):
    with pytest.raises(IndexError):
      image_folder.index_array(bad, 3)


def test_image_folder_defaults(folder_tree):
  ds = image_folder.load_image_folder(data_cfg(name='image_folder', data_dir=str(folder_tree)))
  assert ds.train_images.shape == (9, 224, 224, 3)  # image_size 224, resize = image_size
  np.testing.assert_array_equal(ds.train_images[3], solid(colour_of(1, 0, 'train'), 224, 224))


def test_image_folder_mean_std_and_test_folder(folder_tree):
  os.rename(folder_tree / 'val', folder_tree / 'test')
  ds = image_folder.load_image_folder(folder_cfg(folder_tree, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
  assert ds.mean == (0.5, 0.5, 0.5) and ds.std == (0.25, 0.25, 0.25)
  assert len(ds.test_images) == 6


def write_lists(root, train_lines, test_lines):
  (root / 'train.txt').write_text('\n'.join(train_lines) + '\n')
  (root / 'test.txt').write_text('\n'.join(test_lines) + '\n')
  return dict(train_list=str(root / 'train.txt'), test_list='test.txt')  # the second one relative to data_dir


def test_image_folder_split_lists(folder_tree):
  # an ImageNet-100-style subset: 2 of the 3 classes, with the lists' own labels (cat=0, ant=1)
  lists = write_lists(folder_tree,
                      ['train/cat/0.png 0', 'train/ant/1.png 1', '', 'train/cat/2.png 0'],
                      ['val/ant/0.png 1', 'val/cat/1.png   0'])
  ds = check_dataset(image_folder.load_image_folder(folder_cfg(folder_tree, **lists)))
  assert ds.num_classes == 2 and ds.class_names == ['cat', 'ant']
  np.testing.assert_array_equal(ds.train_labels, [0, 1, 0])
  np.testing.assert_array_equal(ds.test_labels, [1, 0])
  cat, ant = sorted(CLASSES).index('cat'), sorted(CLASSES).index('ant')
  expected = [solid(colour_of(c, i, 'train'), 4, 4) for c, i in ((cat, 0), (ant, 1), (cat, 2))]
  np.testing.assert_array_equal(ds.train_images[np.arange(3)], np.stack(expected))
  np.testing.assert_array_equal(ds.test_images[0], solid(colour_of(ant, 0, 'val'), 4, 4))


@pytest.mark.parametrize('train_lines, test_lines, pattern', [
    (['train/cat/0.png 0', 'train/ant/1.png'], ['val/cat/0.png 0'], r'train\.txt, line 2'),
    (['train/cat/0.png 0', 'train/ant/1.png one'], ['val/cat/0.png 0'], r'train\.txt, line 2'),
    (['train/cat/0.png 0'], ['val/cat/0.png 0', '', 'val/cat/9.png 0'], r'test\.txt .*\n.*line 3: .*val/cat/9\.png'),
    (['train/cat/0.png 0', 'train/ant/0.png 2'], ['val/cat/0.png 0', 'val/ant/0.png 2'], r'labels \[1\]'),
    (['train/cat/0.png 0', 'train/ant/0.png 1'], ['val/cat/0.png 0'], r"\['1 \(ant\)'\].*no images in .*test\.txt"),
])
def test_image_folder_split_list_errors(folder_tree, train_lines, test_lines, pattern):
  lists = write_lists(folder_tree, train_lines, test_lines)
  with pytest.raises(DataError, match=pattern):
    image_folder.load_image_folder(folder_cfg(folder_tree, **lists))


def test_image_folder_missing_list_file(folder_tree):
  with pytest.raises(DataError, match='nope.txt'):
    image_folder.load_image_folder(folder_cfg(folder_tree, train_list='nope.txt', test_list='nope.txt'))


def test_image_folder_missing_dirs(tmp_path, folder_tree):
  with pytest.raises(DataError, match='data_dir'):
    image_folder.load_image_folder(folder_cfg(''))
  with pytest.raises(DataError, match=str(tmp_path / 'absent')):
    image_folder.load_image_folder(folder_cfg(tmp_path / 'absent'))
  os.rename(folder_tree / 'val', folder_tree / 'elsewhere')
  with pytest.raises(DataError, match=f'{folder_tree / "val"} or {folder_tree / "test"}'):
    image_folder.load_image_folder(folder_cfg(folder_tree))


def test_image_folder_empty_class(folder_tree):
  (folder_tree / 'train' / 'dog').mkdir()
  (folder_tree / 'train' / 'dog' / 'notes.txt').write_text('not an image')
  with pytest.raises(DataError, match="Class 'dog' has no images"):
    image_folder.load_image_folder(folder_cfg(folder_tree))


def test_image_folder_class_missing_from_val(folder_tree):
  write_png(folder_tree / 'train' / 'dog' / '0.png', solid((1, 2, 3), 5, 5))
  with pytest.raises(DataError, match=r"\['dog'\] are in .*train but not in .*val"):
    image_folder.load_image_folder(folder_cfg(folder_tree))


def test_image_folder_corrupt_image(folder_tree):
  bad = folder_tree / 'val' / 'bee' / '1.png'
  bad.write_bytes(bad.read_bytes()[:40])  # truncated: the header opens, the data does not
  with pytest.raises(DataError, match=f'unreadable.*\n.*{bad}'):
    image_folder.load_image_folder(folder_cfg(folder_tree))
  # without the up-front check, loading succeeds (nothing is decoded) and the error comes with the decode
  ds = image_folder.load_image_folder(folder_cfg(folder_tree, verify_images=False))
  assert ds.test_images[np.array([0, 1, 2])].shape == (3, 4, 4, 3)
  with pytest.raises(DataError, match=f'Cannot decode image {bad}'):
    ds.test_images[np.arange(6)]


def test_image_folder_not_an_image(folder_tree):
  bad = folder_tree / 'train' / 'ant' / 'junk.jpg'
  bad.write_bytes(b'this is no jpeg')
  with pytest.raises(DataError, match=str(bad)):
    image_folder.load_image_folder(folder_cfg(folder_tree))


def test_lazy_images_pickle_and_threads(folder_tree):
  ds = image_folder.load_image_folder(folder_cfg(folder_tree, num_workers=3))
  serial = image_folder.LazyImages(ds.train_images.paths, 4, 5, num_workers=1)
  np.testing.assert_array_equal(ds.train_images[np.arange(9)], serial[np.arange(9)])
  copy = pickle.loads(pickle.dumps(ds.train_images))
  np.testing.assert_array_equal(copy[np.arange(9)], serial[np.arange(9)])


# ---------------------------------------------------------------------------------------------------------
# scikit-learn's bundled digits.


def test_bundled_digits_equal_load_digits_without_importing_sklearn():
  """The digits read from scikit-learn's bundled file equal `sklearn.datasets.load_digits()`, and reading them
  imports no scikit-learn (checked in a fresh interpreter)."""
  import subprocess
  import sys
  from sklearn.datasets import load_digits
  from incremental_jax.data.sources import bundled_digits
  pixels, target = bundled_digits()
  reference = load_digits()
  np.testing.assert_array_equal(pixels, reference.images)
  np.testing.assert_array_equal(target, reference.target)
  code = ('import sys\nfrom incremental_jax.data.sources import bundled_digits\npixels, target = bundled_digits()\n'
          "print(pixels.shape, int(target.sum()), 'sklearn' in sys.modules)")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=root))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ['(1797,', '8,', '8)', str(int(reference.target.sum())), 'False']
