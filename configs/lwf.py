"""LwF (Li & Hoiem, ECCV 2016), class-incremental: CE on new classes + KD (T=2, weight 3, as PyCIL) on old ones.

Presets: digits (embedded), cifar100_b50_s10 (default) and the other shared protocols."""
import ml_collections

from incremental_jax import config as cfglib


def get_config(arg=None):
  c = cfglib.base_config()
  c.method = cfglib.method_section('lwf', kd_temperature=2.0, kd_weight=3.0)
  return cfglib.apply_preset(c, arg, cfglib.COMMON_PRESETS, default='cifar100_b50_s10')
