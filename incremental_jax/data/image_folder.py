"""ImageNet-style class-folder trees, decoded lazily.

Layout: `<data_dir>/train/<class>/*.JPEG` (also .jpg, .png, ...; nested folders are searched) and
`<data_dir>/val/<class>/...` (or `test/`). Class ids follow the sorted class-folder names. Optionally, split list
files (`train_list`, `test_list`; one `relative/path.JPEG <label>` per line, paths relative to `data_dir`), as
ImageNet-100 subsets are distributed, define the images and labels instead of the folders.

Images are never all loaded: the splits are `LazyImages`, which decode the requested indices on demand with PIL
(RGB, shorter side resized to `resize`, centre crop `image_size`: the test view, as torchvision's `Resize(resize)` +
`CenterCrop(image_size)`, `host_transforms.decode_image`) in a thread pool. Train batches come from a Grain loader
instead (`LazyImages.train_batches`, `grain.MapDataset` over the epochs' index rows, decoded in `data.workers`
worker processes that serve every epoch, `grain_stream`): with `data.augment.random_resized_crop` each train image
is a RandomResizedCrop of the full decoded image (`host_transforms`), else the test view.

`data.classes` restricts a class-folder tree to a list of class folders: a packaged list of `class_lists/` by name
(`imagenet100_podnet`, `imagenet100_lucir`) or a file, so ImageNet-100 runs from an ImageNet-1k tree.
"""
from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Sequence

import numpy as np

from incremental_jax import paths as paths_lib
from incremental_jax.data import grain_stream, host_transforms
from incremental_jax.data.host_transforms import decode_image, row_keys
from incremental_jax.data.sources import DataError, Dataset

IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.ppm', '.pgm', '.pbm', '.tif', '.tiff', '.webp', '.gif')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
TEST_SPLIT_NAMES = ('val', 'test')  # the second split's folder, first that exists
_LAYOUT_HINT = ('expected <data_dir>/train/<class>/<image> and <data_dir>/val/<class>/<image> (or test/), or '
                'split list files given with --config.data.train_list and --config.data.test_list')
_MAX_NAMED = 10  # offending items named in one message


# ---------------------------------------------------------------------------------------------------------
# Decoding.


def check_image(path: str) -> str:
  """'' if PIL can open and verify `path` (cheap: no full decode for most formats), else the error."""
  from PIL import Image
  try:
    with paths_lib.open_file(path, 'rb') as f, Image.open(f) as img:
      img.verify()
  except Exception as e:  # any failure means the file is unusable
    return f'{type(e).__name__}: {e}'
  return ''


def verify_images(paths: Sequence[str], num_workers: int, chunk: int = 256) -> None:
  """Opens every image cheaply (PIL `verify`) in a thread pool; one DataError naming the unreadable files."""
  def check_chunk(start):
    return [(p, err) for p in paths[start:start + chunk] if (err := check_image(p))]

  with ThreadPoolExecutor(max(1, num_workers)) as pool:
    bad = [item for found in pool.map(check_chunk, range(0, len(paths), chunk)) for item in found]
  if bad:
    listed = '\n'.join(f'  - {p}: {err}' for p, err in bad[:_MAX_NAMED])
    more = f'\n  ... and {len(bad) - _MAX_NAMED} more' if len(bad) > _MAX_NAMED else ''
    raise DataError(f'{len(bad)} unreadable image file(s):\n{listed}{more}\nReplace or delete them (and their '
                    f'split-list lines, if any); --config.data.verify_images=False skips this check.')


def index_array(key, n: int) -> np.ndarray:
  """Non-negative int64 indices from an index array, list, slice or boolean mask over `n` items."""
  if isinstance(key, slice):
    return np.arange(n)[key]
  idx = np.asarray(key)
  if idx.dtype == bool:
    if idx.shape != (n,):
      raise IndexError(f'boolean index of shape {idx.shape} for {n} images')
    return np.flatnonzero(idx)
  if idx.size == 0:
    return idx.astype(np.int64)
  if idx.dtype.kind not in 'iu':
    raise IndexError(f'images can only be indexed by integers, slices or boolean masks, not {idx.dtype}')
  if idx.min() < -n or idx.max() >= n:
    raise IndexError(f'index out of range for {n} images: {idx[(idx < -n) | (idx >= n)][:5].tolist()}')
  return np.where(idx < 0, idx + n, idx).astype(np.int64)


