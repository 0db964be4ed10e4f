"""Exemplar memory: iCaRL herding selection, fixed-per-class or fixed-total budgets, and nearest-mean-of-
exemplars (NME) classification (Rebuffi et al., "iCaRL", CVPR 2017, Algorithms 1, 4 and 5).

Two herding variants (`memory.selection`): 'herding' is Alg. 4 as written and as PyCIL runs it (greedy, no
repeats); 'herding_loop' is the fixed-iteration loop of LUCIR's and PODNet's code (`herding_loop_order`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from incremental_jax import faults, parallel
from incremental_jax.errors import ConfigError  # noqa: F401  (raised by SELECTIONS.lookup, as UnknownName)
from incremental_jax.registry import Registry

HERDING_LOOP_ITERATIONS = 1000   # the iteration cap of the LUCIR / PODNet loop


def l2_normalize_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def herding_order(features: np.ndarray, m: int) -> np.ndarray:
  """iCaRL herding (Alg. 4): indices of `m` rows of `features` [n, D], chosen greedily so that the running mean
  of the chosen L2-normalised features stays closest to the class mean,

      p_k = argmin_x || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||,   mu = mean_x phi(x),

  without repetition. The returned order is the priority order: a budget cut keeps a prefix.
  """
  phi = l2_normalize_rows(features)
  n = len(phi)
  m = min(int(m), n)
  mu = phi.mean(axis=0)
  chosen = np.zeros(n, bool)
  running = np.zeros_like(mu)
  order = []
  for k in range(1, m + 1):
    dist = np.linalg.norm(mu[None] - (running[None] + phi) / k, axis=1)
    dist[chosen] = np.inf
    i = int(np.argmin(dist))
    order.append(i)
    chosen[i] = True
    running += phi[i]
  return np.asarray(order, np.int64)


def herding_loop_order(features: np.ndarray, m: int, max_iterations: int = HERDING_LOOP_ITERATIONS) -> np.ndarray:
  """Herding as LUCIR's and PODNet's code run it (hshustc/CVPR19_Incremental_Learning,
  `cifar100-class-incremental/class_incremental_cosine_cifar100.py`; arthurdouillard/incremental_learning.pytorch,
  `inclearn/lib/herding.py::icarl_selection`): with phi the L2-normalised rows of `features` [n, D] and mu their
  mean, start from w = mu and repeat at most `max_iterations` times, until min(m, n) distinct rows are picked:

      i = argmax_x <w, phi(x)>;  record i if it was not picked before (else record nothing);  w += mu - phi(i).

  `w` is updated on every iteration, repeated pick or not, so the order can differ from the greedy `herding_order`
  and fewer than m rows are returned when the cap is reached first (LUCIR keeps only the picked rows; PODNet's
  code would fill the rest with unpicked rows in index order). Returns the picked rows in pick order."""
  phi = l2_normalize_rows(features)
  m = min(int(m), len(phi))
  mu = phi.mean(axis=0)
  w = mu.copy()
  picked: list[int] = []
  seen = np.zeros(len(phi), bool)
  for _ in range(int(max_iterations)):
    if len(picked) >= m:
      break
    i = int(np.argmax(phi @ w))
    if not seen[i]:
      seen[i] = True
      picked.append(i)
    w = w + mu - phi[i]
  return np.asarray(picked, np.int64)


def per_class_budget(memory_cfg, num_seen_classes: int) -> int:
  """Exemplars per class: `memory.total // seen classes` when a fixed total is set, else `memory.per_class`."""
  total = int(memory_cfg.total or 0)
  if total > 0:
    return total // num_seen_classes
  return int(memory_cfg.per_class)


@dataclasses.dataclass(frozen=True)
class Memory:
  """Exemplars per (remapped) class, as indices into the train split in priority (herding) order. A value: its
  methods return new memories."""
  exemplars: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

  def indices(self) -> np.ndarray:
    if not self.exemplars:
      return np.zeros((0,), np.int64)
    return np.concatenate([self.exemplars[c] for c in sorted(self.exemplars)]).astype(np.int64)

  def __len__(self) -> int:
    return sum(len(v) for v in self.exemplars.values())

  def classes(self) -> list[int]:
    return sorted(self.exemplars)

  def reduced(self, m: int) -> 'Memory':
    """Keeps the first `m` exemplars of each class (iCaRL Alg. 5, ReduceExemplarSet)."""
    return Memory({c: v[:m] for c, v in self.exemplars.items()})

  def with_class(self, c: int, indices: np.ndarray) -> 'Memory':
    return Memory({**self.exemplars, int(c): np.asarray(indices, np.int64)})

  def to_array(self, num_classes: int) -> np.ndarray:
    """int64 [num_classes, max_per_class] padded with -1 (a checkpointable form)."""
    width = max([1] + [len(v) for v in self.exemplars.values()])
    arr = np.full((num_classes, width), -1, np.int64)
    for c, v in self.exemplars.items():
      arr[c, :len(v)] = v
    return arr

  @classmethod
  def from_array(cls, arr: np.ndarray) -> 'Memory':
    arr = np.asarray(arr)
    return cls({c: arr[c][arr[c] >= 0].astype(np.int64) for c in range(len(arr)) if (arr[c] >= 0).any()})


def random_order(features: np.ndarray, m: int, seed: int = 0) -> np.ndarray:
  """`m` positions of `features` drawn without replacement by a generator seeded with `seed` (the random
  baseline of exemplar selection)."""
  return np.random.default_rng(seed).permutation(len(features))[:m]


# memory.selection -> positions(features, m, seed) of one class's exemplars, in selection order.
SELECTIONS: Registry[Callable[[np.ndarray, int, int], np.ndarray]] = Registry('an exemplar selection', {
    'herding': lambda features, m, seed: herding_order(features, m),
    'herding_loop': lambda features, m, seed: herding_loop_order(features, m),
    'random': random_order,
})


def select_exemplars(features: np.ndarray, m: int, method: str = 'herding', seed: int = 0) -> np.ndarray:
  """Positions (into `features`) of the m exemplars of one class, by `memory.selection` (`SELECTIONS`):
  'herding' (greedy, `herding_order`), 'herding_loop' (LUCIR/PODNet code, `herding_loop_order`) or 'random'."""
  return SELECTIONS.lookup(method, 'memory.selection')(features, m, seed)


def class_means(features: np.ndarray, labels: np.ndarray, num_classes: int,
                flipped_features: np.ndarray | None = None) -> np.ndarray:
  """NME prototypes [num_classes, D]: per class, the normalised mean of the normalised exemplar features,
  averaged with that of their horizontally flipped copies when given (as iCaRL's code). Classes without
  exemplars get a zero row."""
  phi = l2_normalize_rows(features)
  phi_flip = None if flipped_features is None else l2_normalize_rows(flipped_features)
  means = np.zeros((num_classes, phi.shape[1]))
  for c in np.unique(labels):
    sel = labels == c
    mu = phi[sel].mean(0)
    if phi_flip is not None:
      mu = (mu + phi_flip[sel].mean(0)) / 2
    means[c] = mu
  return l2_normalize_rows(means)


def nme_predict(features: np.ndarray, means: np.ndarray, class_mask: np.ndarray) -> np.ndarray:
  """Nearest mean of exemplars: argmin_c || phi(x)/||phi(x)|| - mu_c || over classes with class_mask > 0."""
  phi = l2_normalize_rows(features)
  d2 = (phi**2).sum(1, keepdims=True) - 2 * phi @ means.T + (means**2).sum(1)[None]
  d2 = np.where(np.asarray(class_mask)[None] > 0, d2, np.inf)
  return np.argmin(d2, axis=1)


def update_memory(memory: Memory, embed: Callable[[np.ndarray], np.ndarray], train_labels: np.ndarray,
                  new_indices: np.ndarray, classes: range, memory_cfg, seed: int, where: str = '') -> Memory:
  """iCaRL's memory update after a task whose new classes are `classes` (Alg. 5 then Alg. 4): the old classes
  shrink to the new per-class budget, then each new class's exemplars are selected from the embeddings
  `embed(indices)` of its train examples (`new_indices`, every new class's examples: embedded in one inference
  pass, not one per class). The exemplar indices are process 0's on every process ('herding' decision)."""
  m = per_class_budget(memory_cfg, classes.stop)
  memory = memory.reduced(m)
  new_feats = embed(new_indices)
  for c in classes:
    faults.reached('exemplar_selection')
    of_c = train_labels[new_indices] == c
    pos = select_exemplars(new_feats[of_c], m, memory_cfg.selection, seed=seed + c)
    memory = memory.with_class(c, new_indices[of_c][pos])
  return Memory.from_array(parallel.broadcast_decision(memory.to_array(classes.stop), 'herding', where))


def exemplar_class_means(memory: Memory, embed: Callable[..., np.ndarray], train_labels: np.ndarray,
                         num_classes: int, memory_cfg) -> np.ndarray:
  """NME class means of the exemplars (`class_means`), averaged with their second view `memory.nme_view` when
  `memory.nme_flip`; `embed(indices, flip)` gives train embeddings."""
  idx = memory.indices()
  flipped = embed(idx, memory_cfg.nme_view) if memory_cfg.nme_flip else None
  return class_means(embed(idx, False), train_labels[idx], num_classes, flipped)
