"""The base run config and the shared data/protocol presets that the files under `configs/` compose.

Every config file has `get_config(arg=None)`; `arg` names a preset (`configs/icarl.py:digits`). A preset is
a function that edits the base config, so a reader sees only what differs from the base.

One source of truth: every field the library reads is declared here, once, with its default (a method's own
fields in its config file's `method` section, made by `method_section`), and the library reads fields by
attribute, so a missing one fails loudly and every declared one can be set on the command line
(`--config.optim.lr=0.05`).
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import ml_collections

from incremental_jax.registry import Registry


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with the defaults of the CIFAR-100 protocols (ResNet-32, SGD 0.1, 20 exemplars
  per class, class order from seed 1993)."""
  c = ml_collections.ConfigDict()
  c.seed = 0                      # parameter initialisation, augmentation and batch order
  c.progress = True               # progress bars and per-step lines (process 0 only)
  c.plots = True                  # PNG plots next to results.json
  c.tensorboard = True            # TensorBoard scalars in <workdir>/tensorboard/ when tensorboardX is installed
  c.num_runs = 1                  # > 1: that many independent runs trained together (incremental_jax.runs)
  c.runs_vary = 'seed_and_order'  # run k: seed + k and/or data.class_order_seed + k ('seed', 'order')
  c.sweep = ''                    # several runs in one workdir, e.g. 'optim.lr=0.05,0.1 * seed=0,1' (product '*',
                                  # zip '+'; incremental_jax.sweeps); '' = one run
  c.reference_table = ''          # the paper table a sweep reproduces, '<configs module>:<table>' (the module's
                                  # TABLES; printed by incremental_jax.report); '' = none
  c.compilation_cache = 'auto'    # persistent XLA compilation cache directory (re-runs and resumes skip compiling):
                                  # 'auto' = $XDG_CACHE_HOME/incremental_jax/xla (~/.cache/...), '' = off;
                                  # JAX_COMPILATION_CACHE_DIR, when set, takes precedence

  c.method = method_section('finetune')

  c.data = ml_collections.ConfigDict()
  c.data.name = 'cifar100'        # see incremental_jax.data.sources.SOURCES
  c.data.data_dir = ''            # where the data set lives ('' = the source's default)
  c.data.image_size = 0           # image folders: centre-crop size (0 = source default)
  c.data.resize = 0               # image folders: shorter side before cropping (0 = image_size)
  c.data.train_list = ''          # image folders: optional split list files ('path label' per line)
  c.data.test_list = ''
  c.data.num_workers = 0          # image folders: decoding threads of evaluation, herding, checks and of the train
                                  # batches when data.workers is 0 (0 = all cores)
  c.data.workers = -1             # image folders: Grain worker processes that decode and crop the train batches
                                  # (-1 = one per core, 0 = in the training process); batches do not depend on it
  c.data.prefetch = 2             # image folders: train batches each Grain worker prepares ahead
  c.data.classes = ''             # image folders: only these class folders, sorted ('' = all): a packaged list
                                  # ('imagenet100_podnet', 'imagenet100_lucir': data/class_lists/) or a file with
                                  # one folder name per line
  c.data.test_fraction = 0.2      # digits: held-out fraction per class
  c.data.split_seed = 0           # digits: seed of the train/test split
  c.data.class_order = ()         # explicit permutation of class ids; () = seeded shuffle
  c.data.class_order_seed = 1993  # seed of np.random.seed(s); np.random.permutation (the iCaRL protocol)
  c.data.named_order = ''         # a published order, e.g. 'podnet_cifar100:0' (:1, :2), see data/class_orders.py;
                                  # num_runs > 1 walks the following ones; '' = class_order or the seeded shuffle
  c.data.initial_classes = 50     # classes of the first task (B50); 0 = same as increment (B0)
  c.data.increment = 10           # classes per later task; 0 = a single task with every class
  c.data.mean = ()                # per-channel normalisation mean on [0, 1]; () = the source's (train-image statistics)
  c.data.std = ()                 # per-channel std; () = the source's; set both or neither
  c.data.sampler = 'shuffle'      # batch sampler (incremental_jax.data.pipeline.SAMPLERS)
  # sampler 'intra_class' (BAKE): each batch is batch_size/(M+1) anchors, each followed by M other images of its
  # class, M = same_class_per_anchor; batch_size counts all images. Every image is an anchor once per epoch, so
  # one epoch visits (M+1) times the data set (and has M+1 times the steps), as in the official BAKE code.
  c.data.same_class_per_anchor = 1
  c.data.sampler_kwargs = ml_collections.ConfigDict()   # extra keyword arguments of the sampler
  c.data.drop_last = False        # False (PyTorch DataLoader's default, every official CIL code): an epoch's last
                                  # partial batch is trained, padded to batch_size with weight 0 (BatchNorm and
                                  # losses see its real examples only): ceil(n / batch_size) steps; True drops it
                                  # (n // batch_size steps; a set smaller than one batch is repeated to fill one)
  c.data.sampler_kwargs.same_class_per_anchor = c.data.get_ref('same_class_per_anchor')  # follows the field
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.crop_padding = 4       # on the device: zero-pad and random crop back (RandomCrop(size, padding))
  c.data.augment.flip = True            # on the device: horizontal flip with probability 1/2
  c.data.augment.brightness = 0.0       # on the device: ColorJitter(brightness=b) (0 = off)
  c.data.augment.brightness_mode = 'multiply'  # 'multiply' (torchvision ColorJitter: factor in [1-b, 1+b], clipped)
                                        # or 'add' (offset in [-b, b] on [0, 1] pixels, tf.image.random_brightness)
  c.data.augment.random_resized_crop = False   # image folders: RandomResizedCrop(image_size) of each decoded train
                                        # image on the host (Grain loader); needs crop_padding=0
  c.data.augment.crop_scale = (0.08, 1.0)      # its area fraction range (torchvision's default)
  c.data.augment.crop_ratio = (3 / 4, 4 / 3)   # its aspect-ratio range (torchvision's default)
  c.data.verify_images = True     # image folders: open every image once before training (False skips the check)
  c.data.on_device = 'auto'       # train/test images kept on the device (placed once; batches gathered there):
                                  # True, False, or 'auto' = when in memory and within a quarter of device memory
                                  # (2 GiB on CPU); lazy image folders stay on the host
  c.data.chunk_steps = 0          # train steps per compiled loop (one dispatch); 0 = 1 on CPU, else 64 with the
                                  # images on the device, 4 from the host

  c.model = ml_collections.ConfigDict()
  c.model.backbone = 'cifar_resnet'  # 'cifar_resnet' (depth 6n+2) or 'resnet' (18/34/50)
  c.model.depth = 32
  c.model.width = 16
  c.model.last_relu = True
  c.model.shortcut = 'conv'       # 'conv' (1x1 conv + BN) or 'pad' (zero padding, option A)
  c.model.stem = 'imagenet'       # resnet only: 'imagenet' (7x7/2 + max-pool) or 'cifar' (3x3/1)
  c.model.head = 'linear'
  c.model.dtype = 'float32'       # compute dtype: 'float32', or 'bfloat16' (parameters stay float32; accelerators)
  c.model.bn_running_var = 'unbiased'  # BatchNorm's running variance from the batch's unbiased variance, as PyTorch
                                  # ('unbiased'), or its biased one, as flax ('biased'; before issue 33)
  c.model.head_kwargs = ml_collections.ConfigDict()

  c.optim = ml_collections.ConfigDict()
  c.optim.epochs = 160
  c.optim.batch_size = 128
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 5e-4
  c.optim.schedule = 'multistep'  # 'multistep', 'cosine' or 'constant'
  c.optim.milestones = (80, 120)  # epochs (multistep)
  c.optim.gamma = 0.1
  c.optim.warmup_epochs = 0       # linear warm-up over this many epochs (0 = none), multiplying the schedule
  c.optim.warmup_start = 0.0      # the warm-up's first factor f: it rises linearly from f to 1 (pycls's
                                  # OPTIM.WARMUP_FACTOR is 0.1); 0 = today's ramp from 0, bit for bit
  c.optim.warmup_unit = 'step'    # 'step': the factor rises every step, min(1, (s + 1) / (warmup_epochs x steps
                                  # per epoch)); 'epoch': once per epoch, f + (1 - f) e / warmup_epochs for epoch
                                  # e < warmup_epochs (pycls/core/optimizer.py::get_epoch_lr) (step.learning_rate)
  c.optim.schedule_unit = 'epoch'  # 'epoch' (PyTorch-style per-epoch steps) or 'step'
  c.optim.schedule_offset = 0     # epoch e trains with the schedule's value at max(0, e + offset): 0 = step() after
                                  # each epoch (PyCIL), -1 = step(epoch) after each epoch (PODNet), +1 = step() at
                                  # the start of each epoch under PyTorch >= 1.1 (step.learning_rate)
  c.optim.precise_bn_images = 0   # > 0: after each epoch of a phase that trains the backbone, BatchNorm's running
                                  # statistics are recomputed from min(images // batch_size, steps) batches, the
                                  # first ones of that epoch's sampler order, in training mode with the epoch's
                                  # weights (pycls's precise BN, pycls/core/net.py::compute_precise_bn_stats,
                                  # BN.NUM_SAMPLES_PRECISE = 8192); 0 = off (train.precise_bn_pass)
  c.optim.precise_bn_mode = 'average'  # 'average': the running statistics become the mean over those batches of
                                  # each batch's statistics (pycls on BatchNorm2d layers, momentum 1.0);
                                  # 'running': each batch updates them as a train step does (momentum 0.1), what
                                  # pycls's forward passes do to SyncBatchNorm layers, which it does not collect
  c.optim.clip_value = 0.0        # > 0: clamp each gradient element to [-clip_value, clip_value] (PODNet)
  c.optim.first_task_epochs = 0   # task 0 overrides (0/() = same as later tasks)
  c.optim.first_task_lr = 0.0
  c.optim.first_task_milestones = ()
  c.optim.first_task_weight_decay = 0.0

  c.memory = ml_collections.ConfigDict()
  c.memory.per_class = 20         # exemplars per class; set 0 when memory.total is used
  c.memory.total = 0              # fixed total budget (e.g. 2000) split over the seen classes; needs per_class 0
  c.memory.selection = 'herding'  # 'herding' (greedy, PyCIL), 'herding_loop' (LUCIR/PODNet code) or 'random'
  c.memory.nme_flip = True        # NME class means also from a second view of the exemplars (memory.nme_view)
  c.memory.nme_view = 'hflip'     # that view: 'hflip' (mirrored) or 'channel_reverse' (LUCIR code's RGB->BGR)

  c.eval = ml_collections.ConfigDict({'batch_size': 256})
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.max_to_keep = 2    # task-end checkpoints kept (0 = all)
  c.checkpoint.every_epochs = 0   # also checkpoint inside a task every n epochs (0 = only at task ends)
  return c