class LazyImages:
  """An array-like of uint8 images [N, S, S, 3] that decodes only the indices asked for.

  `images[idx]` (an int array, list, slice or mask) returns uint8 [len(idx), S, S, 3]; `images[i]` returns one
  [S, S, 3] image. Decoding runs in a thread pool of `num_workers` threads (PIL releases the GIL).
  """

  def __init__(self, paths: Sequence[str], image_size: int, resize: int, num_workers: int,
               train_transform: Optional[host_transforms.TrainDecode] = None, workers: int = 0, prefetch: int = 2):
    self.paths = tuple(paths)
    self.image_size = int(image_size)
    self.resize = int(resize)
    self.num_workers = max(1, int(num_workers))
    self.train_transform = train_transform or host_transforms.TrainDecode(
        self.paths, self.image_size, self.resize, random_resized_crop=False)
    self.workers = int(workers)
    self.prefetch = max(1, int(prefetch))
    self._pool = None
    self._lock = threading.Lock()
    self._streams = [None, None]   # the train loader's GrainStream and its finalizer

  def train_batches(self, rows: np.ndarray, columns: Optional[np.ndarray] = None) -> Iterator[np.ndarray]:
    """uint8 [len(columns), S, S, 3] train batches, one per index row of `rows` [n, B] (columns `columns` of each
    row: this process's share, default all), made with `self.train_transform` by a Grain loader: in
    `self.workers` worker processes that persist from call to call (`grain_stream.GrainStream`, kept until this
    object is collected, `close`d or the process exits; a call with another width, or one after a call left
    unfinished, starts new ones), or with 0 workers in this process, in threads. Each image's randomness is keyed
    by its row's digest and its column (`host_transforms.row_keys`), so the batches depend on the rows only."""
    import grain
    from absl import flags
    if not flags.FLAGS.is_parsed():   # Grain reads its absl flags; a notebook or test has parsed none
      flags.FLAGS.mark_as_parsed()
    items = train_items(rows, columns)
    if self.workers > 0:
      yield from self._stream(items.shape[1]).batches(items)
      return
    ds = grain.MapDataset.source(_Items(items.reshape(-1, 4))).map(self.train_transform).batch(items.shape[1])
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.num_workers,
                                              prefetch_buffer_size=self.num_workers * self.prefetch))
    iterator = iter(it)
    try:
      yield from iterator
    finally:
      iterator.close()

  def _stream(self, width: int) -> grain_stream.GrainStream:
    """The open worker stream for batches of `width` items (a new one when there is none for them, or the one
    there is serves another call)."""
    stream = self._streams[0]
    if stream is None or stream.closed or stream.busy or stream.width != width or stream.workers != self.workers:
      self.close()
      stream = grain_stream.GrainStream(self.train_transform, width, self.workers, self.prefetch)
      self._streams[:] = [stream, weakref.finalize(self, stream.close)]
    return stream

  def close(self) -> None:
    """Stops the train loader's worker processes, if any (they start again when needed)."""
    stream, finalizer = self._streams
    if finalizer is not None:
      finalizer.detach()
    if stream is not None:
      stream.close()
    self._streams[:] = [None, None]

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (len(self.paths), self.image_size, self.image_size, 3)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(np.uint8)

  @property
  def ndim(self) -> int:
    return 4

  def __len__(self) -> int:
    return len(self.paths)

  def __repr__(self) -> str:
    return f'LazyImages({len(self.paths)} images, {self.image_size}x{self.image_size}, resize={self.resize})'

  def decode(self, i: int) -> np.ndarray:
    """Image `i` (a non-negative index)."""
    return decode_image(self.paths[i], self.image_size, self.resize)

  def _executor(self) -> ThreadPoolExecutor:
    with self._lock:
      if self._pool is None:
        self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix='decode')
      return self._pool

  def __getitem__(self, key) -> np.ndarray:
    n = len(self.paths)
    if isinstance(key, (int, np.integer)):
      if not -n <= key < n:
        raise IndexError(f'index {key} out of range for {n} images')
      return self.decode(int(key) % n)
    idx = index_array(key, n)
    flat = idx.reshape(-1)
    out = np.empty((len(flat), self.image_size, self.image_size, 3), np.uint8)

    def fill(j):
      out[j] = self.decode(int(flat[j]))

    if len(flat) > 1 and self.num_workers > 1:
      for _ in self._executor().map(fill, range(len(flat))):
        pass
    else:
      for j in range(len(flat)):
        fill(j)
    return out.reshape(idx.shape + out.shape[1:])

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_pool'], state['_lock'], state['_streams'] = None, None, [None, None]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


