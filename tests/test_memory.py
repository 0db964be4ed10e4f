import numpy as np
import pytest
from ml_collections import ConfigDict

from incremental_jax import memory as M


def _herding_reference(x, m):
  """Straight transcription of iCaRL Alg. 4 on L2-normalised features."""
  phi = x / np.linalg.norm(x, axis=1, keepdims=True)
  mu = phi.mean(0)
  chosen = []
  for k in range(1, m + 1):
    best, best_d = None, np.inf
    for i in range(len(phi)):
      if i in chosen:
        continue
      d = np.linalg.norm(mu - (phi[i] + sum(phi[j] for j in chosen)) / k) if chosen else np.linalg.norm(mu - phi[i])
      if d < best_d:
        best, best_d = i, d
    chosen.append(best)
  return chosen


def test_herding_hand_made_set():
  # Unit vectors at 0, 90, 180, 270 and 45 degrees; mu = (0.1414, 0.1414).
  # k=1: the 45-degree point is nearest to mu.
  # k=2: (p45 + x)/2 for x = 180 or 270 degrees both lie 0.357 from mu (tie; argmin keeps index 2).
  # k=3: running sum (-0.293, 0.707); adding 0 degrees gives (0.236, 0.236), 0.133 from mu, while 270 degrees
  #      gives (-0.098, -0.098), 0.338 away, and 90 degrees is further still.
  angles = np.deg2rad([0, 90, 180, 270, 45])
  x = np.stack([np.cos(angles), np.sin(angles)], 1)
  order = M.herding_order(x, 3)
  assert order[0] == 4
  assert order[1] == 2  # 180 degrees: ties with 270, the lower index wins
  assert order[2] == 0
  assert order.tolist() == _herding_reference(x, 3)


def test_herding_matches_reference_and_has_no_repeats():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 6)) + 2.0
  order = M.herding_order(x, 15)
  assert order.tolist() == _herding_reference(x, 15)
  assert len(set(order.tolist())) == 15
  assert len(M.herding_order(x, 100)) == 40  # never more than available


def test_herding_mean_is_closer_than_random():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 8)) * np.linspace(0.2, 3, 8) + 1.0
  phi = x / np.linalg.norm(x, axis=1, keepdims=True)
  mu = phi.mean(0)
  herd = np.linalg.norm(phi[M.herding_order(x, 10)].mean(0) - mu)
  rand = np.mean([np.linalg.norm(phi[rng.permutation(200)[:10]].mean(0) - mu) for _ in range(50)])
  assert herd < 0.5 * rand


