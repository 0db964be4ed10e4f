"""Auxiliary loss terms that any method adds to its loss through config, e.g. BAKE on top of iCaRL or LUCIR:

    config.method.aux_losses = {'bake': {'weight': 1.0, 'temperature': 4.0, 'omega': 0.5}}

Each entry names a term of `AUX_LOSSES`; `weight` (default 1) multiplies it and the other fields are passed to
it as keyword arguments. A term has the signature of a method loss, `term(outputs, batch, task, teacher, params,
**kwargs) -> scalar`, and is traced inside the train step. `methods.base.Method` adds the named terms to its
`loss` (see `with_aux_losses`), so no method and no part of the train loop knows any term by name.
"""
from __future__ import annotations

from typing import Callable

from incremental_jax.losses import bake, m2kd
from incremental_jax.registry import Registry

AUX_LOSSES: Registry[Callable] = Registry('an auxiliary loss', {
    'bake': bake.bake_term,
    'feature_kd': m2kd.feature_kd_term,
})


def parse_aux_losses(aux_cfg) -> list[tuple[str, float, dict]]:
  """(name, weight, kwargs) of each term in an `aux_losses` config section (None or empty: no terms). An unknown
  name raises `UnknownName` (a ConfigError) that lists the valid ones."""
  terms = []
  for name, spec in sorted(dict(aux_cfg or {}).items()):
    AUX_LOSSES.lookup(name, 'method.aux_losses')
    kwargs = dict(spec or {})
    weight = float(kwargs.pop('weight', 1.0))
    terms.append((name, weight, kwargs))
  return terms


def with_aux_losses(loss_fn: Callable, aux_cfg) -> Callable:
  """`loss_fn` plus the weighted terms of `aux_cfg`: total = loss + sum_k weight_k * term_k, with each term's
  unweighted value reported as metric `aux_<name>`. Returns `loss_fn` itself when no term is named."""
  terms = parse_aux_losses(aux_cfg)
  if not terms:
    return loss_fn

  def loss_with_aux(outputs, batch, task, teacher, params):
    loss, metrics = loss_fn(outputs, batch, task, teacher, params)
    metrics = dict(metrics)
    for name, weight, kwargs in terms:
      value = AUX_LOSSES[name](outputs, batch, task, teacher, params, **kwargs)
      loss = loss + weight * value
      metrics[f'aux_{name}'] = value
    return loss, metrics

  return loss_with_aux