def train_items(rows: np.ndarray, columns: Optional[np.ndarray] = None) -> np.ndarray:
  """uint64 [n, len(columns), 4]: the loader items (image index, row key 0, row key 1, column) of columns
  `columns` (default all) of each index row of `rows` [n, B]."""
  rows = np.asarray(rows, np.int64).reshape(len(rows), -1)
  columns = np.arange(rows.shape[1]) if columns is None else np.asarray(columns, np.int64)
  keys = row_keys(rows)
  items = np.empty((len(rows), len(columns), 4), np.uint64)
  items[..., 0] = rows[:, columns]
  items[..., 1], items[..., 2] = keys[:, None, 0], keys[:, None, 1]
  items[..., 3] = columns[None]
  return items


class _Items:
  """A random-access Grain source over the (image, key0, key1, column) items of an epoch (uint64 [n, 4])."""

  def __init__(self, items: np.ndarray):
    self.items = items

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, i):
    return self.items[i]


# ---------------------------------------------------------------------------------------------------------
# Class-folder trees.


def is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def class_images(class_dir: str) -> list[str]:
  """Sorted paths of the image files under `class_dir` (searched recursively, links followed)."""
  found = []
  walk = (os.walk(class_dir, followlinks=True) if not paths_lib.is_remote(class_dir) else
          ((os.fspath(root), dirs, files) for root, dirs, files in paths_lib.as_path(class_dir).walk()))
  for root, dirs, files in walk:
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    found.extend(os.path.join(root, f) for f in sorted(files) if is_image_file(f))
  return found


def scan_split(split_dir: str) -> dict[str, list[str]]:
  """{class name: image paths} of one split folder, classes sorted; DataError for an empty class or split."""
  classes = sorted(d.name for d in paths_lib.as_path(split_dir).iterdir() if not d.name.startswith('.') and d.is_dir())
  if not classes:
    raise DataError(f'{split_dir} has no class folders; {_LAYOUT_HINT}.')
  tree = {}
  for name in classes:
    images = class_images(os.path.join(split_dir, name))
    if not images:
      raise DataError(f'Class {name!r} has no images in {os.path.join(split_dir, name)} (looked for '
                      f'{", ".join(IMAGE_EXTENSIONS)}); add its images or remove the folder.')
    tree[name] = images
  return tree


def find_split_dir(data_dir: str, names: Sequence[str]) -> str:
  """The first `<data_dir>/<name>` folder that exists; DataError naming them all otherwise."""
  for name in names:
    path = os.path.join(data_dir, name)
    if paths_lib.is_dir(path):
      return path
  looked = ' or '.join(os.path.join(data_dir, n) for n in names)
  raise DataError(f'No split folder {looked}; {_LAYOUT_HINT}.')


def flatten_tree(tree: dict[str, list[str]], class_ids: dict[str, int]) -> tuple[list[str], np.ndarray]:
  """Image paths and int32 labels of a {class: paths} tree."""
  paths = [p for name in tree for p in tree[name]]
  labels = np.asarray([class_ids[name] for name in tree for _ in tree[name]], np.int32)
  return paths, labels


CLASS_LISTS_DIR = os.path.join(os.path.dirname(__file__), 'class_lists')


def class_list(name_or_file: str) -> list[str]:
  """The class folder names of `data.classes`: a packaged list (`class_lists/<name>.txt`) or a file with one name
  per line ('#' lines are comments); sorted. DataError when neither exists or the list is empty or repeats a name."""
  packaged = os.path.join(CLASS_LISTS_DIR, f'{name_or_file}.txt')
  path = packaged if os.path.isfile(packaged) else os.path.expanduser(name_or_file)
  if not paths_lib.is_file(path):
    names = sorted(f[:-4] for f in os.listdir(CLASS_LISTS_DIR) if f.endswith('.txt'))
    raise DataError(f'data.classes={name_or_file!r} is neither a packaged class list ({", ".join(names)}) nor a '
                    f'file with one class folder name per line.')
  with paths_lib.open_file(path, 'r', encoding='utf-8') as f:
    names = [line.strip() for line in f if line.strip() and not line.lstrip().startswith('#')]
  if not names or len(set(names)) != len(names):
    raise DataError(f'Class list {path} is empty or names a class twice.')
  return sorted(names)


def select_classes(tree: dict[str, list[str]], classes: Sequence[str], split_dir: str) -> dict[str, list[str]]:
  """The `classes` of a {class: paths} tree; DataError naming the class folders that are missing."""
  missing = [c for c in classes if c not in tree]
  if missing:
    raise DataError(f'{len(missing)} class(es) of data.classes have no folder in {split_dir}: '
                    f'{missing[:_MAX_NAMED]}. Point --config.data.data_dir at the tree that holds them.')
  return {c: tree[c] for c in classes}


