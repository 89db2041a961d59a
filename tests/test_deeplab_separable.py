"""DeepLabV3+'s default head is segmentation_models_pytorch 0.6.0's, parameter for parameter (issue 20, item 11).

SMP's `DeepLabV3Plus("resnet50", classes=19)` has 26,682,211 parameters (torch's `parameters()`: trainable
ones, batch norms' gamma and beta, no running statistics): torchvision's ResNet-50 without its classifier,
23,508,032, and the head, 3,174,179. Keras' ResNet-50 has a bias in each convolution (26,560 more); the
head must match exactly.
"""

import keras
import numpy as np

from keras_seg.models import build_deeplabv3plus, build_model
from keras_seg.models.presets import recorded_model_config

SMP_DEEPLABV3PLUS_RESNET50_19 = 26_682_211
TORCHVISION_RESNET50_NO_FC = 23_508_032
KERAS_RESNET50_CONV_BIASES = 26_560  # keras.applications' ResNet-50 convolutions have biases, torchvision's not


def trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_default_head_has_smp_parameter_count():
    model = build_deeplabv3plus(19, (64, 64, 3), encoder="resnet50")
    encoder = keras.applications.ResNet50(include_top=False, weights=None)
    assert trainable(encoder) == TORCHVISION_RESNET50_NO_FC + KERAS_RESNET50_CONV_BIASES
    head = trainable(model) - trainable(encoder)
    assert head == SMP_DEEPLABV3PLUS_RESNET50_19 - TORCHVISION_RESNET50_NO_FC
    # separable where SMP is: the dilated ASPP branches, after the projection, the decoder's 3x3
    for name in ("aspp_rate6_conv", "aspp_rate12_conv", "aspp_rate18_conv", "aspp_sep_conv", "decoder_sep_conv"):
        assert isinstance(model.get_layer(name), keras.layers.SeparableConv2D), name
    assert model.get_layer("aspp_rate18_conv").dilation_rate == (18, 18)
    keras.backend.clear_session()


def test_preset_is_separable_and_old_runs_rebuild_plain():
    model = build_model("deeplabv3plus_resnet50", 19, input_size=(64, 64))
    assert isinstance(model.get_layer("decoder_sep_conv"), keras.layers.SeparableConv2D)
    # a run recorded before `separable` existed had the plain head: 40,435,539 weights with BN statistics
    recorded = {"architecture": "deeplabv3plus", "encoder": "resnet50", "output_stride": 16, "aux_weight": 0.4}
    plain = build_model({"model": recorded_model_config(recorded), "input_size": (64, 64)}, 19)
    assert plain.count_params() == 40_435_539
    assert isinstance(plain.get_layer("decoder_conv2_conv"), keras.layers.Conv2D)
    keras.backend.clear_session()
