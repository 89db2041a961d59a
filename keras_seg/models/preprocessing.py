"""Encoder input preprocessing inside the model, as registered layers.

Every keras-seg model takes float images in [0, 1] RGB. ImageNet encoders expect their own
input: VGG16 and ResNet (the "caffe" mode of `keras.applications.imagenet_utils`) take 0-255 BGR
minus the ImageNet channel means; EfficientNetV2, ConvNeXt and MobileNetV3 take 0-255 RGB and
normalise inside. The layers below do these conversions inside the model, so that
pretrained weights see what they were trained on and nothing downstream (data, evaluation,
export) changes. A registered layer, not a `Lambda`: saved models load in safe mode.
"""

from __future__ import annotations

import keras
from keras import ops

# keras.applications.imagenet_utils' "caffe" means, in BGR order.
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="keras_seg")
class CaffePreprocessing(keras.layers.Layer):
    """Images in [0, 1] RGB -> 0-255 BGR minus the ImageNet means (`preprocess_input(255 * x)` of VGG16 / ResNet50)."""

    def call(self, images):
        bgr = ops.flip(ops.cast(images, self.compute_dtype) * 255.0, axis=-1)
        return bgr - ops.convert_to_tensor(IMAGENET_BGR_MEAN, dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="keras_seg")
class ScaleTo255(keras.layers.Layer):
    """Images in [0, 1] -> 0-255, for encoders that normalise inside (their `preprocess_input` is the identity)."""

    def call(self, images):
        return ops.cast(images, self.compute_dtype) * 255.0

    def compute_output_shape(self, input_shape):
        return input_shape