def folder_splits(data_dir: str,
                  classes: Sequence[str] = ()) -> tuple[list[str], np.ndarray, list[str], np.ndarray, list[str]]:
  """(train paths, train labels, test paths, test labels, class names) of a class-folder tree; only the class
  folders `classes` when given (sorted: their ids)."""
  train_dir = find_split_dir(data_dir, ('train',))
  test_dir = find_split_dir(data_dir, TEST_SPLIT_NAMES)
  train, test = scan_split(train_dir), scan_split(test_dir)
  if classes:
    train, test = select_classes(train, classes, train_dir), select_classes(test, classes, test_dir)
  only_train = [c for c in train if c not in test]
  only_test = [c for c in test if c not in train]
  if only_train or only_test:
    problems = []
    if only_train:
      problems.append(f'class(es) {only_train[:_MAX_NAMED]} are in {train_dir} but not in {test_dir}')
    if only_test:
      problems.append(f'class(es) {only_test[:_MAX_NAMED]} are in {test_dir} but not in {train_dir}')
    raise DataError(f'{"; ".join(problems)}. Every class needs images in both splits: add the missing class '
                    f'folders or remove the extra ones.')
  names = list(train)
  class_ids = {name: i for i, name in enumerate(names)}
  train_paths, train_labels = flatten_tree(train, class_ids)
  test_paths, test_labels = flatten_tree(test, class_ids)
  return train_paths, train_labels, test_paths, test_labels, names


# ---------------------------------------------------------------------------------------------------------
# Split list files.


def resolve_list_path(list_path: str, data_dir: str) -> str:
  """`list_path` as given if it exists, else relative to `data_dir`; DataError naming both otherwise."""
  absolute = os.path.isabs(list_path) or paths_lib.is_remote(list_path)
  candidates = [list_path] if absolute else [list_path, os.path.join(data_dir, list_path)]
  for path in candidates:
    if paths_lib.is_file(path):
      return path
  raise DataError(f'Split list file {list_path!r} not found (looked at {", ".join(candidates)}); fix '
                  f'--config.data.train_list / --config.data.test_list.')


def parse_list_line(line: str) -> tuple[str, int] | None:
  """(relative path, label) of one `path label` line; None when the line is malformed."""
  parts = line.rsplit(None, 1)
  if len(parts) != 2:
    return None
  try:
    label = int(parts[1])
  except ValueError:
    return None
  return (parts[0], label) if label >= 0 else None


def read_split_list(list_file: str, data_dir: str) -> tuple[list[str], np.ndarray]:
  """Image paths (relative to `data_dir`) and labels of a split list; DataError naming file and line."""
  paths, labels, missing = [], [], []
  with paths_lib.open_file(list_file, 'r', encoding='utf-8') as f:
    for lineno, line in enumerate(f, start=1):
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      entry = parse_list_line(line)
      if entry is None:
        raise DataError(f'{list_file}, line {lineno}: expected "relative/path/to/image.JPEG <label>" with an '
                        f'integer label >= 0, got {line[:200]!r}.')
      path = os.path.join(data_dir, entry[0])
      if not paths_lib.is_file(path):
        missing.append(f'line {lineno}: {path}')
      paths.append(path)
      labels.append(entry[1])
  if missing:
    listed = '\n'.join(f'  - {m}' for m in missing[:_MAX_NAMED])
    more = f'\n  ... and {len(missing) - _MAX_NAMED} more' if len(missing) > _MAX_NAMED else ''
    raise DataError(f'{list_file} names {len(missing)} missing image file(s) (paths are relative to data_dir '
                    f'{data_dir}):\n{listed}{more}')
  if not paths:
    raise DataError(f'Split list {list_file} lists no images.')
  return paths, np.asarray(labels, np.int32)


def label_names(paths: Sequence[str], labels: np.ndarray, num_classes: int) -> list[str]:
  """A name per label: the parent folder shared by all its (train) images, e.g. a WordNet id, else the number."""
  parents = [set() for _ in range(num_classes)]
  for path, label in zip(paths, labels):
    parents[label].add(os.path.basename(os.path.dirname(path)))
  return [next(iter(p)) if len(p) == 1 else str(c) for c, p in enumerate(parents)]


