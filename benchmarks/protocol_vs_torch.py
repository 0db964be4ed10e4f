"""The whole iCaRL protocol in incremental_jax against the same protocol written in PyTorch, on the same machine.

What it measures: the wall time, peak RSS and average incremental accuracy (CNN and NME top-1, as results.json's
`avg_incremental_accuracy`) of one complete class-incremental run, (a) by `incremental_jax.train_and_evaluate`
(configs/icarl.py) and (b) by a plain PyTorch implementation of the same protocol written here. PyTorch is not a
dependency of the library and is imported only by this file (`pip install torch==2.13.0`).

The protocol, identical on both sides:
- data: a synthetic 100-class set of 32x32x3 uint8 images with class structure (per class a random colour and a
  coarse 4x4 pattern, plus pixel noise), 15 train and 5 test images per class, made by NumPy from a fixed seed;
  normalised by its train-image channel statistics. The JAX side reads it as the data source 'synthetic100',
  registered at runtime in `incremental_jax.data.sources.SOURCES`;
- scenario: identity class order, 50 base classes then 5 tasks of 10 (`cifar100_b50_s5`);
- network: CIFAR ResNet-32 (3 stages x 5 basic blocks, 16/32/64 channels, option-A zero-padding shortcuts, ReLU
  after the last block), PyTorch initialisation (convolutions kaiming_normal fan_out, `nn.Linear` head), a linear
  head over all 100 classes with the unseen classes masked out of the loss and their weights left untouched;
- loss ('ce_kd'): cross-entropy over the seen classes + KL distillation (T = 2, weight 1) of the previous model's
  old-class logits; random crop (padding 4) and horizontal flip of each uint8 batch;
- SGD (lr 0.1, momentum 0.9, batch 64, last partial batch dropped), weight decay 5e-4 on the first task and 2e-4
  later, `--epochs` per task, multistep lr (x0.1 at 50% and 75% of the epochs, per epoch), a fresh optimiser
  per task;
- memory: 5 exemplars per class chosen by herding (greedy mean matching of normalised embeddings) after each
  task; NME over the class means of the normalised exemplar embeddings (no flipped view); CNN over the seen
  classes' logits; both on the seen classes' test images after every task.

Each side runs in its own subprocess (the script re-invokes itself with `--side=jax|torch`), alternately for
`--repeats` rounds. A child measures itself from the start of its main to its end (imports, data generation,
JAX's compilations and checkpoints, everything) and reports `ru_maxrss`. The JAX side compiles cold unless
JAX_COMPILATION_CACHE_DIR is set; it keeps its checkpoints (in a fresh temporary workdir per run). The PyTorch
side uses all cores (`torch.set_num_threads(os.cpu_count())`, OMP_WAIT_POLICY=PASSIVE). Prints figures; asserts
nothing.

    python benchmarks/protocol_vs_torch.py --epochs=3               # one round, 3 epochs per task
    python benchmarks/protocol_vs_torch.py --epochs=3 --repeats=3   # medians of 3 alternating rounds
    python benchmarks/protocol_vs_torch.py --epochs=3 --repeats=2 --compilation_cache=/tmp/xla_cache  # warm 2nd round
    python benchmarks/protocol_vs_torch.py --side=torch --epochs=1  # one side alone (prints its JSON line)

`--eval_batch` is the inference batch of both sides (the JAX side's `eval.batch_size`, default 256); the JAX side
pads each inference call to it. (Its herding used to embed one class per call, 100 x 256 images to embed 1500,
99 s of a 181 s run at one epoch; it now embeds each task's new classes in one call, as the PyTorch side does.)
`--compilation_cache=DIR` gives the JAX side the persistent compilation cache that `main.py` keeps by default, so
a second round measures a warm start.
"""
import argparse
import importlib.metadata
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_TAG = 'PROTOCOL_RESULT '

