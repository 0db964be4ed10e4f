"""Config of the example method `cosine_lwf` (examples/custom_method/cosine_lwf.py):

    python main.py --config=examples/custom_method/config.py:digits --workdir=runs/cosine_lwf_digits

Presets: the shared ones (digits, test, cifar100_b50_s10 the default, ...). The method's own fields are declared
here, once, with their defaults, so each can be set on the command line (`--config.method.kd_weight=1`).
"""
import ml_collections

from examples.custom_method import cosine_lwf  # noqa: F401  (registers the method 'cosine_lwf')
from incremental_jax import config as cfglib


def get_config(arg=None):
  c = cfglib.base_config()
  c.method = cfglib.method_section('cosine_lwf', kd_temperature=2.0, kd_weight=3.0)
  c.model.head = 'cosine'
  c.model.head_kwargs = ml_collections.ConfigDict({'learn_sigma': True, 'sigma_init': 1.0})
  return cfglib.apply_preset(c, arg, cfglib.COMMON_PRESETS, default='cifar100_b50_s10')
