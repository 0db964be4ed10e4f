"""Finetune baseline (lower bound: new data only, no memory).

Presets: digits (embedded), cifar100_b50_s10 (default) and the other shared protocols."""
import ml_collections

from incremental_jax import config as cfglib


def get_config(arg=None):
  c = cfglib.base_config()
  c.method = cfglib.method_section('finetune')
  return cfglib.apply_preset(c, arg, cfglib.COMMON_PRESETS, default='cifar100_b50_s10')