NUM_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, IMAGE_SHAPE = 100, 15, 5, (32, 32, 3)
INITIAL, INCREMENT = 50, 10
BATCH, LR, MOMENTUM, GAMMA = 64, 0.1, 0.9, 0.1
FIRST_WEIGHT_DECAY, WEIGHT_DECAY = 5e-4, 2e-4
KD_TEMPERATURE, KD_WEIGHT = 2.0, 1.0
PER_CLASS, CROP_PADDING = 5, 4
SHORTCUT, LAST_RELU = 'pad', True
COLOUR_RANGE, PATTERN_STD, OFFSET_STD, NOISE_STD = 60.0, 40.0, 8.0, 40.0   # the synthetic data (grey levels)


# ------------------------------------------------------------------------------------------ shared protocol
def synthetic_data(seed: int) -> dict:
  """100 classes of 32x32x3 uint8 images: a class colour and a coarse 4x4 colour pattern (8x8-pixel cells), plus
  per image a colour offset (so that the mean colour alone does not tell the classes apart) and pixel noise."""
  rng = np.random.default_rng(seed)
  colour = rng.uniform(128.0 - COLOUR_RANGE, 128.0 + COLOUR_RANGE, (NUM_CLASSES, 1, 1, 3))
  pattern = np.kron(rng.normal(0.0, PATTERN_STD, (NUM_CLASSES, 4, 4, 3)), np.ones((1, 8, 8, 1)))
  means = colour + pattern

  def split(per_class):
    labels = np.repeat(np.arange(NUM_CLASSES), per_class).astype(np.int32)
    offset = rng.normal(0.0, OFFSET_STD, (len(labels), 1, 1, 3))
    noise = rng.normal(0.0, NOISE_STD, (len(labels),) + IMAGE_SHAPE)
    return np.clip(np.round(means[labels] + offset + noise), 0, 255).astype(np.uint8), labels

  train_images, train_labels = split(TRAIN_PER_CLASS)
  test_images, test_labels = split(TEST_PER_CLASS)
  return {'train_images': train_images, 'train_labels': train_labels, 'test_images': test_images,
          'test_labels': test_labels}


def milestones(epochs: int) -> tuple:
  """Multistep milestones at 50% and 75% of the epochs (those inside (0, epochs))."""
  return tuple(sorted({m for m in (int(0.5 * epochs), int(0.75 * epochs)) if 0 < m < epochs}))


def task_ranges() -> list:
  """[(lo, hi)] class ranges of the tasks: B50 then tasks of 10."""
  bounds = list(range(INITIAL, NUM_CLASSES + 1, INCREMENT))
  return [(0, INITIAL)] + list(zip(bounds[:-1], bounds[1:]))


# ------------------------------------------------------------------------------------------------ JAX side
def jax_config(args):
  """configs/icarl.py's cifar100_b50_s5 with this protocol's fields set explicitly (get_config has applied PyCIL's
  CIFAR-100 settings, brightness 63/255 and fixed normalisation constants among them, before data.name changes)."""
  from configs import icarl
  c = icarl.get_config('cifar100_b50_s5')
  c.seed = args.seed
  c.progress, c.plots, c.tensorboard = False, False, False
  c.data.name = 'synthetic100'
  c.data.class_order = tuple(range(NUM_CLASSES))
  c.data.initial_classes, c.data.increment = INITIAL, INCREMENT
  c.data.mean, c.data.std = (), ()   # the source's train-image statistics
  c.data.augment.crop_padding, c.data.augment.flip, c.data.augment.brightness = CROP_PADDING, True, 0.0
  c.model.backbone, c.model.depth, c.model.width, c.model.head = 'cifar_resnet', 32, 16, 'linear'
  c.model.shortcut, c.model.last_relu = SHORTCUT, LAST_RELU
  c.memory.per_class, c.memory.total, c.memory.selection, c.memory.nme_flip = PER_CLASS, 0, 'herding', False
  c.method.loss, c.method.kd_temperature, c.method.kd_weight = 'ce_kd', KD_TEMPERATURE, KD_WEIGHT
  o = c.optim
  o.batch_size, o.lr, o.momentum, o.gamma, o.schedule = BATCH, LR, MOMENTUM, GAMMA, 'multistep'
  o.epochs = o.first_task_epochs = args.epochs
  o.milestones = o.first_task_milestones = milestones(args.epochs)
  o.weight_decay, o.first_task_weight_decay = WEIGHT_DECAY, FIRST_WEIGHT_DECAY
  c.eval.batch_size = args.eval_batch
  return c


