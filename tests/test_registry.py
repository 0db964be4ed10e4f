"""The name tables: one `Registry` type, one error type (`UnknownName`), and validate's messages from the lookups."""
import importlib

import jax.numpy as jnp
import numpy as np
import pytest

from incremental_jax import config as cfglib
from incremental_jax import evaluate, memory, step, validate
from incremental_jax.data import pipeline, sources
from incremental_jax.errors import ConfigError, UnknownName
from incremental_jax.losses.auxiliary import AUX_LOSSES, parse_aux_losses
from incremental_jax.methods import METHODS
from incremental_jax.models import BACKBONES, COMPUTE_DTYPES, HEADS
from incremental_jax.models.conv import LOWERINGS
from incremental_jax.registry import Registry


def test_lookup_names_the_field_the_value_the_valid_names_and_the_close_matches():
  table = Registry('a colour', {'red': 1, 'green': 2, 'greed': 3})
  assert table.lookup('green', 'paint.colour') == 2
  with pytest.raises(UnknownName) as e:
    table.lookup('gren', 'paint.colour')
  assert str(e.value) == ("paint.colour='gren' is not a colour; valid names: ['greed', 'green', 'red']. "
                          "Did you mean 'green' or 'greed'?")
  assert isinstance(e.value, ConfigError)                 # main.py prints it as one line, exit code 2
  with pytest.raises(UnknownName, match=r"^paint.colour='blue' is not a colour; valid names: \[.*\]\.$"):
    table.lookup('blue', 'paint.colour')                 # nothing close: no suggestion
  with pytest.raises(UnknownName, match="paint.colour=None"):
    table.lookup(None, 'paint.colour')                   # not a string: still the one error type


def test_registration_refuses_a_taken_name_and_the_table_is_read_only():
  table = Registry('a colour', {'red': 1})

  @table.register('blue')
  def blue():
    return 'blue'

  assert table['blue'] is blue and list(table) == ['red', 'blue'] and len(table) == 2
  assert table.register('blue', blue) is blue             # the same value again: a no-op
  with pytest.raises(ValueError, match="'blue' is already registered as a colour"):
    table.register('blue', lambda: 'other')
  assert table['blue'] is blue
  assert table.register('blue', 4, replace=True) == 4 and table['blue'] == 4
  with pytest.raises(ValueError, match='non-empty string'):
    table.register('', 5)
  with pytest.raises(TypeError):
    table['green'] = 5                                    # pylint: disable=unsupported-assignment-operation
  wider = table.with_entries(green=5)
  assert wider['green'] == 5 and 'green' not in table and wider.kind == table.kind


def test_every_name_table_is_a_registry():
  tables = [METHODS, BACKBONES, HEADS, COMPUTE_DTYPES, LOWERINGS, sources.SOURCES, pipeline.SAMPLERS, AUX_LOSSES,
            evaluate.VIEWS, memory.SELECTIONS, step.SCHEDULES, cfglib.COMMON_PRESETS]
  tables += [importlib.import_module(f'incremental_jax.configs.{name}').PRESETS
             for name in ('bake', 'iekd', 'lucir', 'm2kd', 'podnet', 'train')]
  assert all(isinstance(t, Registry) for t in tables)
  checked = [*validate.named_fields().values(), *validate.named_key_fields().values()]
  assert all(any(t is u for u in tables) for t in checked) and len(checked) == 10   # validate reads the tables


def _config():
  return cfglib.test_preset(cfglib.base_config())


def test_a_misspelt_backbone_is_one_line_with_a_suggestion():
  c = _config()
  c.model.backbone = 'resnt'
  with pytest.raises(UnknownName) as e:
    validate.validate_config(c)
  assert str(e.value) == ("model.backbone='resnt' is not a backbone; valid names: ['cifar_resnet', 'rebuffi', "
                          "'resnet']. Did you mean 'resnet'?")


@pytest.mark.parametrize('field', sorted(validate.named_fields()))
def test_validate_gives_the_lookup_message_of_every_named_field(field):
  c = _config()
  section, name = field.split('.')
  table = validate.named_fields()[field]
  typo = next(iter(table)) + 'x'                          # one letter more than a valid name
  c[section][name] = typo
  with pytest.raises(UnknownName) as e:
    validate.validate_config(c)
  with pytest.raises(UnknownName) as direct:
    table.lookup(typo, field)
  assert str(e.value) == str(direct.value) and f'Did you mean {next(iter(table))!r}' in str(e.value)
  assert str(e.value).startswith(f'{field}={typo!r} is not ') and '\n' not in str(e.value)


def test_aux_losses_presets_samplers_schedules_and_selections_look_up_their_tables():
  c = _config()
  c.method.aux_losses = {'bakee': {}}
  with pytest.raises(UnknownName, match=r"method.aux_losses='bakee' .*Did you mean 'bake'\?"):
    validate.validate_config(c)
  with pytest.raises(UnknownName, match=r"method.aux_losses='bakee' .*Did you mean 'bake'\?"):
    parse_aux_losses({'bakee': {}})
  lucir = importlib.import_module('incremental_jax.configs.lucir')
  with pytest.raises(UnknownName, match=r"^preset='digts' is not a preset; .*Did you mean 'digits'\?$"):
    lucir.get_config('digts')
  with pytest.raises(UnknownName, match=r"data.sampler='shufle' .*Did you mean 'shuffle'\?"):
    pipeline.get_sampler('shufle')
  with pytest.raises(UnknownName, match=r"memory.selection='hearding' .*Did you mean 'herding'"):
    memory.select_exemplars(np.ones((3, 2)), 2, 'hearding')
  optim = cfglib.base_config().optim
  optim.schedule = 'cosin'
  task = step.TaskInfo(index=jnp.int32(0), old=jnp.zeros(4), new=jnp.ones(4), seen=jnp.ones(4),
                       trainable=jnp.ones(4), lr=jnp.float32(0.1), epochs=jnp.float32(10),
                       steps_per_epoch=jnp.float32(4), seed=jnp.int32(0))
  with pytest.raises(UnknownName, match=r"optim.schedule='cosin' .*Did you mean 'cosine'\?"):
    step.learning_rate(optim, task, jnp.int32(0))
