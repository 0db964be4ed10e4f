"""LUCIR (Hou et al., CVPR 2019): cosine-normalised classifier, less-forget constraint with adaptive weight,
margin ranking loss, imprinted new-class weights, herding exemplars (20 per class), CNN and NME evaluation.

Hyperparameters follow the official code (hshustc/CVPR19_Incremental_Learning, `run.sh`): CIFAR-100 ResNet-32
without its last ReLU, 160 epochs, lr 0.1 divided by 10 at epochs 80 and 120, batch 128, weight decay 5e-4,
momentum 0.9, lambda_base 5, K = 2, m = 0.5, class order from seed 1993; ImageNet-subset ResNet-18, 90 epochs,
lr 0.1 divided by 10 at 30 and 60, weight decay 1e-4, lambda_base 10.

Presets and reported average incremental accuracies (%, mean over all steps including the base one; CNN / NME):
  preset               protocol                          LUCIR paper (a)   PODNet's re-run (b)
  cifar100_b50_s5      B50, 5 steps of 10 classes        63.42 / 63.12     64.01 / 63.63
  cifar100_b50_s10     B50, 10 steps of 5 (the default)  60.18 / 60.12     61.22 / 60.83
  cifar100_b50_s25     B50, 25 steps of 2                -                 57.57 / 56.82
  cifar100_b50_s50     B50, 50 steps of 1 (c)            -                 49.30 / 48.57
  imagenet100_b50_s10  ImageNet-100 B50, 10 steps of 5,  the paper reports ImageNet-subset results in figures only
                       ResNet-18, lambda_base 10
  digits               the embedded digits protocol (B2, 4 steps of 2), runs offline in about a minute
  test                 a tiny run for the unit tests
(a) Hou et al. 2019, Fig. 5, as copied into PODNet's Table 1 (Douillard et al., ECCV 2020). (b) PODNet's Table 1,
UCIR rows (3 class orders). (c) With one new class per step the margin ranking loss has a single hard negative
(K is capped at the number of new classes; the official code would fail on topk(2) of one class).
"""
import ml_collections

from incremental_jax import config as cfglib


def lucir_digits(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The shared digits protocol (data, tasks, 5 exemplars per class, ResNet-8, 30 epochs at lr 0.05) with
  lambda_base 2: on this tiny network the CIFAR value 5 keeps the features too close to the previous model's,
  so new classes are learnt worse (seed 0, average incremental accuracy CNN/NME: lambda_base 1 97.6/96.7,
  2 97.6/97.5, 3 96.8/96.9, 5 95.8/96.1, 10 88.6/93.7; seeds 1 and 2 agree; lr 0.1 or 0.02 were worse)."""
  c = cfglib.digits(c)
  c.method.lambda_base = 2.0
  return c


def lucir_cifar(preset):
  """A shared CIFAR-100 preset with LUCIR's herding loop and normalisation constants
  (`cifar100-class-incremental/class_incremental_cosine_cifar100.py`)."""

  def build(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c = preset(c)
    c.memory.selection = 'herding_loop'
    c.data.mean, c.data.std = (0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)
    return c

  build.__doc__ = f'{preset.__doc__} LUCIR protocol (official herding loop and normalisation).'
  return build


def imagenet100_b50_s10(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """ImageNet-100 B50 in 10 steps: ResNet-18 without its last ReLU, lambda_base 10; NME class means from the
  original images only (the official ImageNet code has no second view)."""
  c = cfglib.imagenet_subset(50, 5)(c)
  c.data.classes = 'imagenet100_lucir'   # gen_imagenet_subset.py: 100 ImageNet-1k classes drawn with seed 1993
  c.memory.selection = 'herding_loop'
  c.method.lambda_base = 10.0
  c.memory.nme_flip = False
  return c


PRESETS = cfglib.preset_table({
    'digits': lucir_digits,
    'test': cfglib.test_preset,
    **{name: lucir_cifar(p) for name, p in cfglib.CIFAR100_B50_PRESETS.items()},
    'imagenet100_b50_s10': imagenet100_b50_s10,
})


def get_config(arg=None):
  c = cfglib.base_config()
  c.method = cfglib.method_section(**{
      'name': 'lucir',
      'lambda_base': 5.0,          # less-forget weight (5 CIFAR-100, 10 ImageNet)
      'adaptive_lambda': True,     # times sqrt(|C_old| / |C_new|)
      'less_forget': True,
      'margin': 0.5,               # margin ranking loss: m
      'num_hard_negatives': 2,     # K
      'mr_weight': 1.0,            # 0 disables the margin ranking loss
      'imprint': True,             # imprint new classes' weights before each task
      'cb_finetune': False,        # class-balanced finetuning (off in the paper's CIFAR/ImageNet-subset results)
      'cbf_epochs': 20,
      'cbf_lr': 0.01,
      'cbf_milestones': (10,),
  })
  c.model.head = 'cosine'
  c.model.head_kwargs = ml_collections.ConfigDict({'learn_sigma': True, 'sigma_init': 1.0})
  c.model.last_relu = False        # the official modified_resnet_cifar drops the last block's ReLU
  c.model.shortcut = 'conv'        # 1x1 conv + BN downsampling shortcuts, as the official ResNets
  c.memory.per_class = 20
  c.memory.total = 0
  c.optim.schedule_offset = 0      # MultiStepLR.step() at the start of each epoch under PyTorch 0.4.0 (the
                                   # official code's): epoch e trains with the value at e
  return cfglib.apply_preset(c, arg, PRESETS, default='cifar100_b50_s10')