def register_source(args) -> None:
  """Registers 'synthetic100' as an incremental_jax data source (made when the run loads its data)."""
  from incremental_jax.data import sources

  def load(cfg):
    del cfg
    d = synthetic_data(args.data_seed)
    mean, std = sources.channel_stats(d['train_images'])
    return sources.Dataset(name='synthetic100', num_classes=NUM_CLASSES, mean=mean, std=std,
                           class_names=[f'class_{c}' for c in range(NUM_CLASSES)],
                           location='synthetic (benchmark)', **d)

  sources.SOURCES.register('synthetic100', load, replace=True)


def run_jax(args) -> dict:
  sys.path.insert(0, ROOT)   # this checkout's incremental_jax and configs/
  import incremental_jax
  import jax
  t0 = time.perf_counter()
  register_source(args)
  config = jax_config(args)
  # the persistent compilation cache: `--compilation_cache`, else none (a cold run; the library's default
  # 'auto' would reuse ~/.cache/incremental_jax/xla from earlier runs)
  config.compilation_cache = args.compilation_cache
  with tempfile.TemporaryDirectory(prefix='protocol_vs_torch_') as workdir:
    results = incremental_jax.train_and_evaluate(config, workdir)
  avg = results['avg_incremental_accuracy']
  return {'version': f'jax {jax.__version__}', 'protocol_s': time.perf_counter() - t0, 'cnn': avg['cnn'],
          'nme': avg['nme'], 'steps_cnn': [s['cnn']['all'] for s in results['steps']],
          'steps_nme': [s['nme']['all'] for s in results['steps']], 'compilations': results['compilations']}