def test_nme_equals_numpy_nearest_mean():
  rng = np.random.default_rng(2)
  feats = rng.normal(size=(30, 5))
  labels = np.repeat(np.arange(3), 10)
  means = M.class_means(feats, labels, num_classes=4)
  # reference: normalised mean of normalised features; class 3 has no exemplars
  phi = feats / np.linalg.norm(feats, axis=1, keepdims=True)
  ref = np.stack([phi[labels == c].mean(0) for c in range(3)])
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  np.testing.assert_allclose(means[:3], ref, rtol=1e-6)
  assert np.all(means[3] == 0)
  queries = rng.normal(size=(50, 5))
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  expected = np.argmin(((q[:, None] - ref[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(M.nme_predict(queries, means, np.array([1, 1, 1, 0])), expected)


def test_class_means_average_flipped_copies():
  feats = np.array([[1.0, 0.0], [1.0, 0.0]])
  flipped = np.array([[0.0, 1.0], [0.0, 1.0]])
  means = M.class_means(feats, np.array([0, 0]), 1, flipped)
  np.testing.assert_allclose(means[0], [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)


def test_memory_reduce_roundtrip_and_budget():
  mem = M.Memory().with_class(0, np.array([5, 3, 9])).with_class(2, np.array([7, 1]))
  assert mem.indices().tolist() == [5, 3, 9, 7, 1]
  assert mem.reduced(1).exemplars[0].tolist() == [5] and len(mem.reduced(1)) == 2
  back = M.Memory.from_array(mem.to_array(4))
  assert {c: v.tolist() for c, v in back.exemplars.items()} == {0: [5, 3, 9], 2: [7, 1]}
  assert M.per_class_budget(ConfigDict({'per_class': 20, 'total': 0}), 50) == 20
  assert M.per_class_budget(ConfigDict({'per_class': 20, 'total': 2000}), 60) == 33
  with pytest.raises(ValueError, match='selection'):
    M.select_exemplars(np.ones((3, 2)), 2, 'closest')


def test_herding_loop_reproduces_a_hand_worked_example_with_a_repeated_pick():
  # Unit rows a=(1,0), b=(0.8,0.6), c=(-1,0), d=(0,-1): mu = (0.2, -0.1). The official loop (w starts at mu):
  #   w=( 0.2,-0.1): <w,.> = ( .2, .1, -.2, .1) -> a (0), recorded;  w += mu - a -> (-0.6,-0.2)
  #   w=(-0.6,-0.2): <w,.> = (-.6,-.6,  .6, .2) -> c (2), recorded;  w += mu - c -> ( 0.6,-0.3)
  #   w=( 0.6,-0.3): <w,.> = ( .6, .3, -.6, .3) -> a again: nothing recorded, w still moves -> (-0.2,-0.4)
  #   w=(-0.2,-0.4): <w,.> = (-.2,-.4,  .2, .4) -> d (3), recorded: three distinct picks, stop.
  x = np.array([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.0], [0.0, -1.0]])
  assert M.herding_loop_order(x, 3).tolist() == [0, 2, 3]
  assert M.herding_order(x, 3).tolist() == [0, 2, 1]        # the greedy variant (PyCIL) differs here
  assert M.herding_loop_order(x, 3, max_iterations=3).tolist() == [0, 2]  # the cap reached first: fewer rows
  assert M.select_exemplars(x * 7.0, 3, 'herding_loop').tolist() == [0, 2, 3]  # rows are normalised first
  with pytest.raises(M.ConfigError, match='herding_loop'):
    M.select_exemplars(x, 3, 'herding_official')


def test_memory_update_embeds_the_new_classes_once_and_herds_each_class():
  """`memory.update_memory` embeds every new class in one inference call (not one call per class, each padded to
  eval.batch_size) and still picks, per class, the exemplars herding picks from that class's embeddings alone."""
  from incremental_jax import config as cfglib
  from incremental_jax.data.scenario import Scenario

  rng = np.random.default_rng(0)
  labels = rng.permutation(np.repeat(np.arange(6), 7)).astype(np.int32)   # classes interleaved in the split
  table = rng.normal(size=(len(labels), 5))
  calls = []

  def embed(params, stats, indices, flip=False):
    calls.append(np.asarray(indices))
    return table[np.asarray(indices)]

  config = cfglib.base_config()
  config.memory.per_class = 3
  old = M.Memory({0: np.array([1, 2, 3, 4]), 1: np.array([5, 6, 7, 8])})
  scenario = Scenario(np.arange(6), (2, 4))
  memory = M.update_memory(old, lambda idx: embed(None, None, idx), labels,
                           scenario.indices_of_classes(labels, 2, 6), range(2, 6), config.memory, config.seed)
  assert len(calls) == 1 and sorted(calls[0]) == sorted(np.flatnonzero(labels >= 2))
  np.testing.assert_array_equal(memory.exemplars[0], [1, 2, 3])   # old classes shrunk to the new budget
  for c in range(2, 6):
    idx = np.flatnonzero(labels == c)
    want = idx[M.select_exemplars(table[idx], 3, 'herding', seed=config.seed + c)]
    np.testing.assert_array_equal(memory.exemplars[c], want)
