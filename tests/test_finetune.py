"""Fine-tuning an ImageNet encoder: --freeze-encoder [N] (and a resume across N), --encoder-lr-mult with
AdamW, --freeze-encoder-bn, the auxiliary head (and its loss weight), --encoder-weights on the command line, and every
architecture's best.keras and export in fresh processes."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seg import train as train_cli
from keras_seg.models.presets import build_model
from keras_seg.training import setup
from keras_seg.training.step import make_train_steps
from keras_seg.training.trainer import Trainer

from test_train import REPO, tiny_data  # noqa: F401 (fixture)
from tiny_run import write_run

# The light encoder preset at the tiny data's size; a small decoder.
LIGHT = ["--preset", "unet_mobilenetv3", "--encoder-weights", "none", "--iters", "2", "--steps-per-call", "1",
         "--no-augment", "--no-export", "--warmup-iters", "0"]


def quiet(_):
    pass


def make_config(data, output, *extra):
    args = train_cli.build_parser().parse_args(
        ["--data", data, "--output", str(output), "--no-progress", "--image-size", "64x128", "--batch-size", "4",
         "--val-batch-size", "4", "--precision", "float32", "--strategy", "one", "--cache", "memory", "--seed", "1",
         *extra])
    config = train_cli.resolve_config(args)
    config.output = str(output)
    config.provenance = {"command": "test"}
    return config


def light_config(data, output, *extra):
    return make_config(data, output, *LIGHT, *extra)


def initial_model(config):
    """The model a run starts from: the trainer's seed, then the build."""
    keras.utils.set_random_seed(config.seed)
    return build_model({"model": config.model, "input_size": tuple(config.image_size)}, 19, with_aux=True)


def split(trainer):
    """(encoder, decoder) trainable variables and the encoder's batch-norm statistics, as arrays."""
    encoder = {layer.name for layer in trainer.encoder_layers}
    model = trainer.train_model
    enc = [v.numpy() for layer in model.layers if layer.name in encoder for v in layer.trainable_variables]
    dec = [v.numpy() for layer in model.layers if layer.name not in encoder for v in layer.trainable_variables]
    stats = [v.numpy() for layer in model.layers if layer.name in encoder for v in layer.non_trainable_variables]
    return enc, dec, stats


def weights_of(model, names, trainable=True):
    return [v.numpy() for layer in model.layers if layer.name in names
            for v in (layer.trainable_variables if trainable else layer.non_trainable_variables)]


def run(config):
    trainer = Trainer(config, log=quiet)
    trainer.run()
    return trainer