# -------------------------------------------------------------------------------------------- PyTorch side
def torch_resnet32(torch):
  """CIFAR ResNet-32 as models/resnet.py (option-A or 1x1-conv shortcuts) with a linear head over all classes."""
  nn, F = torch.nn, torch.nn.functional

  class Block(nn.Module):
    def __init__(self, cin, cout, stride, relu_out):
      super().__init__()
      self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
      self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
      self.stride, self.pad, self.relu_out = stride, cout - cin, relu_out
      self.down = None
      if SHORTCUT == 'conv' and (stride != 1 or cin != cout):
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def shortcut(self, x):
      if self.down is not None:
        return self.down(x)
      if self.stride == 1 and self.pad == 0:
        return x
      return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.pad))

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y)) + self.shortcut(x)
      return F.relu(y) if self.relu_out else y

  class ResNet32(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv, self.bn = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
      blocks, cin = [], 16
      for s, width in enumerate((16, 32, 64)):
        for b in range(5):
          last = s == 2 and b == 4
          blocks.append(Block(cin, width, 2 if s > 0 and b == 0 else 1, LAST_RELU or not last))
          cin = width
      self.blocks = nn.Sequential(*blocks)
      self.fc = nn.Linear(64, NUM_CLASSES)
      for m in self.modules():
        if isinstance(m, nn.Conv2d):
          nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def features(self, x):
      return self.blocks(F.relu(self.bn(self.conv(x)))).mean((2, 3))

    def forward(self, x):
      return self.fc(self.features(x))

  return ResNet32()


class TorchProtocol:
  """The iCaRL protocol in PyTorch: train a task, update the exemplars by herding, evaluate CNN and NME."""

  def __init__(self, torch, data: dict, seed: int, epochs: int, channels_last: bool, eval_batch: int):
    self.torch, self.F, self.eval_batch = torch, torch.nn.functional, eval_batch
    torch.manual_seed(seed)
    self.epochs, self.fmt = epochs, torch.channels_last if channels_last else torch.contiguous_format
    mean, std = channel_stats(data['train_images'])
    self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    as_nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()
    self.x_train, self.x_test = as_nchw(data['train_images']), as_nchw(data['test_images'])
    self.y_train = torch.from_numpy(data['train_labels']).long()
    self.y_test = torch.from_numpy(data['test_labels']).long()
    self.model = torch_resnet32(torch).to(memory_format=self.fmt)
    self.teacher, self.memory = None, {}
    self.rows = torch.arange(IMAGE_SHAPE[0])

  def normalize(self, x_u8):
    return ((x_u8.float() / 255.0 - self.mean) / self.std).contiguous(memory_format=self.fmt)

  def augment(self, x_u8):
    """Random crop (zero padding 4) and horizontal flip of a uint8 NCHW batch, then normalisation."""
    torch, p = self.torch, CROP_PADDING
    b, c, h, w = x_u8.shape
    x = self.F.pad(x_u8, (p, p, p, p))
    oy, ox = torch.randint(0, 2 * p + 1, (b,)), torch.randint(0, 2 * p + 1, (b,))
    x = torch.gather(x, 2, (oy[:, None] + self.rows[None])[:, None, :, None].expand(b, c, h, w + 2 * p))
    x = torch.gather(x, 3, (ox[:, None] + self.rows[None])[:, None, None, :].expand(b, c, h, w))
    x = torch.where((torch.rand(b) < 0.5)[:, None, None, None], x.flip(3), x)
    return self.normalize(x)

  def infer(self, x_u8):
    """Inference-mode embeddings and logits of uint8 images, in batches of `eval_batch`."""
    self.model.eval()
    feats, logits = [], []
    with self.torch.inference_mode():
      for i in range(0, len(x_u8), self.eval_batch):
        f = self.model.features(self.normalize(x_u8[i:i + self.eval_batch]))
        feats.append(f)
        logits.append(self.model.fc(f))
    return self.torch.cat(feats), self.torch.cat(logits)

  def loss(self, x, y, lo, hi):
    """'ce_kd': CE over the seen classes [0, hi) (slicing the logits = masking the unseen ones) + KD(T) of the
    old classes [0, lo) from the previous model."""
    logits = self.model(x)[:, :hi]
    loss = self.F.cross_entropy(logits, y)
    if self.teacher is not None and lo > 0:
      with self.torch.no_grad():
        old = self.teacher(x)[:, :lo]
      log_p_t = self.F.log_softmax(old / KD_TEMPERATURE, dim=1)
      log_p_s = self.F.log_softmax(logits[:, :lo] / KD_TEMPERATURE, dim=1)
      loss = loss + KD_WEIGHT * (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()
    return loss

  def train_task(self, t: int, lo: int, hi: int) -> None:
    torch = self.torch
    new = torch.nonzero((self.y_train >= lo) & (self.y_train < hi)).flatten()
    idx = torch.cat([new] + [self.memory[c] for c in sorted(self.memory)])
    opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM,
                          weight_decay=FIRST_WEIGHT_DECAY if t == 0 else WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones(self.epochs)), gamma=GAMMA)
    fc = self.model.fc
    unseen_w, unseen_b = fc.weight.detach()[hi:].clone(), fc.bias.detach()[hi:].clone()
    steps = max(1, len(idx) // BATCH)
    self.model.train()
    for _ in range(self.epochs):
      order = idx[torch.randperm(len(idx))][:steps * BATCH].view(steps, BATCH)
      for rows in order:
        loss = self.loss(self.augment(self.x_train[rows]), self.y_train[rows], lo, hi)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():   # unseen classes' weights get no update (weight decay included), as the JAX mask
          fc.weight[hi:] = unseen_w
          fc.bias[hi:] = unseen_b
      sched.step()

  def herding(self, feats, m: int):
    """iCaRL herding (memory.herding_order): greedy, no repeats, over L2-normalised float64 embeddings."""
    torch = self.torch
    phi = self.F.normalize(feats.double(), dim=1)
    mu, running = phi.mean(0), torch.zeros(phi.shape[1], dtype=torch.float64)
    chosen, order = torch.zeros(len(phi), dtype=torch.bool), []
    for k in range(1, min(m, len(phi)) + 1):
      dist = torch.linalg.vector_norm(mu[None] - (running[None] + phi) / k, dim=1)
      dist[chosen] = float('inf')
      i = int(torch.argmin(dist))
      order.append(i)
      chosen[i] = True
      running += phi[i]
    return torch.tensor(order, dtype=torch.long)

  def update_memory(self, lo: int, hi: int) -> None:
    new = self.torch.nonzero((self.y_train >= lo) & (self.y_train < hi)).flatten()
    feats, _ = self.infer(self.x_train[new])
    labels = self.y_train[new]
    for c in range(lo, hi):
      sel = self.torch.nonzero(labels == c).flatten()
      self.memory[c] = new[sel][self.herding(feats[sel], PER_CLASS)]

  def class_means(self, hi: int):
    idx = self.torch.cat([self.memory[c] for c in range(hi)])
    phi = self.F.normalize(self.infer(self.x_train[idx])[0].double(), dim=1)
    labels = self.y_train[idx]
    means = self.torch.stack([phi[labels == c].mean(0) for c in range(hi)])
    return self.F.normalize(means, dim=1)

  def evaluate(self, hi: int) -> tuple:
    """CNN and NME top-1 (percent) on the test images of the seen classes [0, hi)."""
    seen = self.y_test < hi
    y = self.y_test[seen]
    feats, logits = self.infer(self.x_test[seen])
    cnn = (logits[:, :hi].argmax(1) == y).double().mean().item() * 100
    phi = self.F.normalize(feats.double(), dim=1)
    nme_pred = self.torch.cdist(phi, self.class_means(hi)).argmin(1)
    return cnn, (nme_pred == y).double().mean().item() * 100

  def freeze_teacher(self) -> None:
    import copy
    self.teacher = copy.deepcopy(self.model).eval()
    for p in self.teacher.parameters():
      p.requires_grad_(False)

  def run(self) -> dict:
    cnn, nme = [], []
    for t, (lo, hi) in enumerate(task_ranges()):
      self.train_task(t, lo, hi)
      self.update_memory(lo, hi)
      c, n = self.evaluate(hi)
      cnn.append(c)
      nme.append(n)
      self.freeze_teacher()
    return {'cnn': float(np.mean(cnn)), 'nme': float(np.mean(nme)), 'steps_cnn': cnn, 'steps_nme': nme}


def channel_stats(images: np.ndarray) -> tuple:
  """The same per-channel mean and std as incremental_jax.data.sources.channel_stats (not imported here, so the
  PyTorch child loads no JAX)."""
  x = np.asarray(images, np.float64) / 255.0
  return tuple(x.mean(axis=(0, 1, 2)).tolist()), tuple(x.std(axis=(0, 1, 2)).tolist())


def run_torch(args) -> dict:
  import torch
  torch.set_num_threads(os.cpu_count())
  torch.set_flush_denormal(True)   # as XLA:CPU, which flushes denormals to zero
  t0 = time.perf_counter()
  data = synthetic_data(args.data_seed)
  out = TorchProtocol(torch, data, args.seed, args.epochs, args.torch_format == 'channels_last',
                      args.eval_batch).run()
  return {'version': f'torch {torch.__version__}', 'protocol_s': time.perf_counter() - t0, **out}


# ---------------------------------------------------------------------------------------- child and parent
def child(args) -> None:
  """One side's whole protocol; prints one JSON line with its wall time (from here), peak RSS and accuracies."""
  t0 = time.perf_counter()
  out = (run_jax if args.side == 'jax' else run_torch)(args)
  out.update(side=args.side, wall_s=time.perf_counter() - t0,
             rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  print(RESULT_TAG + json.dumps(out), flush=True)


def run_child(side: str, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f'--side={side}', f'--epochs={args.epochs}', f'--seed={args.seed}',
         f'--data_seed={args.data_seed}', f'--torch_format={args.torch_format}', f'--eval_batch={args.eval_batch}',
         f'--compilation_cache={args.compilation_cache}']
  env = dict(os.environ)
  if side == 'torch':
    env['OMP_WAIT_POLICY'] = 'PASSIVE'
  proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)]
  if proc.returncode or not lines:
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    raise SystemExit(f'the {side} child failed (exit code {proc.returncode}).')
  return json.loads(lines[-1][len(RESULT_TAG):])


