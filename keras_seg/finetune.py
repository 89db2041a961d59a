"""Fine-tuning an ImageNet encoder: which of its variables train, and how far, at each step.

* `--freeze-encoder` (the whole run) and `--freeze-encoder-bn`: Keras' `trainable = False` on the
  encoder's layers (a frozen batch norm also runs in inference mode).
* `--freeze-encoder N` and `--encoder-lr-mult X` act in the step: a factor per trainable variable
  by which `replicas.apply_global_gradients` scales its update (0 during the first N steps, X
  after), and, during the freeze, the encoder's batch-norm statistics put back as they were.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def encoder_layers(model):
    """The model's encoder layers (`encoder_layer_names`, set by the builders with an encoder)."""
    return [model.get_layer(name) for name in getattr(model, "encoder_layer_names", ())]


def freeze_encoder_layers(layers, config, log=print):
    """Apply --freeze-encoder (whole run) and --freeze-encoder-bn to the encoder's layers."""
    for layer in layers:
        if config.freeze_encoder == "all" or (config.freeze_encoder_bn and
                                              isinstance(layer, keras.layers.BatchNormalization)):
            layer.trainable = False
    if config.freeze_encoder == "all":
        log(f"encoder frozen: its {len(layers)} layers keep their weights for the whole run")


def freeze_steps(config) -> int:
    return config.freeze_encoder if isinstance(config.freeze_encoder, int) else 0


def adam_restart_correction(optimizer, steps_since_unfreeze):
    """The factor that turns Adam's update of a variable whose moments started at zero
    `steps_since_unfreeze` steps ago (this one included) into a fresh Adam's.

    Keras' Adam corrects the moments' bias with the optimizer's own step count t: a variable
    whose moments start at zero at step t0 gets `m / sqrt(v)` corrected for t, not for t - t0,
    and moves up to 6.5x as far as a fresh Adam would (10 steps in, with betas 0.9 / 0.999;
    3.2x at 100, 1.3x at 1,000). Keras' step size is `sqrt(1 - b2^t) / (1 - b1^t)`; the
    factor replaces t by k = t - t0.
    """
    inner = optimizer.inner_optimizer if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else optimizer
    t = tf.cast(inner.iterations + 1, tf.float32)
    k = tf.maximum(tf.cast(steps_since_unfreeze, tf.float32), 1.0)
    beta_1, beta_2 = (tf.cast(b, tf.float32) for b in (inner.beta_1, inner.beta_2))

    def step_size(n):
        return tf.sqrt(1.0 - tf.pow(beta_2, n)) / (1.0 - tf.pow(beta_1, n))

    return step_size(k) / step_size(t)


def encoder_update_scales(layers, variables, config, step, optimizer=None):
    """For `variables` (the trainable ones): each one's update factor this step, None for as computed;
    and the `(variable, factor)` pairs of the encoder's batch-norm statistics to keep.

    Called inside the traced step: `step` is the step counter, and the factors are tensors. With
    Adam / AdamW after a freeze of N steps, the encoder's updates are also corrected as if its
    moments were a fresh optimizer's (`adam_restart_correction`; with AdamW the factor scales
    the encoder's decoupled weight decay too).
    """
    steps = freeze_steps(config)
    if not layers or config.freeze_encoder == "all" or (not steps and config.encoder_lr_mult == 1):
        return None, []
    scale = tf.constant(config.encoder_lr_mult, tf.float32)
    kept = []
    if steps:
        frozen = step < steps
        if config.optimizer in ("adam", "adamw") and optimizer is not None:
            scale = scale * adam_restart_correction(optimizer, step - steps + 1)
        scale = tf.where(frozen, 0.0, scale)
        statistics_scale = tf.where(frozen, 0.0, 1.0)
        # The batch norms' moving statistics only (non_trainable_variables also holds dropout seeds).
        kept = [(v, statistics_scale) for layer in layers if isinstance(layer, keras.layers.BatchNormalization)
                for v in (layer.moving_mean, layer.moving_variance)]
    encoder = {id(v) for layer in layers for v in layer.trainable_variables}
    return [scale if id(v) in encoder else None for v in variables], kept
