"""Knowledge distillation in ordinary classification (one task with every class, `data.increment=0`):

- `kd`: Hinton et al. (2015) logit distillation from a frozen teacher, the plain baseline;
- `iekd`: IE-KD (Huang et al., "Revisiting Knowledge Distillation: An Inheritance and Exploration Framework",
  CVPR 2021) in its IE-FT form (the official release's `IE_KD` processor);
- `iekd_dml`: IE-DML, two peers trained from scratch that teach each other through IE-KD.

Roles are named plainly: the *teacher* is the frozen (larger) network, the *student* the network being trained.
The official release swaps these words in `processors/IE_KD.py`: its `student` / `embedS` are the teacher and the
teacher's autoencoder here, its `teacher` / `embedTI` / `embedTE` the student and its inheritance / exploration
encoders here.

Teachers come from this project's own supervised training (`configs/train.py`): `method.teacher_workdir` names
such a run's workdir (local or `gs://`), whose latest checkpoint is restored and checked against
`method.teacher_model`. When it is empty, the teacher is trained first, inside the run, and saved in the run's
store (`TaskContext.store`, `incremental_jax.method_store`: `<workdir>/teacher`, a workdir `teacher_workdir`
accepts), so a resumed run loads it instead of training it again; IE-KD's teacher autoencoder likewise goes to
the store's `teacher_autoencoder`.
"""
from __future__ import annotations

from typing import Callable

import jax
import ml_collections
from flax import nnx

from incremental_jax import checkpoint as ckpt_lib
from incremental_jax import method_store
from incremental_jax import step as step_lib
from incremental_jax.losses import cross_entropy, kd_kl, masked_mean
from incremental_jax.losses.iekd import exploration_loss, inheritance_loss, reconstruction_loss
from incremental_jax.methods.base import Method, TaskContext, snapshot
from incremental_jax.methods.baselines import Finetune
from incremental_jax.models import build_model, functional_model, make_classifier
from incremental_jax.models.factor import FactorAutoencoder, IEStudent, MutualPeers, factor_channels
from incremental_jax.errors import ConfigError

TEACHER = 'teacher'                          # the store's network: the teacher trained inside a run
AUTOENCODER = 'teacher_autoencoder'          # the store's network: IE-KD's trained paraphraser


# ---- frozen networks ----------------------------------------------------------------------------------
def check_teacher_meta(meta: dict, teacher_model_cfg, ctx: TaskContext, workdir: str) -> None:
  """The teacher must be the architecture `method.teacher_model` names, trained on the same data set with the
  same class order (labels are positions in the class order)."""
  saved = meta.get('config', {})
  diffs = ckpt_lib.config_differences(saved.get('model', {}), teacher_model_cfg.to_dict())
  if diffs:
    raise ConfigError(f'the teacher in {workdir} is not the network method.teacher_model describes:\n  '
                      + '\n  '.join(diffs) + '\nSet method.teacher_model to the teacher run\'s model section.')
  data_name = saved.get('data', {}).get('name')
  if data_name != ctx.config.data.name:
    raise ConfigError(f'the teacher in {workdir} was trained on {data_name!r}, this run uses {ctx.config.data.name!r}.')
  if list(meta.get('class_order', [])) != ctx.scenario.order.tolist():
    raise ConfigError(f'the teacher in {workdir} was trained with another class order, so its logits are in another '
                      'label order; train it with the same data.class_order / data.class_order_seed.')


def _require_single_task(ctx: TaskContext, name: str) -> None:
  if ctx.scenario.num_tasks != 1:
    raise ConfigError(f'{name} trains on one task with every class: set data.increment=0 and '
                      f'data.initial_classes=0 (got {ctx.scenario.num_tasks} tasks).')