def list_splits(data_dir: str, train_list: str,
                test_list: str) -> tuple[list[str], np.ndarray, list[str], np.ndarray, list[str]]:
  """(train paths, train labels, test paths, test labels, class names) from two split list files."""
  if not (train_list and test_list):
    raise DataError('Split lists need both --config.data.train_list and --config.data.test_list '
                    f'(got train_list={train_list!r}, test_list={test_list!r}).')
  train_file, test_file = resolve_list_path(train_list, data_dir), resolve_list_path(test_list, data_dir)
  train_paths, train_labels = read_split_list(train_file, data_dir)
  test_paths, test_labels = read_split_list(test_file, data_dir)
  present = set(train_labels.tolist()) | set(test_labels.tolist())
  num_classes = max(present) + 1
  if len(present) != num_classes:
    absent = sorted(set(range(num_classes)) - present)
    raise DataError(f'The labels of {train_file} and {test_file} must be 0..K-1; labels {absent[:_MAX_NAMED]} of '
                    f'0..{num_classes - 1} never occur. Renumber the classes contiguously.')
  names = label_names(train_paths, train_labels, num_classes)
  for labels, file, other in ((train_labels, train_file, test_file), (test_labels, test_file, train_file)):
    absent = sorted(present - set(labels.tolist()))
    if absent:
      named = [f'{c} ({names[c]})' for c in absent[:_MAX_NAMED]]
      raise DataError(f'Class(es) {named} appear in {other} but have no images in {file}; every class needs '
                      f'images in both splits.')
  return train_paths, train_labels, test_paths, test_labels, names


# ---------------------------------------------------------------------------------------------------------
# The source.


def normalisation(cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """`cfg.mean` / `cfg.std` when given (3 values each), else the ImageNet statistics."""
  mean = tuple(float(v) for v in (cfg.get('mean', None) or IMAGENET_MEAN))
  std = tuple(float(v) for v in (cfg.get('std', None) or IMAGENET_STD))
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise DataError(f'data.mean and data.std need 3 values each (std > 0); got mean={mean}, std={std}.')
  return mean, std


def load_image_folder(cfg) -> Dataset:
  """The class-folder tree (or split lists) under `cfg.data_dir` as a Dataset of LazyImages.

  cfg fields: data_dir (required), image_size (0: 224), resize (0: image_size), train_list / test_list ('' for
  none), classes ('' for every class folder), num_workers (decoding threads, 0: all cores), workers (Grain
  processes of the train loader, -1: one per core), prefetch, augment.random_resized_crop / crop_scale /
  crop_ratio (the train view), verify_images (True: open every file once up front), mean / std (default:
  ImageNet's), name.
  """
  data_dir = os.path.expanduser(str(cfg.data_dir or ''))   # (a gs:// path has no leading ~: unchanged)
  if not data_dir:
    raise DataError(f'The image_folder source needs --config.data.data_dir=<root>; {_LAYOUT_HINT}.')
  if not paths_lib.is_dir(data_dir):
    raise DataError(f'data_dir {data_dir} does not exist or is not a folder; {_LAYOUT_HINT}.')
  image_size = int(cfg.image_size or 0) or DEFAULT_IMAGE_SIZE
  resize = int(cfg.resize or 0) or image_size
  if resize < image_size:
    raise DataError(f'data.resize ({resize}) must be at least data.image_size ({image_size}): the centre crop '
                    f'is taken from the resized image.')
  num_workers = int(cfg.num_workers or 0) or os.cpu_count() or 1
  train_list, test_list = str(cfg.train_list or ''), str(cfg.test_list or '')
  classes = str(cfg.get('classes', '') or '')
  if train_list or test_list:
    splits = list_splits(data_dir, train_list, test_list)   # the lists define the classes; data.classes unused
  else:
    splits = folder_splits(data_dir, class_list(classes) if classes else ())
  train_paths, train_labels, test_paths, test_labels, names = splits
  if cfg.verify_images:
    verify_images(train_paths + test_paths, num_workers)
  mean, std = normalisation(cfg)
  where = str(paths_lib.as_path(data_dir)) + (f' (split lists {train_list}, {test_list})' if train_list or test_list else '')
  aug = cfg.get('augment', None) or {}
  train_transform = host_transforms.TrainDecode(
      tuple(train_paths), image_size, resize, random_resized_crop=bool(aug.get('random_resized_crop', False)),
      scale=tuple(float(v) for v in aug.get('crop_scale', (0.08, 1.0))),
      ratio=tuple(float(v) for v in aug.get('crop_ratio', (3 / 4, 4 / 3))))
  workers = int(cfg.get('workers', -1))
  workers = os.cpu_count() or 1 if workers < 0 else workers
  train_images = LazyImages(train_paths, image_size, resize, num_workers, train_transform=train_transform,
                            workers=workers, prefetch=int(cfg.get('prefetch', 2)))
  return Dataset(name=str(cfg.name),
                 train_images=train_images, train_labels=train_labels,
                 test_images=LazyImages(test_paths, image_size, resize, num_workers), test_labels=test_labels,
                 num_classes=len(names), class_names=names, mean=mean, std=std,
                 location=where)