def run_line(r: int, res: dict) -> str:
  steps = ' '.join(f'{c:.0f}/{n:.0f}' for c, n in zip(res['steps_cnn'], res['steps_nme']))
  extra = f"  {res['compilations']} compiled steps" if 'compilations' in res else ''
  return (f"round {r + 1} {res['side']:5s}: wall {res['wall_s']:7.1f} s (protocol {res['protocol_s']:6.1f} s)  "
          f"peak RSS {res['rss_mib']:6.0f} MiB  avg inc. acc. CNN {res['cnn']:5.2f}%  NME {res['nme']:5.2f}%  "
          f"[per step CNN/NME: {steps}]{extra}")


def summary(results: dict) -> None:
  med = {side: {k: statistics.median(r[k] for r in runs) for k in ('wall_s', 'rss_mib', 'cnn', 'nme')}
         for side, runs in results.items()}
  for side, m in med.items():
    print(f"median {side:5s}: wall {m['wall_s']:7.1f} s  peak RSS {m['rss_mib']:6.0f} MiB  "
          f"avg inc. acc. CNN {m['cnn']:5.2f}%  NME {m['nme']:5.2f}%")
  print(f"time torch/jax {med['torch']['wall_s'] / med['jax']['wall_s']:.2f}x (>1: JAX faster)   "
        f"RSS jax/torch {med['jax']['rss_mib'] / med['torch']['rss_mib']:.2f}x")


