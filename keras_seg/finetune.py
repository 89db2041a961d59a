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


def encoder_update_scales(layers, variables, config, step):
    """For `variables` (the trainable ones): each one's update factor this step, None for as computed;
    and the `(variable, factor)` pairs of the encoder's batch-norm statistics to keep.

    Called inside the traced step: `step` is the step counter, and the factors are tensors.
    """
    steps = freeze_steps(config)
    if not layers or config.freeze_encoder == "all" or (not steps and config.encoder_lr_mult == 1):
        return None, []
    scale = tf.constant(config.encoder_lr_mult, tf.float32)
    kept = []
    if steps:
        frozen = step < steps
        scale = tf.where(frozen, 0.0, scale)
        statistics_scale = tf.where(frozen, 0.0, 1.0)
        kept = [(v, statistics_scale) for layer in layers for v in layer.non_trainable_variables]
    encoder = {id(v) for layer in layers for v in layer.trainable_variables}
    return [scale if id(v) in encoder else None for v in variables], kept