@pytest.mark.slow
def test_freeze_encoder_for_n_steps_and_resume_across_n(tiny_data, tmp_path):  # noqa: F811
    common = ["--freeze-encoder", "2", "--optimizer", "sgd", "--learning-rate", "0.05", "--iters", "4",
              "--val-every", "2", "--schedule", "poly"]
    start = initial_model(light_config(tiny_data, tmp_path / "x", *common))
    names = set(start.encoder_layer_names)
    start_enc, start_stats = weights_of(start, names), weights_of(start, names, trainable=False)
    start_dec = [v.numpy() for layer in start.layers if layer.name not in names for v in layer.trainable_variables]

    def stop_at_step_2(line):
        if line.startswith("step 2/"):
            raise KeyboardInterrupt

    interrupted = Trainer(light_config(tiny_data, tmp_path / "interrupted", *common), log=stop_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    enc, dec, stats = split(interrupted)
    assert len(enc + stats) == len(start_enc + start_stats) > 0
    for a, b in zip(enc + stats, start_enc + start_stats):
        np.testing.assert_array_equal(a, b)  # bit-identical through step 2, batch-norm statistics too
    assert max(np.abs(a - b).max() for a, b in zip(dec, start_dec)) > 1e-4  # the decoder trained

    whole = run(light_config(tiny_data, tmp_path / "whole", *common))
    enc4, _, stats4 = split(whole)
    assert max(np.abs(a - b).max() for a, b in zip(enc4, start_enc)) > 1e-4  # changed after step 2
    assert max(np.abs(a - b).max() for a, b in zip(stats4, start_stats)) > 1e-4

    args = train_cli.build_parser().parse_args(["--output", str(tmp_path / "interrupted"), "--resume",
                                                "--no-progress"])
    resumed = run(train_cli.resumed_config(str(tmp_path / "interrupted"), args, []))
    assert int(resumed.step.numpy()) == 4
    assert len(resumed.train_model.get_weights()) == len(whole.train_model.get_weights())
    for a, b in zip(resumed.train_model.get_weights(), whole.train_model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_encoder_lr_mult_scales_the_encoders_adamw_update(tiny_data, tmp_path):  # noqa: F811
    """One AdamW step (weight decay on) from the same weights and batch: the encoder moves 0.1x as far
    with a multiplier of 0.1, the decoder exactly as far."""
    common = ["--optimizer", "adamw", "--learning-rate", "0.01", "--weight-decay", "0.05", "--iters", "1"]
    start_config = light_config(tiny_data, tmp_path / "x", *common)
    start = initial_model(start_config)
    names = set(start.encoder_layer_names)
    start_enc = weights_of(start, names)
    full = split(run(light_config(tiny_data, tmp_path / "one", *common)))
    tenth = split(run(light_config(tiny_data, tmp_path / "tenth", *common, "--encoder-lr-mult", "0.1")))
    assert len(full[0]) == len(tenth[0]) == len(start_enc) and len(full[1]) == len(tenth[1])
    full_delta = [a - b for a, b in zip(full[0], start_enc)]
    tenth_delta = [a - b for a, b in zip(tenth[0], start_enc)]
    scale = max(np.abs(d).max() for d in full_delta)
    assert scale > 1e-4
    for a, b in zip(tenth_delta, full_delta):
        np.testing.assert_allclose(a, 0.1 * b, rtol=0, atol=1e-3 * scale)
    for a, b in zip(tenth[1], full[1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_freeze_encoder_bn_and_whole_run_freeze(tiny_data, tmp_path):  # noqa: F811
    # MobileNetV3's activations are named by a global counter: layers are matched by position.
    start = initial_model(light_config(tiny_data, tmp_path / "x"))
    names = set(start.encoder_layer_names)
    encoder = [i for i, layer in enumerate(start.layers) if layer.name in names and layer.weights]
    bn = [i for i in encoder if isinstance(start.layers[i], keras.layers.BatchNormalization)]
    decoder = [i for i, layer in enumerate(start.layers) if layer.name not in names and layer.weights]

    def moved(model, indices):
        assert all(len(model.layers[i].get_weights()) == len(start.layers[i].get_weights()) for i in indices)
        return max(np.abs(a - b).max() for i in indices
                   for a, b in zip(model.layers[i].get_weights(), start.layers[i].get_weights()))

    trainer = run(light_config(tiny_data, tmp_path / "bn", "--freeze-encoder-bn"))
    assert moved(trainer.train_model, bn) == 0  # gamma, beta and the statistics
    assert moved(trainer.train_model, sorted(set(encoder) - set(bn))) > 1e-5

    frozen = run(light_config(tiny_data, tmp_path / "all", "--freeze-encoder"))
    assert moved(frozen.train_model, encoder) == 0
    assert moved(frozen.train_model, decoder) > 1e-5
    assert frozen.model.get_layer("expanded_conv_6_expand").trainable is False


@pytest.mark.slow
def test_auxiliary_head_trains_and_stays_out_of_the_saved_model(tiny_data, tmp_path):  # noqa: F811
    config = make_config(tiny_data, tmp_path / "dl", "--preset", "deeplabv3plus_resnet50", "--encoder-weights",
                         "none", "--model-arg", "encoder=mobilenetv3large", "--model-arg", "output_stride=32",
                         "--iters", "1", "--no-export", "--no-augment", "--optimizer", "sgd", "--learning-rate", "0.05",
                         "--warmup-iters", "0")
    start = initial_model(config)
    assert len(start.outputs) == 2
    trainer = run(config)
    assert trainer.aux_weight == 0.4
    before, after = start.get_layer("aux_head_conv").get_weights()[0], \
        trainer.train_model.get_layer("aux_head_conv").get_weights()[0]
    assert np.abs(after - before).max() > 1e-5  # the auxiliary loss reaches its head
    saved = keras.saving.load_model(tmp_path / "dl" / "best.keras", compile=False)
    assert len(saved.outputs) == 1 and not any(layer.name.startswith("aux_") for layer in saved.layers)
    # --init-from that run: the model takes its weights; the new auxiliary head starts afresh
    config = make_config(tiny_data, tmp_path / "next", "--preset", "deeplabv3plus_resnet50", "--model-arg",
                         "encoder=mobilenetv3large", "--model-arg", "output_stride=32", "--iters", "1",
                         "--init-from", str(tmp_path / "dl"))
    follower = Trainer(config, log=quiet)
    follower.build()
    follower.load_initial_weights(config.init_from)
    assert len(follower.model.get_weights()) == len(saved.get_weights())
    for a, b in zip(follower.model.get_weights(), saved.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_auxiliary_loss_enters_the_step_at_its_weight(tiny_data, tmp_path):  # noqa: F811
    """One step of plain SGD (its first: no momentum yet; no weight decay, no clipping, no dropout) on
    a known batch. The loss the step returns is main + 0.4 x auxiliary, the two computed apart on the
    starting weights; the auxiliary classifier, which only the auxiliary loss reaches, moves by
    -lr x 0.4 x that loss's own gradient."""
    config = make_config(tiny_data, tmp_path / "dl", "--preset", "deeplabv3plus_resnet50", "--encoder-weights",
                         "none", "--model-arg", "encoder=mobilenetv3large", "--model-arg", "output_stride=32",
                         "--model-arg", "dropout=0", "--iters", "1", "--no-export", "--no-augment", "--optimizer",
                         "sgd", "--learning-rate", "0.05", "--schedule", "constant", "--warmup-iters", "0",
                         "--weight-decay", "0", "--clipnorm", "0")
    trainer = Trainer(config, log=quiet)
    state = trainer.build()
    datasets = setup.build_datasets(config, trainer.shape, trainer.strategy, 0)
    train_steps = make_train_steps(state, config, trainer.strategy)
    model = trainer.train_model
    images, masks = next(iter(datasets.train))
    start = model.get_weights()
    classifier = model.get_layer("aux_scores").kernel
    with tf.GradientTape(persistent=True) as tape:
        logits, aux_logits = model(images, training=True)
        main, aux = state.loss_fn(masks, logits), state.loss_fn(masks, aux_logits)
    aux_gradient = tape.gradient(aux, classifier).numpy()
    assert tape.gradient(main, classifier) is None  # the main loss does not reach it
    before = classifier.numpy()
    model.set_weights(start)  # the forward pass above moved the batch-norm statistics

    loss = float(train_steps(iter(tf.data.Dataset.from_tensors((images, masks)).repeat()), tf.constant(1)))
    assert trainer.aux_weight == 0.4
    assert loss == pytest.approx(float(main) + 0.4 * float(aux), rel=1e-5)
    # The preset's SGD recipe scales the rate to the batch: 0.05 x 4 / 8.
    assert trainer.shape.learning_rate == pytest.approx(0.025)
    expected = -0.025 * 0.4 * aux_gradient
    assert np.abs(expected).max() > 1e-6
    np.testing.assert_allclose(classifier.numpy() - before, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("argv, message", [
    (["--preset", "unet_small", "--freeze-encoder"], "--freeze-encoder: preset unet_small's model has no ImageNet "
                                                     "encoder"),
    (["--preset", "unet_small", "--encoder-weights", "imagenet"], "--encoder-weights: preset unet_small's model"),
    (["--preset", "unet_resnet50", "--encoder-weights", "missing_notop.h5"],
     "encoder weights missing_notop.h5: no such file (expected ResNet50 include_top=False weights"),
    (["--preset", "unet_resnet50", "--freeze-encoder", "-3"], "expected a step count >= 0, got -3"),
    (["--preset", "unet_resnet50", "--encoder-lr-mult", "-1"], "--encoder-lr-mult"),
    (["--preset", "unet_resnet50", "--freeze-encoder", "--encoder-lr-mult", "0.1"],
     "--freeze-encoder for the whole run leaves nothing for --encoder-lr-mult"),
    (["--preset", "unet_resnet50", "--init-from", "runs/earlier", "--encoder-weights", "none"],
     "--init-from gives the whole model its weights: leave out --encoder-weights"),
])
def test_encoder_flags_give_one_line_errors(argv, message, tiny_data, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main([*argv, "--data", tiny_data, "--output", str(tmp_path / "run"), "--iters", "1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error, error
    assert not (tmp_path / "run").exists()


def test_init_from_records_that_no_encoder_weights_were_loaded(tiny_data, tmp_path):  # noqa: F811
    # The preset's default is ImageNet weights; the run starts from another run's weights instead.
    assert make_config(tiny_data, tmp_path / "a", "--preset", "unet_resnet50").encoder_weights == "imagenet"
    config = make_config(tiny_data, tmp_path / "b", "--preset", "unet_resnet50", "--init-from", str(tmp_path / "run"))
    assert config.encoder_weights is None and config.to_dict()["encoder_weights"] is None


def test_a_wrong_weights_file_is_refused_before_the_run_starts(tiny_data, tmp_path, capsys):  # noqa: F811
    wrong = str(tmp_path / "vgg16.weights.h5")
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(wrong)
    with pytest.raises(SystemExit):
        train_cli.main(["--preset", "unet_resnet50", "--encoder-weights", wrong, "--data", tiny_data, "--output",
                        str(tmp_path / "run"), "--iters", "1"])
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"encoder weights {wrong}: not ResNet50 include_top=False weights" in error[0]
    assert not (tmp_path / "run").exists()


# Loads best.keras in safe mode in a fresh process; compares with the export's bare-model signature.
ROUND_TRIP = r"""
import sys, json
import numpy as np
import keras, tensorflow as tf
import keras_seg.models  # registers keras-seg's layers
run, export = sys.argv[1:3]
model = keras.saving.load_model(run + "/best.keras", compile=False, safe_mode=True)
x = np.random.default_rng(0).random((1, 64, 128, 3)).astype("float32")
ours = tf.nn.softmax(model(x, training=False)).numpy()
served = tf.saved_model.load(export).signatures["model_probabilities"](images=tf.constant(x))["probabilities"].numpy()
print(json.dumps({"max_difference": float(np.abs(ours - served).max()), "shape": list(served.shape)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("model", [
    {"architecture": "deeplabv3plus", "encoder": "resnet50", "output_stride": 16, "aux_weight": 0.4},
    {"architecture": "unet", "encoder": "efficientnetv2b0", "decoder_filters": [32, 16, 16, 8, 8]},
    {"architecture": "fcn", "backbone": "vgg16", "head": "8s", "fc_filters": 16, "fc_kernel": 1,
     "preprocessing": "caffe"},
])
def test_best_keras_loads_in_a_fresh_process_and_its_export_round_trips(model, tmp_path):
    run_dir = write_run(tmp_path / "run", model=model, preset="custom")
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    exported = subprocess.run([sys.executable, "-m", "keras_seg.export", "--run", run_dir, "--output",
                               str(tmp_path / "models"), "--name", "m"], capture_output=True, text=True,
                              timeout=300, env=env)
    assert exported.returncode == 0, exported.stderr[-2000:]
    script = tmp_path / "round_trip.py"
    script.write_text(ROUND_TRIP)
    done = subprocess.run([sys.executable, str(script), run_dir, str(tmp_path / "models" / "m" / "1")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["shape"] == [1, 64, 128, 19]
    assert report["max_difference"] < 1e-5
