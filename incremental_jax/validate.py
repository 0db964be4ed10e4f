"""Checks of a run's config, made before any data is loaded or any step compiled, so that a typo costs
seconds and the message says what to change. A named choice is checked by its table's `Registry.lookup`, so
its message (field, value, valid names, close matches) is the one the code reading the field would give."""
from __future__ import annotations

import math

import jax

from incremental_jax.data import image_folder, pipeline, sources
from incremental_jax.data.augment import BRIGHTNESS_MODES
from incremental_jax.errors import ConfigError
from incremental_jax.evaluate import VIEWS
from incremental_jax.losses.auxiliary import AUX_LOSSES
from incremental_jax.memory import SELECTIONS
from incremental_jax.method_store import require_network
from incremental_jax.methods import METHODS
from incremental_jax.models import BACKBONES, COMPUTE_DTYPES, HEADS
from incremental_jax.step import SCHEDULES


def named_fields() -> dict:
  """{config field: the registry of its valid names}, for every field that names one entry of a table."""
  return {'method.name': METHODS, 'data.name': sources.SOURCES, 'data.sampler': pipeline.SAMPLERS,
          'model.backbone': BACKBONES, 'model.head': HEADS, 'model.dtype': COMPUTE_DTYPES,
          'optim.schedule': SCHEDULES, 'memory.selection': SELECTIONS, 'memory.nme_view': VIEWS}


def named_key_fields() -> dict:
  """{config field: the registry of its valid keys}, for every dict field whose keys name table entries."""
  return {'method.aux_losses': AUX_LOSSES}


def _require(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def _field(config, field: str):
  section, name = field.split('.')
  return config[section][name]


def validate_config(config) -> None:
  """Field-level checks that need no data."""
  for field, table in named_fields().items():
    table.lookup(_field(config, field), field)
  for field, table in named_key_fields().items():
    for name in dict(_field(config, field) or {}):
      table.lookup(name, field)
  _require(pipeline.on_device_setting(config.data.on_device) is not None,
           f"data.on_device={config.data.on_device!r}; valid: 'auto', True, False.")
  _require(int(config.data.chunk_steps or 0) >= 0, f'data.chunk_steps must be >= 0; got {config.data.chunk_steps}.')
  _validate_inputs(config.data)
  optim = config.optim
  _require(int(optim.epochs) >= 1, f'optim.epochs must be >= 1; got {optim.epochs}.')
  offset = optim.schedule_offset
  _require(isinstance(offset, int) and not isinstance(offset, bool) and offset in (-1, 0, 1),
           f'optim.schedule_offset must be -1, 0 or 1 (epoch e trains with the schedule at e + offset); got '
           f'{offset!r}.')
  for name in ('lr', 'first_task_lr'):
    value = float(optim[name] or 0)
    _require(math.isfinite(value) and (value > 0 or (name != 'lr' and value == 0)),
             f'optim.{name} must be a finite number > 0; got {optim[name]}.')
  for name, size in (('optim.batch_size', optim.batch_size), ('eval.batch_size', config.eval.batch_size)):
    _require(int(size) >= 1, f'{name} must be >= 1; got {size}.')
    _require(int(size) % jax.device_count() == 0,
             f'{name}={size} is not divisible by the {jax.device_count()} devices; use a multiple of '
             f'{jax.device_count()}.')
  mem = config.memory
  _require(int(mem.per_class) >= 0, f'memory.per_class must be >= 0; got {mem.per_class}.')
  _require(int(mem.total or 0) >= 0, f'memory.total must be >= 0; got {mem.total}.')
  _require(not (int(mem.per_class) > 0 and int(mem.total or 0) > 0),
           f'memory.per_class={mem.per_class} and memory.total={mem.total} are both set; the budget is one of '
           'them: set the other to 0.')
  for name in ('max_to_keep', 'every_epochs'):
    value = config.checkpoint[name] or 0
    _require(int(value) >= 0, f'checkpoint.{name} must be >= 0; got {value}.')
  if config.method.get('teacher_workdir'):   # local or gs://, read before any data is loaded
    require_network(config.method.teacher_workdir)
  order = tuple(config.data.class_order or ())
  _require(all(float(c) == int(c) for c in order),
           f'data.class_order must hold integer class ids; got {list(order)[:20]}.')


def validate_against_data(config, dataset, scenario) -> None:
  """Checks that need the data set's size (memory budgets)."""
  if not METHODS.lookup(config.method.name, 'method.name').uses_memory:
    return
  total = int(config.memory.total or 0)
  _require(total == 0 or total >= scenario.num_classes,
           f'memory.total={total} is smaller than the {scenario.num_classes} classes: the last task would keep '
           f'no exemplar per class. Use at least {scenario.num_classes} (or memory.per_class).')
  _require(total > 0 or int(config.memory.per_class) >= 1,
           f'{config.method.name} keeps exemplars: set memory.per_class >= 1 or memory.total >= '
           f'{scenario.num_classes}.')


def _validate_inputs(data) -> None:
  """`data.augment.*`, `data.workers`, `data.prefetch` and `data.classes`."""
  aug = data.augment
  _require(aug.brightness_mode in BRIGHTNESS_MODES,
           f'data.augment.brightness_mode={aug.brightness_mode!r}; valid: {list(BRIGHTNESS_MODES)}.')
  _require(math.isfinite(float(aug.brightness)) and float(aug.brightness) >= 0,
           f'data.augment.brightness must be >= 0; got {aug.brightness}.')
  _require(int(data.workers) >= -1, f'data.workers must be -1 (one per core), 0 (in the training process) or a '
           f'number of worker processes; got {data.workers}.')
  _require(int(data.prefetch) >= 1, f'data.prefetch must be >= 1; got {data.prefetch}.')
  scale, ratio = tuple(aug.crop_scale), tuple(aug.crop_ratio)
  _require(len(scale) == 2 and 0 < float(scale[0]) <= float(scale[1]) <= 1,
           f'data.augment.crop_scale must be (low, high) with 0 < low <= high <= 1; got {scale}.')
  _require(len(ratio) == 2 and 0 < float(ratio[0]) <= float(ratio[1]),
           f'data.augment.crop_ratio must be (low, high) with 0 < low <= high; got {ratio}.')
  if aug.random_resized_crop:
    _require(data.name == 'image_folder', f'data.augment.random_resized_crop crops the decoded images of an image '
             f'folder on the host; data.name={data.name!r} holds decoded arrays: use data.augment.crop_padding.')
    _require(int(aug.crop_padding) == 0, f'data.augment.crop_padding={aug.crop_padding} does nothing with '
             f'data.augment.random_resized_crop (the crop is cut on the host): set crop_padding=0.')
  if data.classes:
    _require(data.name == 'image_folder', f'data.classes selects class folders of an image folder; '
             f'data.name={data.name!r} has none.')
    try:
      image_folder.class_list(str(data.classes))
    except sources.DataError as e:
      raise ConfigError(str(e)) from None