def method_section(name: str, **fields) -> ml_collections.ConfigDict:
  """A `method` config section: `name` (the registered method), `aux_losses` (auxiliary loss terms added to the
  method's loss, `losses.auxiliary`; none by default) and the method's own fields with their defaults."""
  return ml_collections.ConfigDict({'name': name, 'aux_losses': ml_collections.ConfigDict(), **fields})


# ---- shared presets --------------------------------------------------------------------------------------
def digits(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """scikit-learn's 8x8 digits, embedded: 2 base classes then 4 tasks of 2, a small CIFAR ResNet, runs in about
  a minute on 2 CPU cores."""
  c.data.name = 'digits'
  c.data.initial_classes = 2
  c.data.increment = 2
  c.data.augment.crop_padding = 1
  c.data.augment.flip = False     # mirrored digits are other symbols
  c.memory.nme_flip = False
  c.memory.per_class = 5          # 3.5% of a class's ~144 train images, as 20 of 500 on CIFAR-100
  c.model.depth = 8
  c.model.width = 16
  c.optim.epochs = 30
  c.optim.batch_size = 32
  c.optim.lr = 0.05
  c.optim.milestones = (20, 25)
  c.optim.weight_decay = 5e-4
  c.eval.batch_size = 128
  return c


def cifar100(initial: int, increment: int) -> Callable:
  """CIFAR-100 with `initial` base classes then tasks of `increment` (ResNet-32, class order seed 1993)."""

  def preset(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.data.name = 'cifar100'
    c.data.initial_classes = initial
    c.data.increment = increment
    return c

  preset.__doc__ = f'CIFAR-100 B{initial} with {increment} classes per step.'
  return preset


def imagenet_subset(initial: int, increment: int, num_classes: int = 100) -> Callable:
  """An ImageNet subset (ImageNet-100 by default) from a class-folder tree (its classes from `data.classes`, or
  split lists when given): ResNet-18 at 224."""

  def preset(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.data.name = 'image_folder'
    c.data.image_size = 224
    c.data.resize = 256
    c.data.initial_classes = initial
    c.data.increment = increment
    c.data.classes = 'imagenet100_podnet' if num_classes == 100 else ''   # data/class_lists/
    c.data.augment.random_resized_crop = True   # RandomResizedCrop(224) + flip for training, Resize(256) +
    c.data.augment.crop_padding = 0             # CenterCrop(224) for testing, as the official ImageNet code
    c.model.backbone = 'resnet'
    c.model.depth = 18
    c.model.width = 64
    c.model.stem = 'imagenet'
    c.optim.epochs = 90
    c.optim.lr = 0.1
    c.optim.milestones = (30, 60)
    c.optim.weight_decay = 1e-4
    c.memory.per_class = 20
    return c

  preset.__doc__ = f'ImageNet-{num_classes} B{initial} with {increment} classes per step.'
  return preset


def test_preset(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The digits protocol shrunk for unit tests: 3 tasks, tiny network, a few epochs, no plots or bars."""
  c = digits(c)
  c.data.initial_classes = 4
  c.data.increment = 3
  c.model.width = 4
  c.optim.epochs = 2
  c.optim.milestones = ()
  c.memory.per_class = 3
  c.progress = False
  c.plots = False
  return c


def preset_table(presets: Mapping[str, Callable]) -> Registry[Callable]:
  """A config file's presets {name: function editing the base config} as the registry `apply_preset` reads."""
  return Registry('a preset', presets)


CIFAR100_B50_PRESETS: Registry[Callable] = preset_table({
    'cifar100_b50_s5': cifar100(50, 10),
    'cifar100_b50_s10': cifar100(50, 5),
    'cifar100_b50_s25': cifar100(50, 2),
    'cifar100_b50_s50': cifar100(50, 1),
})

COMMON_PRESETS: Registry[Callable] = preset_table({
    'digits': digits,
    'test': test_preset,
    **CIFAR100_B50_PRESETS,
    'cifar100_b0_s10': cifar100(0, 10),
    'cifar100_b0_s20': cifar100(0, 5),
    'imagenet100_b50_s10': imagenet_subset(50, 5),
})


def apply_preset(config: ml_collections.ConfigDict, arg: Optional[str], presets: Mapping[str, Callable],
                 default: str) -> ml_collections.ConfigDict:
  """Applies the preset named `arg` (or `default`) of `presets` (a config file's `PRESETS` registry, or a plain
  dict); an unknown name is an `UnknownName` listing the valid ones."""
  table = presets if isinstance(presets, Registry) else preset_table(presets)
  return table.lookup(arg or default, 'preset')(config)


def flat_defaults() -> dict:
  """The base config's fields as {'section.field': default} (for checkpoints written before a field existed)."""
  def flatten(d, prefix=''):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict):
        out.update(flatten(v, f'{prefix}{k}.'))
      else:
        out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
    return out
  return flatten(base_config().to_dict())
