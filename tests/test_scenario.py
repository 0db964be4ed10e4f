import numpy as np
import pytest
from ml_collections import ConfigDict

from incremental_jax.data import scenario as S


def test_seeded_order_is_the_icarl_protocol():
  np.random.seed(1993)
  expected = np.random.permutation(100)
  np.testing.assert_array_equal(S.class_order(100, (), 1993), expected)
  assert S.class_order(100, (), 1993)[:5].tolist() == [68, 56, 78, 8, 23]  # the published CIFAR-100 order


def test_b50_and_b0_splits():
  assert S.task_sizes(100, 50, 10) == [50] + [10] * 5
  assert S.task_sizes(100, 50, 1) == [50] + [1] * 50
  assert S.task_sizes(100, 0, 10) == [10] * 10
  assert S.task_sizes(10, 0, 0) == [10]


def test_bad_increment_is_a_clear_error():
  with pytest.raises(S.ScenarioError, match='not a multiple of 7'):
    S.task_sizes(100, 50, 7)
  with pytest.raises(S.ScenarioError, match='exceeds'):
    S.task_sizes(10, 20, 2)


def test_class_order_must_be_a_permutation():
  with pytest.raises(S.ScenarioError, match='permutation'):
    S.class_order(4, (0, 1, 1, 3))
  with pytest.raises(S.ScenarioError, match='permutation'):
    S.class_order(4, (0, 1, 2))


def test_remap_masks_and_task_indices():
  sc = S.make_scenario(6, ConfigDict({'class_order': (3, 5, 0, 1, 4, 2), 'class_order_seed': 1993, 'initial_classes': 2, 'increment': 2, 'named_order': ''}))
  labels = np.array([3, 5, 0, 1, 4, 2, 3])
  remapped = sc.remap(labels)
  assert remapped.tolist() == [0, 1, 2, 3, 4, 5, 0]
  masks = sc.class_masks(1)
  assert masks['old'].tolist() == [1, 1, 0, 0, 0, 0]
  assert masks['new'].tolist() == [0, 0, 1, 1, 0, 0]
  assert masks['seen'].tolist() == [1, 1, 1, 1, 0, 0]
  assert sc.indices_of_classes(remapped, 2, 4).tolist() == [2, 3]
  assert sc.task_of_class().tolist() == [0, 0, 1, 1, 2, 2]


def test_podnet_official_orders_are_permutations_with_the_published_first_entries():
  from incremental_jax.data import class_orders as O
  firsts = [(87, 0, 52, 58), (58, 30, 93, 69), (71, 54, 45, 32)]  # options/data/cifar100_3orders.yaml
  for k, first in enumerate(firsts):
    order = O.named_order(f'podnet_cifar100:{k}', 100)
    assert sorted(order.tolist()) == list(range(100)) and tuple(order[:4].tolist()) == first
    assert order[-1] == (39, 61, 11)[k]
  imnet = O.named_order('podnet_imagenet100', 100)
  assert sorted(imnet.tolist()) == list(range(100)) and imnet[:4].tolist() == [68, 56, 78, 8]
  np.testing.assert_array_equal(imnet, S.class_order(100, (), 1993))  # PODNet's ImageNet-100 order is seed 1993's
  assert len({tuple(o) for o in O.PODNET_CIFAR100}) == 3
  sc = S.make_scenario(100, ConfigDict({'class_order': (), 'class_order_seed': 1993, 'initial_classes': 50,
                                        'increment': 10, 'named_order': 'podnet_cifar100:1'}))
  assert sc.order[:4].tolist() == [58, 30, 93, 69]
  assert [O.run_named_order('podnet_cifar100:0', k) for k in range(3)] == [f'podnet_cifar100:{k}' for k in range(3)]
  for bad in ('podnet:0', 'podnet_cifar100:3', 'podnet_cifar100:x'):
    with pytest.raises(O.ConfigError, match='data.named_order'):
      O.named_order(bad, 100)
  with pytest.raises(O.ConfigError, match='num_runs'):
    O.run_named_order('podnet_cifar100:1', 2)
  with pytest.raises(O.ConfigError, match='100 classes'):
    O.named_order('podnet_cifar100:0', 10)
