"""Host-side image decoding: the deterministic test view and the random train transforms (NumPy and PIL only: they
run in Grain's worker processes). The lowest floor of the image-folder pipeline: `image_folder` imports it, never
the other way round.

The test view (`decode_image`) is torchvision's `Resize(resize)` + `CenterCrop(size)` on PIL images.

`RandomResizedCrop` follows torchvision (`torchvision/transforms/transforms.py::RandomResizedCrop.get_params` and
`functional.resized_crop` on PIL images), as the official ImageNet code of PODNet (`inclearn/lib/data/datasets.py::
ImageNet100`), LUCIR (`imagenet-class-incremental/class_incremental_cosine_imagenet.py`) and PyCIL
(`utils/data.py::iImageNet100`) trains with it: up to 10 draws of an area fraction (uniform in `scale`) and a
log-uniform aspect ratio (in `ratio`) until the box fits, else the central fallback box; the box is cut from the
full decoded image and resized bilinearly to `size` x `size`.

Randomness is a pure function of the batch: the crop of column b of a batch's index row is drawn from
`np.random.default_rng((k0, k1, b))`, where (k0, k1) is a digest of the whole index row (`row_keys`). The rows
are the sampler's, themselves a pure function of (seed, task, phase, epoch, step) (`train.Trainer.epoch_plan`),
so a batch does not depend on which worker process made it, on how many there are, or on a resume.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Sequence

import numpy as np

from incremental_jax import paths as paths_lib
from incremental_jax.errors import DataError


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
  """(width, height) after scaling the shorter side to `shorter`, keeping the aspect ratio (longer side floored)."""
  if width <= height:
    return shorter, max(shorter, int(shorter * height / width))
  return max(shorter, int(shorter * width / height)), shorter


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
  """The PIL box (left, top, right, bottom) of the centred `size` x `size` crop."""
  left = int(round((width - size) / 2.0))
  top = int(round((height - size) / 2.0))
  return left, top, left + size, top + size


def decode_image(path: str, image_size: int, resize: int) -> np.ndarray:
  """uint8 [image_size, image_size, 3]: RGB, shorter side resized to `resize` (bilinear), centre-cropped.

  Raises DataError naming the file when it cannot be decoded.
  """
  from PIL import Image
  try:
    with paths_lib.open_file(path, 'rb') as f, Image.open(f) as img:
      img = img.convert('RGB')
      size = resized_size(img.width, img.height, resize)
      if size != img.size:
        img = img.resize(size, Image.BILINEAR)
      img = img.crop(center_crop_box(img.width, img.height, image_size))
      return np.asarray(img, dtype=np.uint8)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for damaged files
    raise DataError(f'Cannot decode image {path}: {type(e).__name__}: {e}. Replace or delete the file '
                    f'(and its line in the split list, if any).') from e


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: Sequence[float] = (0.08, 1.0),
                            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(top, left, crop height, crop width) of one RandomResizedCrop box of a `width` x `height` image.

  torchvision's sampling (`RandomResizedCrop.get_params`): 10 attempts of (area fraction ~ U(scale), log aspect
  ratio ~ U(log ratio)), side lengths rounded; the first box that fits is placed uniformly; if none fits, the
  largest centred box whose aspect ratio is clamped to `ratio`.
  """
  area = width * height
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  image_ratio = width / height
  if image_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif image_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img, box: tuple[int, int, int, int], size: int) -> np.ndarray:
  """uint8 [size, size, 3]: the (top, left, h, w) box of PIL image `img` cut out, then resized bilinearly
  (`torchvision.transforms.functional.resized_crop` on PIL images). Cropping first matters: PIL's resize with a
  source box would also blend the pixels just outside the box into the edges."""
  from PIL import Image
  top, left, h, w = box
  out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
  return np.asarray(out, dtype=np.uint8)


def row_keys(rows: np.ndarray) -> np.ndarray:
  """uint64 [n, 2]: a digest of each index row of `rows` [n, B] (its int64 bytes), the key of its batch's crops."""
  rows = np.ascontiguousarray(np.asarray(rows, np.int64).reshape(len(rows), -1))
  out = np.empty((len(rows), 2), np.uint64)
  for i, row in enumerate(rows):
    out[i] = np.frombuffer(hashlib.blake2b(row.tobytes(), digest_size=16).digest(), np.uint64)
  return out


def item_rng(k0: int, k1: int, column: int) -> np.random.Generator:
  """The generator of the crop of column `column` of the batch keyed (k0, k1)."""
  return np.random.default_rng((int(k0), int(k1), int(column)))


@dataclasses.dataclass(frozen=True)
class TrainDecode:
  """Decodes train image `paths[i]` (RGB) and returns uint8 [size, size, 3]: with `random_resized_crop`, one
  RandomResizedCrop(size, scale, ratio) drawn from `item_rng(k0, k1, column)`; otherwise the deterministic test
  view (shorter side to `resize`, centre crop `size`, `decode_image`). Flip, brightness and
  normalisation follow on the device (`augment.augment_batch`). Called with an item (i, k0, k1, column)."""
  paths: tuple
  size: int
  resize: int
  random_resized_crop: bool
  scale: tuple = (0.08, 1.0)
  ratio: tuple = (3 / 4, 4 / 3)

  def __call__(self, item) -> np.ndarray:
    i, k0, k1, column = (int(v) for v in item)
    if not self.random_resized_crop:
      return decode_image(self.paths[i], self.size, self.resize)
    return decode_random_resized_crop(self.paths[i], self.size, item_rng(k0, k1, column), self.scale, self.ratio)


def decode_random_resized_crop(path: str, size: int, rng: np.random.Generator,
                               scale: Sequence[float] = (0.08, 1.0),
                               ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """uint8 [size, size, 3]: image `path` decoded to RGB, one RandomResizedCrop box drawn from `rng`, resized."""
  from PIL import Image
  try:
    with paths_lib.open_file(path, 'rb') as f, Image.open(f) as img:
      img = img.convert('RGB')
      box = random_resized_crop_box(rng, img.width, img.height, scale, ratio)
      return resized_crop(img, box, size)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for damaged files
    raise DataError(f'Cannot decode image {path}: {type(e).__name__}: {e}. Replace or delete the file '
                    f'(and its line in the split list, if any).') from e
