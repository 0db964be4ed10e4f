"""Records step-by-step training runs of the official PODNet, LUCIR and iCaRL (PyCIL) codes on tiny synthetic data,
as the fixtures that `tests/test_official_loops.py` replays through incremental_jax's training loop.

Run by hand, with PyTorch and the official repositories (never a dependency of the library or of its tests):

    python3 -m venv /work/torchvenv && /work/torchvenv/bin/pip install torch==2.13.0 numpy scipy scikit-learn tqdm
    # the official codes, unmodified, somewhere outside this repository:
    #   PODNet  arthurdouillard/incremental_learning.pytorch  -> $OFFICIAL/podnet
    #   LUCIR   hshustc/CVPR19_Incremental_Learning           -> $OFFICIAL/lucir
    #   iCaRL   G-U-N/PyCIL                                   -> $OFFICIAL/pycil
    /work/torchvenv/bin/python tools/record_official_loops.py --official $OFFICIAL --method all \
        --out tests/fixtures/official_loops

Each method trains two tasks of a class-incremental run (3 classes, then 2 new ones with 2 exemplars of each old
class and distillation from the frozen task-0 network), 3 epochs each, batch 8: every epoch ends with a partial
batch (30 and 26 examples), and the learning rate changes between epochs. The official code runs as it is: its
network classes, its loss code, its optimiser and scheduler set-up and its epoch loop (PODNet's `_before_task`,
`_train_task`, `_after_task`; LUCIR's `incremental_train_and_eval_MR_LF` with the task set-up of
`class_incremental_cosine_cifar100.py` replayed line by line; PyCIL's `iCaRL._train`, `after_task` and
`IncrementalNet.update_fc`). Only its data loaders are replaced, by iterables that yield, epoch after epoch, the
batches a `DataLoader(shuffle=True, drop_last=False)` yields: a recorded permutation of the task's examples cut into
batches of 8 (the last one partial), each image cropped (padding 4) and flipped by recorded draws, then normalised
as `ToTensor` + `Normalize`. Exemplars are fixed (the first 2 of each old class) instead of herded.

Recorded per method (one .npz): the images and labels, per task the example list, the per-epoch permutations and
crop/flip draws, the loss and learning rate of every step, the state_dict (parameters and BatchNorm statistics)
at the start, after task 0, the classifier rows set up for task 1 (imprinted or freshly initialised), and after
task 1; plus the official repository's commit.

What is patched at import time, and why (nothing of the official training code itself):
- torchvision, matplotlib, gensim and other optional imports of the official packages are stubbed: modern
  torchvision does not import with the CPU build of torch, and the code recorded here uses none of them;
- LUCIR's `utils_pytorch` runs `stty size` at import: it is given a terminal size;
- PODNet's `losses.pod` calls `torch.frobenius_norm`, deprecated in recent torch: if it is missing it becomes
  `linalg.vector_norm`;
- LUCIR's `MarginRankingLoss` gets inputs [n, 1] and a target [n], which PyTorch 0.4 broadcast (to [n, n], whose
  mean is the [n, 1] mean since the target is all ones) and torch >= 1.x rejects: the target is viewed as [n, 1];
- LUCIR ran under PyTorch 0.4.0 (its README), whose `_LRScheduler` constructor steps to epoch 0 and then resets
  `last_epoch` to -1, so its `tg_lr_scheduler.step()` at the start of epoch e sets the lr of epoch e (PyTorch >= 1.1
  would set that of e + 1): `Torch04MultiStepLR` reproduces the 0.4 semantics;
- the networks are built at width 4 (and PyCIL's ResNet-32 at depth 8, LUCIR's at 14, PODNet's rebuffi n=2): the
  official constructors hard-code 16/32/64 channels, so their `nn` is swapped, while they construct, for a
  namespace whose Conv2d/BatchNorm2d/Linear divide those channel counts by 4; the modules, their forward passes and
  initialisations are the official ones;
- PyCIL's module-level hyperparameters (`init_epoch`, `init_milestones`, `epochs`, `milestones`) are set to this
  run's.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.abc
import importlib.machinery
import io
import json
import math
import os
import subprocess
import sys
import types

import numpy as np

METHODS = ('podnet', 'lucir', 'icarl')
NUM_OLD, NUM_NEW, PER_CLASS, EXEMPLARS = 3, 2, 10, 2
BATCH, EPOCHS, SIZE, PAD = 8, 3, 32, 4
MEANS = {'podnet': ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),   # inclearn/lib/data/datasets.py::iCIFAR100
         'lucir': ((0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)),    # class_incremental_cosine_cifar100.py
         'icarl': ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))}    # PyCIL utils/data.py::iCIFAR100
STUBBED = {'torchvision', 'matplotlib', 'gensim', 'PIL', 'imageio', 'cv2', 'yaml', 'seaborn'}


# ------------------------------------------------------------------------------------------ import patches
class _Stub(types.ModuleType):
  """A module whose every attribute is another stub (callable, subclassable): for imports the run never uses."""

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    sub = _Stub(f'{self.__name__}.{name}')
    setattr(self, name, sub)
    sys.modules[sub.__name__] = sub
    return sub

  def __call__(self, *args, **kwargs):
    return self

  def __mro_entries__(self, bases):
    return (object,)


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in STUBBED:
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    return _Stub(spec.name)

  def exec_module(self, module):
    module.__path__ = []


def install_import_patches():
  sys.meta_path.insert(0, _StubFinder())
  import torch
  import torch.nn.functional as F
  if not hasattr(torch, 'frobenius_norm'):
    torch.frobenius_norm = lambda x, dim=None: torch.linalg.vector_norm(x, dim=dim)
  margin_ranking_loss = F.margin_ranking_loss

  def margin_ranking_loss_04(input1, input2, target, *args, **kwargs):
    # LUCIR passes inputs [n, 1] and a target [n]; PyTorch 0.4 broadcast them to [n, n], whose mean equals the
    # mean over n of the [n, 1] form when the target is all ones (it is); torch >= 1.x rejects the shapes.
    return margin_ranking_loss(input1, input2, target.view_as(input1), *args, **kwargs)

  F.margin_ranking_loss = margin_ranking_loss_04


class NarrowNN(types.SimpleNamespace):
  """`torch.nn` whose Conv2d/BatchNorm2d/Linear (subclasses, so that the constructors' isinstance checks that
  initialise them still match) turn the channel counts 16/32/64 into 4/8/16."""

  def __init__(self):
    import torch.nn as nn
    super().__init__(**{k: getattr(nn, k) for k in dir(nn) if not k.startswith('__')})
    narrow = lambda c: c // 4 if c in (16, 32, 64) else c

    class Conv2d(nn.Conv2d):
      def __init__(self, cin, cout, *args, **kwargs):
        super().__init__(narrow(cin), narrow(cout), *args, **kwargs)

    class BatchNorm2d(nn.BatchNorm2d):
      def __init__(self, c, *args, **kwargs):
        super().__init__(narrow(c), *args, **kwargs)

    class Linear(nn.Linear):
      def __init__(self, cin, cout, *args, **kwargs):
        super().__init__(narrow(cin), cout, *args, **kwargs)

    self.Conv2d, self.BatchNorm2d, self.Linear = Conv2d, BatchNorm2d, Linear


def build_narrow(module, build):
  """`build()` while `module.nn` is `NarrowNN`."""
  saved = module.nn
  module.nn = NarrowNN()
  try:
    return build()
  finally:
    module.nn = saved


# ------------------------------------------------------------------------------------------ data and loaders
def make_data(seed: int = 0):
  """50 images (10 per class, 5 classes), 32x32x3 uint8: a per-class colour plus 8x8-pixel blocks of noise (blocks,
  so that the fixture compresses), labels 0..4."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(NUM_OLD + NUM_NEW), PER_CLASS)
  base = rng.integers(40, 216, (NUM_OLD + NUM_NEW, 1, 1, 3))[labels]
  noise = rng.integers(-40, 41, (len(labels), SIZE // 4, SIZE // 4, 3)).repeat(4, 1).repeat(4, 2)
  return np.clip(base + noise, 0, 255).astype(np.uint8), labels.astype(np.int64)


def task_examples(labels, t: int) -> np.ndarray:
  """The examples of task t in the order the official codes concatenate them: the new classes' images, then the
  exemplars (the first EXEMPLARS of each old class)."""
  if t == 0:
    return np.flatnonzero(labels < NUM_OLD)
  new = np.flatnonzero(labels >= NUM_OLD)
  memory = np.concatenate([np.flatnonzero(labels == c)[:EXEMPLARS] for c in range(NUM_OLD)])
  return np.concatenate([new, memory])


def draw_epochs(n: int, generator):
  """Per epoch: the permutation of `torch.utils.data.RandomSampler` and, per example, RandomCrop(32, padding=4)'s
  offsets and RandomHorizontalFlip's coin."""
  import torch
  perms = np.stack([torch.randperm(n, generator=generator).numpy() for _ in range(EPOCHS)])
  crops = torch.randint(0, 2 * PAD + 1, (EPOCHS, n, 2), generator=generator).numpy()
  flips = (torch.rand(EPOCHS, n, generator=generator) < 0.5).numpy()
  return perms, crops, flips


def augment(images: np.ndarray, crops: np.ndarray, flips: np.ndarray) -> np.ndarray:
  """uint8 [n, H, W, C]: zero-pad 4, crop at `crops` (dy, dx), mirror where `flips`."""
  padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
  out = np.stack([p[dy:dy + SIZE, dx:dx + SIZE] for p, (dy, dx) in zip(padded, crops)])
  return np.where(flips[:, None, None, None], out[:, :, ::-1], out)


def to_tensor(images: np.ndarray, mean, std):
  """`transforms.ToTensor()` then `transforms.Normalize(mean, std)` of uint8 NHWC images."""
  import torch
  x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)
  return x.sub(torch.tensor(mean).view(1, 3, 1, 1)).div(torch.tensor(std).view(1, 3, 1, 1))


class EpochBatches:
  """Iterated once per epoch (as the official loops iterate their DataLoader): epoch e's batches of `BATCH`
  examples in the order of `perms[e]`, the last one partial, each augmented by its draws; `form(inputs, targets,
  flags)` shapes a batch as the official loop unpacks it."""

  def __init__(self, images, labels, examples, draws, mean, std, form, memory_start):
    self.images, self.labels, self.examples = images, labels, examples
    self.perms, self.crops, self.flips = draws
    self.mean, self.std, self.form, self.memory_start = mean, std, form, memory_start
    self.epoch = 0
    self.dataset = examples   # what the official code reads of a DataLoader besides iterating it: len(.dataset)

  def __iter__(self):
    import torch
    e = self.epoch
    self.epoch += 1
    perm = self.perms[e]
    for s in range(0, len(perm), BATCH):
      pos = perm[s:s + BATCH]
      idx = self.examples[pos]
      x = to_tensor(augment(self.images[idx], self.crops[e, pos], self.flips[e, pos]), self.mean, self.std)
      yield self.form(x, torch.from_numpy(self.labels[idx]), torch.from_numpy((pos >= self.memory_start).astype(np.int64)))

  def __len__(self):
    return -(-len(self.examples) // BATCH)


class StepLog:
  """The loss and learning rate of every step, and an offset per step (PyCIL's KD-term entropy, see `run_icarl`)."""

  def __init__(self):
    self.loss, self.lr, self.offset = [], [], []

  def arrays(self):
    return (np.asarray(self.loss, np.float64), np.asarray(self.lr, np.float64), np.asarray(self.offset, np.float64))


def logging_backward(log: StepLog):
  """`torch.Tensor.backward` that first appends the value of the tensor it is called on (the official loops
  call `loss.backward()` once per step, on the step's loss)."""
  import torch
  original = torch.Tensor.backward

  def backward(self, *args, **kwargs):
    log.loss.append(float(self.detach()))
    log.offset.append(0.0)
    return original(self, *args, **kwargs)

  return original, backward


def logging_step(optimizer, log: StepLog, group: int = 0):
  """Wraps `optimizer.step` to record the learning rate of param group `group` at each step."""
  original = optimizer.step

  def step(self, *args, **kwargs):
    log.lr.append(float(self.param_groups[group]['lr']))
    return original(*args, **kwargs)

  optimizer.step = types.MethodType(step, optimizer)   # a bound method, as the schedulers of torch >= 1.1 wrap it
  return optimizer


def state_dict(module) -> dict:
  return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()
          if not k.endswith('num_batches_tracked')}


class Recorder:
  def __init__(self, method: str, official: str, seed: int = 0):
    import torch
    self.method, self.official, self.seed = method, official, seed
    self.generator = torch.Generator().manual_seed(seed)
    self.images, self.labels = make_data(seed)
    self.mean, self.std = MEANS[method]
    self.arrays: dict = {'images': self.images, 'labels': self.labels}
    self.meta: dict = {'method': method, 'batch_size': BATCH, 'epochs': EPOCHS, 'num_old': NUM_OLD,
                       'num_new': NUM_NEW, 'mean': self.mean, 'std': self.std, 'torch': torch.__version__}

  def task(self, t: int, form):
    examples = task_examples(self.labels, t)
    draws = draw_epochs(len(examples), self.generator)
    self.arrays.update({f'task{t}/examples': examples, f'task{t}/perm': draws[0], f'task{t}/crop': draws[1],
                        f'task{t}/flip': draws[2]})
    memory_start = len(examples) - (NUM_OLD * EXEMPLARS if t else 0)
    return EpochBatches(self.images, self.labels, examples, draws, self.mean, self.std, form, memory_start)

  def weights(self, stage: str, sd: dict, keys=None):
    for k, v in sd.items():
      if keys is None or k in keys:
        self.arrays[f'w/{stage}/{k}'] = v

  def steps(self, t: int, log: StepLog):
    loss, lr, offset = log.arrays()
    self.arrays.update({f'task{t}/loss': loss, f'task{t}/lr': lr, f'task{t}/loss_offset': offset})

  def class_images(self, c: int):
    """Un-augmented, normalised images of class c (the official imprinting's test-transform loaders)."""
    return to_tensor(self.images[self.labels == c], self.mean, self.std)

  def save(self, out: str, repo: str):
    self.meta['official_repo'] = repo
    with open(os.path.join(self.official, self.method_dir, 'COMMIT')) as f:
      self.meta['official_commit'] = f.read().strip()
    self.arrays['meta'] = np.array(json.dumps(self.meta))
    path = os.path.join(out, f'{self.method}.npz')
    np.savez_compressed(path, **self.arrays)
    print(f'{path}: {os.path.getsize(path) / 1024:.0f} KiB; task losses',
          [np.round(self.arrays[f'task{t}/loss'], 4).tolist() for t in (0, 1)])


# ------------------------------------------------------------------------------------------ PODNet
def run_podnet(rec: Recorder):
  """inclearn/models/podnet.py::PODNet as `inclearn/train.py::_train` drives it (set_task_info, before_task,
  train_task, after_task), with options/podnet/podnet_cnn_cifar100.yaml at 3 proxies per class, rebuffi n=2 nf=4,
  3 epochs, batch 8, and no class-balanced finetuning (`finetuning_config: null`)."""
  import torch
  rec.method_dir = 'podnet'
  sys.path.insert(0, os.path.join(rec.official, 'podnet'))
  torch.manual_seed(rec.seed)
  np.random.seed(rec.seed)   # sklearn's KMeans of the imprinting draws from numpy's global generator
  from inclearn.models.podnet import PODNet
  args = {
      'device': [torch.device('cpu')], 'no_progressbar': True, 'batch_size': BATCH, 'optimizer': 'sgd', 'lr': 0.1,
      'weight_decay': 5e-4, 'epochs': EPOCHS, 'scheduling': {'type': 'cosine'}, 'lr_decay': 0.1,
      'memory_size': NUM_OLD * EXEMPLARS, 'fixed_memory': False, 'validation': 0.0,
      'convnet': 'rebuffi', 'convnet_config': {'n': 2, 'nf': 4},
      'classifier_config': {'type': 'cosine', 'proxy_per_class': 3, 'distance': 'neg_stable_cosine_distance'},
      'postprocessor_config': {'type': 'learned_scaling', 'initial_value': 1.0},
      'pod_flat': {'scheduled_factor': 1.0}, 'pod_spatial': {'scheduled_factor': 3.0, 'collapse_channels': 'spatial'},
      'nca': {'margin': 0.6, 'scale': 1., 'exclude_pos_denominator': True},
      'groupwise_factors': {'old_weights': 0.}, 'finetuning_config': None,
      'weight_generation': {'type': 'imprinted', 'multi_class_diff': 'kmeans'}, 'eval_type': 'cnn',
  }
  model = PODNet(args)

  class IncDataset:   # what the imprinting reads: `get_custom_loader([class])` of un-augmented images
    def get_custom_loader(self, classes, **kwargs):
      (c,) = classes
      return None, [{'inputs': rec.class_images(c), 'targets': torch.full((PER_CLASS,), c)}]

  model.inc_dataset = IncDataset()
  form = lambda x, y, flags: {'inputs': x, 'targets': y, 'memory_flags': flags}
  original_forward_loss = model._forward_loss
  head_keys = lambda sd: [k for k in sd if k.startswith(('classifier.', 'post_processor.'))]
  for t, size in enumerate((NUM_OLD, NUM_NEW)):
    log = StepLog()
    loader = rec.task(t, form)
    model.set_task_info({'task': t, 'total_n_classes': NUM_OLD + NUM_NEW, 'increment': size,
                         'n_train_data': len(loader.examples), 'n_test_data': 0, 'max_task': 2})
    model.before_task(loader, None)
    sd = state_dict(model._network)
    rec.weights('init' if t == 0 else 'task1_head', sd, None if t == 0 else head_keys(sd))

    def forward_loss(*args, **kwargs):   # the step's loss, as `_training_step` backpropagates it
      loss = original_forward_loss(*args, **kwargs)
      log.loss.append(float(loss.detach()))
      log.offset.append(0.0)
      return loss

    model._forward_loss = forward_loss
    logging_step(model._optimizer, log)
    model.train_task(loader, None)
    rec.steps(t, log)
    model.after_task(None)
    rec.weights(f'task{t}_end', state_dict(model._network))
  rec.meta.update(lr=0.1, weight_decay=5e-4, schedule='cosine', proxies_per_class=3, depth=14, width=4)
  rec.save_repo = 'arthurdouillard/incremental_learning.pytorch'


# ------------------------------------------------------------------------------------------ LUCIR
class Torch04MultiStepLR:
  """PyTorch 0.4.0's `MultiStepLR` (torch/optim/lr_scheduler.py of v0.4.0): the constructor steps to epoch 0 and
  resets `last_epoch` to -1; `step()` sets every group's lr to initial_lr * gamma ** bisect_right(milestones,
  last_epoch + 1)."""

  def __init__(self, optimizer, milestones, gamma=0.1):
    import bisect
    self.optimizer, self.milestones, self.gamma, self._bisect = optimizer, list(milestones), gamma, bisect
    for group in optimizer.param_groups:
      group.setdefault('initial_lr', group['lr'])
    self.base_lrs = [g['initial_lr'] for g in optimizer.param_groups]
    self.step(0)
    self.last_epoch = -1

  def get_lr(self):
    return [lr * self.gamma ** self._bisect.bisect_right(self.milestones, self.last_epoch) for lr in self.base_lrs]

  def step(self, epoch=None):
    self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
    for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
      group['lr'] = lr


def run_lucir(rec: Recorder):
  """cifar100-class-incremental/class_incremental_cosine_cifar100.py with `--imprint_weights --less_forget --lamda 5
  --adapt_lamda --mr_loss --dist 0.5 --K 2 --lw_mr 1` (run.sh's last CIFAR run) at nb_cl_fg 3, nb_cl 2, 3 epochs,
  lr 0.1 divided by 10 at epoch 2, batch 8, ResNet-14 of width 4; the task set-up (new SplitCosineLinear head,
  adaptive lambda, imprinting, param groups, optimiser) follows the script's lines in order, the training is its
  `utils_incremental/incremental_train_and_eval_MR_LF.py`."""
  import torch
  import torch.nn as nn
  import torch.nn.functional as F
  import torch.optim as optim
  rec.method_dir = 'lucir'
  root = os.path.join(rec.official, 'lucir')
  sys.path[:0] = [os.path.join(root, 'cifar100-class-incremental'), root]
  saved_popen = os.popen
  os.popen = lambda cmd, *a: io.StringIO('24 80') if cmd == 'stty size' else saved_popen(cmd, *a)
  try:
    from utils_incremental.incremental_train_and_eval_MR_LF import incremental_train_and_eval_MR_LF
  finally:
    os.popen = saved_popen
  from utils_incremental.compute_features import compute_features
  import modified_linear
  import modified_resnet_cifar
  torch.manual_seed(rec.seed)
  device = torch.device('cpu')
  base_lr, lr_strat, lr_factor, custom_weight_decay, custom_momentum = 0.1, [2], 0.1, 5e-4, 0.9
  lamda, dist, K, lw_mr = 5.0, 0.5, 2, 1.0
  form = lambda x, y, flags: (x, y)
  testloader = [(rec.class_images(0)[:BATCH], torch.zeros(BATCH, dtype=torch.long))]
  # The network: modified_resnet_cifar.resnet32 is ResNet(BasicBlock, [5, 5, 5]); here [2, 2, 2] at width 4.
  tg_model = build_narrow(modified_resnet_cifar, lambda: modified_resnet_cifar.ResNet(
      modified_resnet_cifar.BasicBlock, [2, 2, 2], num_classes=NUM_OLD))
  tg_model.fc = modified_linear.CosineLinear(16, NUM_OLD)   # the constructor's CosineLinear(64, ...), narrowed
  rec.weights('init', state_dict(tg_model))
  start_iter, ref_model = 0, None
  for iteration in (0, 1):
    if iteration > start_iter:   # script lines after `elif iteration == start_iter+1:`
      ref_model = copy.deepcopy(tg_model)
      in_features, out_features = tg_model.fc.in_features, tg_model.fc.out_features
      new_fc = modified_linear.SplitCosineLinear(in_features, out_features, NUM_NEW)
      new_fc.fc1.weight.data = tg_model.fc.weight.data
      new_fc.sigma.data = tg_model.fc.sigma.data
      tg_model.fc = new_fc
      lamda_mult = out_features * 1.0 / NUM_NEW
    cur_lamda = lamda * math.sqrt(lamda_mult) if iteration > start_iter else lamda
    loader = rec.task(iteration, form)
    if iteration > start_iter:   # "#imprint weights"
      old_embedding_norm = tg_model.fc.fc1.weight.data.norm(dim=1, keepdim=True)
      average_old_embedding_norm = torch.mean(old_embedding_norm, dim=0).to('cpu').type(torch.DoubleTensor)
      tg_feature_model = nn.Sequential(*list(tg_model.children())[:-1])
      num_features = tg_model.fc.in_features
      novel_embedding = torch.zeros((NUM_NEW, num_features))
      for cls_idx in range(NUM_OLD, NUM_OLD + NUM_NEW):
        evalloader = [(rec.class_images(cls_idx), torch.zeros(PER_CLASS))]
        cls_features = compute_features(tg_feature_model, evalloader, PER_CLASS, num_features, device=device)
        norm_features = F.normalize(torch.from_numpy(cls_features), p=2, dim=1)
        cls_embedding = torch.mean(norm_features, dim=0)
        novel_embedding[cls_idx - NUM_OLD] = F.normalize(cls_embedding, p=2, dim=0) * average_old_embedding_norm
      tg_model.fc.fc2.weight.data = novel_embedding.to(device)
      sd = state_dict(tg_model)
      rec.weights('task1_head', sd, [k for k in sd if k.startswith('fc.')])
    if iteration > start_iter:   # "#fix the embedding of old classes"
      ignored_params = list(map(id, tg_model.fc.fc1.parameters()))
      base_params = filter(lambda p: id(p) not in ignored_params, tg_model.parameters())
      tg_params = [{'params': base_params, 'lr': base_lr, 'weight_decay': custom_weight_decay},
                   {'params': tg_model.fc.fc1.parameters(), 'lr': 0, 'weight_decay': 0}]
    else:
      tg_params = tg_model.parameters()
    tg_optimizer = optim.SGD(tg_params, lr=base_lr, momentum=custom_momentum, weight_decay=custom_weight_decay)
    tg_lr_scheduler = Torch04MultiStepLR(tg_optimizer, milestones=lr_strat, gamma=lr_factor)
    log = StepLog()
    logging_step(tg_optimizer, log)
    original, backward = logging_backward(log)
    torch.Tensor.backward = backward
    try:
      tg_model = incremental_train_and_eval_MR_LF(EPOCHS, tg_model, ref_model, tg_optimizer, tg_lr_scheduler,
                                                  loader, testloader, iteration, start_iter, cur_lamda, dist, K,
                                                  lw_mr, device=device)
    finally:
      torch.Tensor.backward = original
    rec.steps(iteration, log)
    rec.weights(f'task{iteration}_end', state_dict(tg_model))
  rec.meta.update(lr=base_lr, milestones=lr_strat, weight_decay=custom_weight_decay, lambda_base=lamda, depth=14,
                  width=4)
  rec.save_repo = 'hshustc/CVPR19_Incremental_Learning'


# ------------------------------------------------------------------------------------------ iCaRL (PyCIL)
def run_icarl(rec: Recorder):
  """models/icarl.py::iCaRL as `iCaRL.incremental_train` and `trainer.py` drive it (update_fc, `_train`,
  after_task), with `convnet_type: resnet32` built at depth 8, width 4; 3 epochs per task, lr 0.1 divided by 10 at
  epoch 1 (task 0, weight decay 5e-4) and at epoch 2 (task 1, weight decay 2e-4), batch 8.

  PyCIL's `_KD_loss` is the soft cross-entropy -sum q log p / B, not the KL divergence: the two differ by the
  teacher's entropy, a constant of the step. Each step's `loss_offset` records that entropy (mean over the
  batch), so that loss - loss_offset is the KL form incremental_jax computes."""
  import torch
  rec.method_dir = 'pycil'
  sys.path.insert(0, os.path.join(rec.official, 'pycil'))
  torch.manual_seed(rec.seed)
  import convs.cifar_resnet as cifar_resnet
  import models.icarl as icarl
  import utils.inc_net as inc_net

  def small_resnet32():
    net = build_narrow(cifar_resnet, lambda: cifar_resnet.CifarResNet(cifar_resnet.ResNetBasicblock, 8))
    net.out_dim = 16
    return net

  inc_net.resnet32 = small_resnet32
  icarl.init_epoch, icarl.init_milestones, icarl.epochs, icarl.milestones = EPOCHS, [1], EPOCHS, [2]
  learner = icarl.iCaRL({'memory_size': NUM_OLD * EXEMPLARS, 'device': [torch.device('cpu')],
                         'convnet_type': 'resnet32', 'dataset': 'cifar100'})
  form = lambda x, y, flags: (None, x, y)
  testloader = [(None, rec.class_images(0)[:BATCH], torch.zeros(BATCH, dtype=torch.long))]
  original_kd = icarl._KD_loss
  for t, size in enumerate((NUM_OLD, NUM_NEW)):
    log = StepLog()

    def kd_loss(pred, soft, T):   # the official term, and the teacher's entropy the step adds with it
      q = torch.softmax(soft / T, dim=1)
      log.pending = float(-(q * torch.log_softmax(soft / T, dim=1)).sum() / pred.shape[0])
      return original_kd(pred, soft, T)

    icarl._KD_loss = kd_loss
    learner._cur_task = t   # incremental_train's first lines
    learner._total_classes = learner._known_classes + size
    learner._network.update_fc(learner._total_classes)
    sd = state_dict(learner._network)
    rec.weights('init' if t == 0 else 'task1_head', sd, None if t == 0 else [k for k in sd if k.startswith('fc.')])
    loader = rec.task(t, form)
    original_sgd = torch.optim.SGD

    def sgd(*args, **kwargs):   # the optimiser `_train` builds, with its lr logged per step
      return logging_step(original_sgd(*args, **kwargs), log)

    icarl.optim.SGD = sgd
    original, backward = logging_backward(log)

    def backward_with_offset(self, *args, **kwargs):
      result = backward(self, *args, **kwargs)
      log.offset[-1] = getattr(log, 'pending', 0.0)
      log.pending = 0.0
      return result

    torch.Tensor.backward = backward_with_offset
    try:
      learner._train(loader, testloader)
    finally:
      torch.Tensor.backward = original
      icarl.optim.SGD = original_sgd
      icarl._KD_loss = original_kd
    rec.steps(t, log)
    learner.after_task()
    rec.weights(f'task{t}_end', state_dict(learner._network))
  rec.meta.update(lr=0.1, first_task_milestones=[1], milestones=[2], first_task_weight_decay=5e-4,
                  weight_decay=2e-4, kd_temperature=2.0, depth=8, width=4)
  rec.save_repo = 'G-U-N/PyCIL'


RUNS = {'podnet': run_podnet, 'lucir': run_lucir, 'icarl': run_icarl}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--official', required=True, help='folder holding podnet/, lucir/ and pycil/ (each with COMMIT)')
  parser.add_argument('--method', default='all', choices=METHODS + ('all',))
  parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                    'tests', 'fixtures', 'official_loops'))
  args = parser.parse_args()
  if args.method == 'all':   # one process per method: the official packages' module names collide
    for m in METHODS:
      subprocess.run([sys.executable, __file__, '--official', args.official, '--method', m, '--out', args.out],
                     check=True)
    return
  install_import_patches()
  import torch
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  os.makedirs(args.out, exist_ok=True)
  rec = Recorder(args.method, args.official)
  RUNS[args.method](rec)
  rec.save(args.out, rec.save_repo)


if __name__ == '__main__':
  main()
