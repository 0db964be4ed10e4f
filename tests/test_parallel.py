"""Data parallelism: 8 simulated CPU devices give the same loss and updated parameters as 1 device."""
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np
    from ml_collections import ConfigDict
    from incremental_jax import config as cfglib, parallel, train
    from incremental_jax.data import augment
    from incremental_jax.methods.base import Phase, snapshot
    from incremental_jax.methods.baselines import ICaRL
    from incremental_jax.models import build_model
    assert jax.device_count() == 8, jax.devices()

    config = cfglib.test_preset(cfglib.base_config())
    config.method = cfglib.method_section('icarl', loss='ce_kd', kd_temperature=2.0, kd_weight=1.0)
    method = ICaRL(config, 6, (8, 8, 1))
    model = method.model
    optim = config.optim
    optim.update(dict(lr=0.1, momentum=0.9, weight_decay=5e-4, schedule='constant', epochs=1, batch_size=16))
    phase = Phase('train', method.loss, np.arange(16), optim)
    aug = augment.make_augment_fn(config.data.augment, (0.5,), (0.25,))   # random crop on device
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 255, (16, 8, 8, 1)).astype(np.uint8), 'label': rng.integers(0, 6, 16).astype(np.int32)}
    task = train.make_task_info(type('S', (), {'class_masks': lambda self, t: {
        'old': np.array([1, 1, 1, 0, 0, 0], np.float32), 'new': np.array([0, 0, 0, 1, 1, 1], np.float32),
        'seen': np.ones(6, np.float32)}})(), 1, np.ones(6))
    task = task.replace(lr=jnp.float32(0.1), epochs=jnp.float32(1), steps_per_epoch=jnp.float32(2))

    def run(devices):
      mesh = parallel.make_mesh(devices)
      state = train.init_train_state(model, mesh, train.make_optimizer(optim))
      # a teacher that differs from the student, so the KD term is non-trivial
      teacher = parallel.replicate(jax.tree.map(lambda x: x * 1.1, snapshot(state)), mesh)
      step = jax.jit(train.make_train_step(model, method, phase, aug, has_teacher=True),
                     out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)))
      losses = []
      for _ in range(2):
        b = parallel.shard_batch(batch, mesh, 16)
        assert len(b['image'].sharding.device_set) == len(devices)
        state, metrics = step(state, teacher, parallel.replicate(task, mesh), b)
        losses.append(float(metrics['loss']))
      return losses, jax.device_get(state)

    l1, s1 = run(jax.devices()[:1])
    l8, s8 = run(jax.devices())
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), s1, s8))
    scale = max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(s1.params))
    moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                             s1.params, jax.device_get(train.init_train_state(model, parallel.make_mesh(jax.devices()[:1]), train.make_optimizer(optim)).params))))
    print(json.dumps({'loss1': l1, 'loss8': l8, 'max_diff': max(diffs), 'scale': scale, 'moved': moved}))
''')


def test_eight_devices_match_one_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
             PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  out = subprocess.run([sys.executable, '-c', SCRIPT], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r['moved'] > 1e-3  # the two steps really changed the parameters
  assert r['loss1'][0] > 0 and abs(r['loss1'][1] - r['loss1'][0]) > 1e-6
  for a, b in zip(r['loss1'], r['loss8']):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), r
  assert r['max_diff'] <= 1e-5 * max(1.0, r['scale']), r
