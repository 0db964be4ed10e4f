"""Losses: pure functions of arrays. Each returns per-example values [B] unless its docstring says otherwise;
`masked_mean` reduces them. Method-specific losses live in their own modules next to these."""
from incremental_jax.losses.classification import cross_entropy, masked_logits, masked_mean, sigmoid_bce
from incremental_jax.losses.distillation import kd_kl
