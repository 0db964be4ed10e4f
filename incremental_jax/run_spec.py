"""What is fixed for a run: its data (loaded once, labels remapped to class-order positions), scenario, method
with its networks, augmentation and inference functions, and the images placed on the device (`RunSpec`); and the
initial `RunState` of a new run."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Optional

import numpy as np

from incremental_jax import evaluate as eval_lib
from incremental_jax import memory as memory_lib
from incremental_jax import validate
from incremental_jax.data import augment, pipeline, scenario as scenario_lib, sources
from incremental_jax.methods import Method, build_method
from incremental_jax.run_state import RunState
from incremental_jax.step import init_train_state, make_optimizer


@dataclasses.dataclass(frozen=True)
class RunData:
  """The data of a run with labels remapped to class-order positions."""
  dataset: sources.Dataset
  scenario: scenario_lib.Scenario
  train_labels: np.ndarray
  test_labels: np.ndarray


def prepare_data(config, dataset: Optional[sources.Dataset] = None) -> RunData:
  dataset = sources.load_dataset(config.data) if dataset is None else dataset
  scenario = scenario_lib.make_scenario(dataset.num_classes, config.data)
  return RunData(dataset, scenario, scenario.remap(dataset.train_labels), scenario.remap(dataset.test_labels))


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """What is fixed for one run. `config_dict` is the config as JSON (checkpoint metadata, results)."""
  config: Any
  workdir: str
  data: RunData
  method: Method
  augment_fn: Callable
  predict: Callable
  embed: Callable
  mesh: Any
  config_dict: dict
  train_images: Any = None   # the dataset's splits, as `pipeline.DeviceImages` when kept on the device
  test_images: Any = None

  @property
  def scenario(self) -> scenario_lib.Scenario:
    return self.data.scenario

  @property
  def model(self):
    return self.method.model


def make_embed_fn(predict, images):
  """`embed(params, batch_stats, indices, flip=False)`: embeddings of train images by index."""
  def embed(params, batch_stats, indices, flip=False):
    return predict(params, batch_stats, eval_lib.take(images, np.asarray(indices)), flip=flip)['embedding']
  return embed


def load_images(config, mesh) -> tuple:
  """(dataset, train_images, test_images): the data set of `config` and its splits placed by `data.on_device`
  (`pipeline.place_dataset`: one budget and one device copy for both). The runs of a group share them: they
  differ in seed and class order only (`runs.run_configs`), their images do not."""
  ds = sources.load_dataset(config.data)
  return (ds, *pipeline.place_dataset([ds.train_images, ds.test_images], mesh, config.data.on_device))


def build_run_spec(config, workdir: str, mesh, images: Optional[tuple] = None) -> RunSpec:
  """Loads the data of `config` (checked field by field by `validate.validate_config`), checks it against the
  data set and scenario, and builds the method with its networks: everything a run needs that never changes
  while it trains. `images`: `load_images(config, mesh)`, shared with other runs (default: loaded here)."""
  ds, train_images, test_images = load_images(config, mesh) if images is None else images
  data = prepare_data(config, ds)
  validate.validate_against_data(config, ds, data.scenario)
  method = build_method(config, data.scenario.num_classes, ds.image_shape)
  augment_fn = augment.make_augment_fn(config.data.augment, ds.mean, ds.std)
  preprocess = lambda images: augment.normalize(images, ds.mean, ds.std)
  predict = eval_lib.make_predict_fn(method.model, mesh, preprocess, int(config.eval.batch_size))
  return RunSpec(config=config, workdir=workdir, data=data, method=method, augment_fn=augment_fn, predict=predict,
                 embed=make_embed_fn(predict, train_images), mesh=mesh,
                 config_dict=json.loads(config.to_json_best_effort()), train_images=train_images,
                 test_images=test_images)


def initial_state(spec: RunSpec) -> RunState:
  """The state of a new run: the model's initial variables, no teacher, an empty memory, no task done."""
  train = init_train_state(spec.model, spec.mesh, make_optimizer(spec.config.optim))
  return RunState(train=train, frozen=None, method_state={}, memory=memory_lib.Memory())