def _sub_config(config, **sections):
  """A copy of the run config with whole sections replaced (e.g. the teacher's model and optimiser)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for name, value in sections.items():
      c[name] = value
  return c


class _ReconstructTeacherFeatures(Method):
  """IE-KD phase 1: the teacher's autoencoder learns to reconstruct the frozen teacher's last-stage feature map
  (the model trained is the autoencoder, applied to the teacher's features; the teacher is `frozen`)."""
  uses_aux_losses = False

  def __init__(self, config, teacher_model, autoencoder_model, kind: str):
    self.teacher_model, self.autoencoder_model, self.kind = teacher_model, autoencoder_model, kind
    super().__init__(config, teacher_model.num_classes, ())

  def build_networks(self, num_classes, image_shape):
    return {'model': self.autoencoder_model, 'teacher': self.teacher_model}

  def teacher_forward(self, model, frozen, images):
    return {'feature': self.teacher_model.apply(frozen['params'], frozen['batch_stats'], images)[0]['stages'][-1]}

  def loss(self, outputs, batch, task, teacher, params):
    rec = masked_mean(reconstruction_loss(outputs['reconstruction'], teacher['feature'], self.kind),
                      batch.get('weight'))
    return rec, {'reconstruction': rec}

  def make_train_step(self, model, phase, augment_fn, has_teacher):
    return step_lib.make_train_step(model, self, phase, augment_fn, has_teacher,
                                    model_input=lambda images, teacher: teacher['feature'])


# ---- KD ----------------------------------------------------------------------------------------------
class KD(Method):
  """Logit distillation (Hinton et al. 2015) from a frozen teacher: (1 - alpha) CE + alpha T^2 KL(softmax(t/T)
  || softmax(s/T)) with `kd_alpha`, `kd_temperature` (the IE-KD release's KD baseline: T=4, alpha=0.9 on
  CIFAR-100; T=20, alpha=0.95 for CIFAR-10 ResNet-56 -> ResNet-20). The teacher (`method.teacher_model`) may
  be another architecture than the student (`model`)."""
  teacher = 'pretrained'

  def build_networks(self, num_classes, image_shape):
    teacher = build_model(self.mcfg.teacher_model, num_classes, image_shape, seed=self.config.seed)
    return {**self.student_networks(num_classes, image_shape, teacher), 'teacher': teacher}

  def student_networks(self, num_classes, image_shape, teacher) -> dict:
    """{'model': the student, ...}: here the run's network (`model`) alone."""
    return {'model': build_model(self.config.model, num_classes, image_shape, seed=self.config.seed)}

  def teacher_forward(self, model, frozen, images):
    teacher = frozen['teacher']
    return self.networks['teacher'].apply(teacher['params'], teacher['batch_stats'], images)[0]

  def before_task(self, ctx: TaskContext) -> TaskContext:
    _require_single_task(ctx, self.mcfg.name)
    return ctx.replace(frozen={'teacher': self.frozen_teacher(ctx)})

  def frozen_teacher(self, ctx: TaskContext) -> dict:
    """The frozen teacher: from `method.teacher_workdir` (local or `gs://`), else the store's `teacher`, else
    trained now (cross-entropy with `method.teacher_optim`) and saved in the store."""
    external, model = self.mcfg.teacher_workdir, self.networks['teacher']
    if external:
      teacher, meta = method_store.load_network(external, model, ctx.mesh)
    elif ctx.store.has_network(TEACHER):
      teacher, meta = ctx.store.load_network(TEACHER, model, ctx.mesh)
    else:
      return self._train_teacher(ctx)
    check_teacher_meta(meta, self.mcfg.teacher_model, ctx, external or ctx.store.location(TEACHER))
    return teacher

  def _train_teacher(self, ctx: TaskContext) -> dict:
    """The teacher trained on every class with cross-entropy (its own model and optimiser), saved in the store."""
    config = _sub_config(ctx.config, method=ml_collections.ConfigDict({'name': 'finetune', 'aux_losses': {}}),
                         model=self.mcfg.teacher_model, optim=self.mcfg.teacher_optim)
    supervised = Finetune(config, self.num_classes, self.image_shape)
    state = ctx.train_subnetwork(supervised, supervised.model, 'teacher', config.optim, ctx.seen_class_indices(),
                                 seed_offset=1000)
    ctx.store.save_network(TEACHER, state, config, ctx.scenario.order, ctx.scenario.num_classes)
    return snapshot(state)

  def loss(self, outputs, batch, task, teacher, params):
    weights = batch.get('weight')
    ce = masked_mean(cross_entropy(outputs['logits'], batch['label'], task.seen), weights)
    if teacher is None:
      return ce, {'ce': ce}
    t, alpha = float(self.mcfg.kd_temperature), float(self.mcfg.kd_alpha)
    kd = t * t * masked_mean(kd_kl(outputs['logits'], teacher['logits'], t, task.seen), weights)
    return (1.0 - alpha) * ce + alpha * kd, {'ce': ce, 'kd': kd}


# ---- IE-KD -------------------------------------------------------------------------------------------
def iekd_loss(mcfg, outputs: dict, labels: jax.Array, class_mask: jax.Array, teacher_factor,
              weights: jax.Array | None = None) -> tuple:
  """CE + inherit_weight * L_inh(F_inh, F_T) + explore_weight * L_exp(F_exp, F_T) (IE-KD, the student's total
  loss; `losses.iekd`), with the measures `method.inherit_measure` / `method.explore_measure`; each term the mean
  over the batch's real examples (`weights` [B], 0 for padding; None: every example)."""
  ce = masked_mean(cross_entropy(outputs['logits'], labels, class_mask), weights)
  if teacher_factor is None:
    return ce, {'ce': ce}
  inh = masked_mean(inheritance_loss(outputs['factor_inherit'], teacher_factor, mcfg.inherit_measure), weights)
  exp = masked_mean(exploration_loss(outputs['factor_explore'], teacher_factor, mcfg.explore_measure), weights)
  loss = ce + float(mcfg.inherit_weight) * inh + float(mcfg.explore_weight) * exp
  return loss, {'ce': ce, 'inherit': inh, 'explore': exp}


def _student_extension(mcfg, factor_dim: int) -> Callable:
  def extend(classifier, rngs):
    return IEStudent(classifier, factor_dim, mcfg.split, int(mcfg.split_seed), rngs=rngs)
  return extend


class IEKD(KD):
  """IE-KD (IE-FT form). Before the student trains, the teacher's factor autoencoder (`models.factor`) is
  trained for `autoencoder_optim.epochs` on the frozen teacher's last-stage feature maps with the
  `method.reconstruction` loss ('l1' as the release, or 'l2' as the paper), then frozen. The student's last-stage
  map is split along channels (`method.split`: 'natural' halves, or a 'random' split seeded by `split_seed`);
  its inheritance and exploration halves are encoded by two trainable encoders (part of the student's
  parameters) and trained with `iekd_loss` against the teacher's factor (inference mode, no gradient).
  """

  def student_networks(self, num_classes, image_shape, teacher) -> dict:
    """The student with its two encoders (`model`) and the teacher's factor autoencoder (`autoencoder`)."""
    channels, rate, seed = teacher.embedding_dim, float(self.mcfg.factor_rate), int(self.config.seed)
    autoencoder = functional_model(
        lambda: FactorAutoencoder(channels, rate, rngs=nnx.Rngs(params=jax.random.key(seed, impl='rbg'))),
        {}, 0, factor_channels(channels, rate))
    student = build_model(self.config.model, num_classes, image_shape, seed=self.config.seed,
                          extend=_student_extension(self.mcfg, factor_channels(channels, rate)))
    return {'model': student, 'autoencoder': autoencoder}

  def before_task(self, ctx: TaskContext) -> TaskContext:
    ctx = super().before_task(ctx)
    return ctx.replace(frozen={**ctx.frozen, 'autoencoder': self.teacher_autoencoder(ctx)})

  def teacher_autoencoder(self, ctx: TaskContext) -> dict:
    """The trained paraphraser of the teacher's features: the store's `teacher_autoencoder`, else trained now and
    saved in the store."""
    if ctx.store.has_network(AUTOENCODER):
      return ctx.store.load_network(AUTOENCODER, self.networks['autoencoder'], ctx.mesh)[0]
    method = _ReconstructTeacherFeatures(ctx.config, self.networks['teacher'], self.networks['autoencoder'],
                                         self.mcfg.reconstruction)
    state = ctx.train_subnetwork(method, method.model, 'teacher_autoencoder', self.mcfg.autoencoder_optim,
                                 ctx.seen_class_indices(), frozen=ctx.frozen['teacher'], seed_offset=1001)
    ctx.store.save_network(AUTOENCODER, state, ctx.config, ctx.scenario.order, ctx.scenario.num_classes)
    return snapshot(state)

  def teacher_forward(self, model, frozen, images):
    teacher = super().teacher_forward(model, frozen, images)
    ae = frozen['autoencoder']
    factor = self.networks['autoencoder'].apply(ae['params'], ae['batch_stats'], teacher['stages'][-1])[0]['factor']
    return {'logits': teacher['logits'], 'factor': factor}

  def loss(self, outputs, batch, task, teacher, params):
    return iekd_loss(self.mcfg, outputs, batch['label'], task.seen, None if teacher is None else teacher['factor'],
                     batch.get('weight'))


# ---- IE-DML ------------------------------------------------------------------------------------------
def _part_of(opt_state, params: dict, part: str):
  """The optimiser state of params[part]: every dict in `opt_state` keyed like `params` (momentum buffers mirror
  the parameters) replaced by its entry `part`."""
  mirrors = lambda x: isinstance(x, dict) and set(x) == set(params)
  return jax.tree.map(lambda x: x[part] if mirrors(x) else x, opt_state, is_leaf=mirrors)


def _with_part(opt_state, part_state, params: dict, part: str):
  """`opt_state` with the entry `part` of its parameter-mirroring dicts taken from `part_state`."""
  mirrors = lambda x: isinstance(x, dict) and set(x) == set(params)
  return jax.tree.map(lambda x, y: {**x, part: y} if mirrors(x) else y, opt_state, part_state, is_leaf=mirrors)


class IEDML(Method):
  """IE-DML: deep mutual learning (Zhang et al. 2018) in which two peers, trained from scratch, teach each other
  through IE-KD instead of DML's KL term (Huang et al. 2021, Sec. IE-DML). No official code exists; this is the
  implemented procedure. The trained model (`models.factor.MutualPeers`) holds peer A (`model`), peer B
  (`method.peer_model`), each with its inheritance/exploration encoders, and each peer's autoencoder. For every
  batch (one augmentation shared by all steps), with the peers in training mode:

    1. forward peer B; one SGD step of B's autoencoder on the reconstruction loss of B's last-stage map;
    2. one SGD step of peer A (backbone, head, encoders) on `iekd_loss` against B's factor (B's updated
       autoencoder's encoder in inference mode, no gradient);
    3. forward the updated peer A; one SGD step of A's autoencoder on A's map;
    4. one SGD step of peer B on `iekd_loss` against A's factor.

  Each step changes only its part of the parameters and of the momentum buffers (one optimiser, one learning
  rate schedule for all four parts). `method.dml_kl_weight` > 0 adds DML's KL(peer || student) at T=1 to
  steps 2 and 4 (0 by default: IE-KD replaces it). The run evaluates peer `method.eval_peer`.
  """

  def build_networks(self, num_classes, image_shape):
    m = self.mcfg
    peer_cfg = m.peer_model

    def extend(classifier_a, rngs):
      classifier_b = make_classifier(peer_cfg, num_classes, image_shape, rngs)
      return MutualPeers(classifier_a, classifier_b, float(m.factor_rate), m.split,
                         int(m.split_seed), m.eval_peer, rngs=rngs)

    return {'model': build_model(self.config.model, num_classes, image_shape, seed=self.config.seed, extend=extend)}

  def before_task(self, ctx: TaskContext) -> TaskContext:
    _require_single_task(ctx, self.mcfg.name)
    return ctx

  def loss(self, outputs, batch, task, teacher, params):
    """One peer's objective; `teacher` holds the other peer's `factor` and `logits`."""
    weights = batch.get('weight')
    loss, metrics = iekd_loss(self.mcfg, outputs, batch['label'], task.seen, teacher['factor'], weights)
    kl_weight = float(self.mcfg.dml_kl_weight)
    if kl_weight:
      kl = masked_mean(kd_kl(outputs['logits'], teacher['logits'], 1.0, task.seen), weights)
      loss, metrics = loss + kl_weight * kl, {**metrics, 'kl': kl}
    return loss, metrics

  def make_train_step(self, model, phase, augment_fn, has_teacher):
    tx = step_lib.make_optimizer(phase.optim)
    kind = self.mcfg.reconstruction

    def forward(params, stats, part, inputs, train, mask=None):
      module = model.merge(params, stats)
      out = getattr(module, part)(inputs, train=train, mask=mask)
      return out, nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))

    def sgd_on_part(params, stats, opt_state, part, objective, lr):
      """One SGD step of params[part] (and of its optimiser state) on objective(params) -> (loss, (metrics,
      new_stats)); the other parts and their momentum buffers are untouched."""
      grad_fn = jax.value_and_grad(lambda p: objective({**params, part: p}), has_aux=True)
      (_, (metrics, stats)), grads = grad_fn(params[part])
      updates, part_state = tx.update(grads, _part_of(opt_state, params, part), params[part])
      new_part = jax.tree.map(lambda p, u: p - lr * u, params[part], updates)
      return {**params, part: new_part}, stats, _with_part(opt_state, part_state, params, part), metrics

    def train_step(state, frozen, task, batch):
      x = step_lib.augmented_batch(augment_fn, task, state, batch['image'])
      lr = step_lib.learning_rate(phase.optim, task, state.phase_step)
      mask, weights = step_lib.example_mask(batch), batch.get('weight')
      params, stats, opt_state, metrics = state.params, state.batch_stats, state.opt_state, {}
      for student, teacher in (('a', 'b'), ('b', 'a')):
        teacher_out, stats = forward(params, stats, f'peer_{teacher}', x, True, mask)
        feature = jax.lax.stop_gradient(teacher_out['stages'][-1])

        def reconstruct(p, ae=f'autoencoder_{teacher}', feature=feature, stats=stats):
          out, new_stats = forward(p, stats, ae, feature, True, mask)
          rec = masked_mean(reconstruction_loss(out['reconstruction'], feature, kind), weights)
          return rec, ({'reconstruction': rec}, new_stats)

        params, stats, opt_state, m_rec = sgd_on_part(params, stats, opt_state, f'autoencoder_{teacher}',
                                                      reconstruct, lr)
        factor = forward(params, stats, f'autoencoder_{teacher}', feature, False)[0]['factor']
        given = jax.lax.stop_gradient({'factor': factor, 'logits': teacher_out['logits']})

        def learn(p, peer=f'peer_{student}', given=given, stats=stats):
          out, new_stats = forward(p, stats, peer, x, True, mask)
          loss, m = phase.loss(out, batch, task, given, p)
          return loss, ({**m, 'loss': loss}, new_stats)

        params, stats, opt_state, m_peer = sgd_on_part(params, stats, opt_state, f'peer_{student}', learn, lr)
        metrics.update({f'{k}_{student}': v for k, v in m_peer.items()})
        metrics[f'reconstruction_{teacher}'] = m_rec['reconstruction']
      metrics.update(loss=metrics['loss_a'] + metrics['loss_b'], lr=lr)
      return step_lib.advanced(state, params, stats, opt_state), metrics

    return train_step