def version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return '(not installed)'


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--epochs', type=int, default=3, help='epochs per task (first task too)')
  parser.add_argument('--repeats', type=int, default=1, help='alternating rounds jax, torch (medians reported)')
  parser.add_argument('--seed', type=int, default=0, help='initialisation, augmentation and batch order')
  parser.add_argument('--data_seed', type=int, default=0, help='seed of the synthetic data set')
  parser.add_argument('--eval_batch', type=int, default=256,
                      help='inference batch (eval.batch_size); the JAX side pads every call to it')
  parser.add_argument('--torch_format', choices=('channels_last', 'contiguous'), default='channels_last',
                      help='memory format of the PyTorch side (channels-last was 15-20%% faster here)')
  parser.add_argument('--compilation_cache', default='',
                      help="JAX side: persistent compilation cache directory, as main.py keeps one ('' = compile cold)")
  parser.add_argument('--side', choices=('jax', 'torch'), help='run one side in this process (the child)')
  args = parser.parse_args()
  if args.side:
    return child(args)
  print(f"iCaRL, synthetic 100 classes ({TRAIN_PER_CLASS}/{TEST_PER_CLASS} train/test per class), B{INITIAL} + "
        f"{(NUM_CLASSES - INITIAL) // INCREMENT} x {INCREMENT}, ResNet-32, batch {BATCH}, {args.epochs} epochs per "
        f"task, milestones {milestones(args.epochs)}; jax {version('jax')}, torch {version('torch')} "
        f"({os.cpu_count()} threads, {args.torch_format}); inference batch {args.eval_batch}", flush=True)
  results = {'jax': [], 'torch': []}
  for r in range(args.repeats):
    for side in ('jax', 'torch'):
      results[side].append(run_child(side, args))
      print(run_line(r, results[side][-1]), flush=True)
  summary(results)


if __name__ == '__main__':
  main()
