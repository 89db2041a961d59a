"""The trainer's step against the same UNet trained in PyTorch, side by side on this machine.

One process trains `unet_small` (a stride-2 stem, 4 levels of 16 -> 256 filters, batch norm,
ReLU, transposed-conv up-sampling, logits up-sampled bilinearly x2) on one random batch
(128x256, batch 8, float32, 19 classes, 255 = ignore on some pixels, made once) with Keras /
TensorFlow and, when `torch` imports, the same architecture written in `torch.nn` (NCHW).

Every variant, on both sides, takes the trainer's update: AdamW at lr 1e-3, weight decay 1e-4
on every weight of rank >= 2 (none on biases and batch-norm parameters), gradients clipped to a
global norm of 1.0. The Keras steps are `tf.function`s (XLA with `--jit`), each adding one piece
of the trainer's step (`keras_seg.trainer.Trainer._make_steps`) to the one before:

  keras 1  model + CE (ignore 255), through `replicas.global_batch_loss` / `apply_global_gradients`
  keras 2  + `augment.augment_segmentation`, seeded by the step counter (`AugmentConfig()`)
  keras 3  + CE + Dice with ENet class weights from the batch's pixel counts
  keras 4  + the train mIoU's confusion matrix (`metrics.MeanIoU.update_state`): the trainer's step,
           but for a constant learning rate (the trainer's follows its schedule) and a constant
           batch (the trainer's comes from its input pipeline)
  torch a  model + CE (ignore_index=255)
  torch b  + random horizontal flips per sample, CE + Dice with the same weights and definitions
           as `keras_seg.losses` (the CE sum is divided by the valid pixels, not by their weights),
           and a `bincount` confusion matrix over the valid pixels: the work of keras 4

The PyTorch side flips only, while `AugmentConfig()` also scales, rotates and jitters colours:
`--augment flip` gives the Keras side the same flips alone, for a like-for-like keras 4 / torch b.

After the warm-up steps (the first call traces and compiles), the variants take their timed
steps round-robin, one step each in turn, so that load from other processes on a shared machine
falls on them all alike; each figure is the median over the timed steps. Each Keras step is one
call of its `tf.function` (the trainer runs `steps_per_call` steps in one call).

    python tools/bench_vs_torch.py                        # about 2 minutes on 2 cores
    python tools/bench_vs_torch.py --steps 3 --warmup 1   # a smoke check
    python tools/bench_vs_torch.py --augment flip --jit --only keras

Reading it: the header gives the CPU (bf16 matrix units: avx512_bf16, amx), the versions and the
thread settings; the load average and CPU pressure (the share of time a task waited for a CPU),
before and after, tell whether other work shared the cores: a load above the core count or a
pressure well above 0 makes every figure noisy. PyTorch's OpenMP threads wait for each other at
every operation; spinning while they wait (libgomp spins a while by default), one thread held off
its core stalls them all: on a shared 2-core machine PyTorch's bare step then took anywhere from
0.3 s to 4.5 s. So the script sets `OMP_WAIT_POLICY=PASSIVE` (threads sleep while they wait)
unless the environment sets it; the header shows it. Both parameter counts are printed: the
trainable ones must be equal, or the two models differ. A wide min - max spread of a variant's
steps says its median is not to be trusted. The ratios at the end are Keras img/s / PyTorch
img/s: below 1, the Keras step is the slower one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

# The two runtimes take turns in one process: PyTorch's OpenMP threads must sleep when its step is
# done, not spin, or they compete with the TensorFlow step that follows; under load from other
# processes spinning threads also stall each other (see "Reading it" above). Set before anything
# loads an OpenMP runtime; OMP_WAIT_POLICY=ACTIVE in the environment measures the spinning default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from keras_seg.quiet import import_tensorflow  # noqa: E402

tf = import_tensorflow()

import keras  # noqa: E402

from keras_seg import augment, losses, metrics  # noqa: E402
from keras_seg.config import TrainConfig  # noqa: E402
from keras_seg.labels import IGNORE_INDEX  # noqa: E402
from keras_seg.models.presets import build_model  # noqa: E402
from keras_seg.replicas import apply_global_gradients, global_batch_loss  # noqa: E402
from keras_seg.trainer import build_optimizer  # noqa: E402

try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError:
    torch = None

NUM_CLASSES = 19
LEARNING_RATE = 1e-3
CLIPNORM = 1.0  # the trainer's default (TrainConfig.clipnorm)
IGNORED_FRACTION = 0.05  # of the mask pixels
# unet_small's layers (keras_seg.models.presets), for the PyTorch copy.
DEPTH, BASE_FILTERS, STEM_STRIDE = 4, 16, 2
CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")


# --------------------------------------------------------------------------- the machine


def cpu_model_and_flags():
    """The CPU's model name and flags from /proc/cpuinfo ("unknown" and none elsewhere)."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def print_machine(torch_state):
    model, flags = cpu_model_and_flags()
    present = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS)
    print(f"CPU: {model}, {os.cpu_count()} cores; {present}")
    torch_version = torch.__version__ if torch is not None else "absent"
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, PyTorch {torch_version}")
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    print(f"TF threads: intra-op {intra or 'default'}, inter-op {inter or 'default'} (0 = one per core); "
          f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset (on)')}")
    if torch_state == "run":
        print(f"torch threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op, "
              f"mkldnn {torch.backends.mkldnn.is_available()}")
    environment = ", ".join(f"{name}={os.environ[name]}" for name in THREAD_VARIABLES if name in os.environ)
    print(f"environment: {environment or 'none of ' + ', '.join(THREAD_VARIABLES)}")


def load_now():
    """The load average and, where the kernel reports it, the share of time a task waited for a CPU."""
    text = "load average " + " ".join(f"{load:.2f}" for load in os.getloadavg())
    try:
        with open("/proc/pressure/cpu") as pressure:
            some = dict(field.split("=") for field in pressure.readline().split()[1:])
        text += f", CPU pressure {some['avg10']}% (10 s) {some['avg60']}% (60 s)"
    except (OSError, KeyError, ValueError):
        pass
    return text


# --------------------------------------------------------------------------- the batch


def random_batch(batch, height, width, seed=0):
    """Images in [0, 1] on the uint8 grid [B, H, W, 3], and uint8 masks [B, H, W].

    Classes are drawn with unequal frequencies so that the ENet weights differ between classes;
    a few pixels are ignored.
    """
    rng = np.random.default_rng(seed)
    images = np.round(rng.random((batch, height, width, 3)) * 255.0).astype(np.float32) / 255.0
    frequencies = 1.0 / np.arange(1, NUM_CLASSES + 1)
    masks = rng.choice(NUM_CLASSES, size=(batch, height, width), p=frequencies / frequencies.sum()).astype(np.uint8)
    masks[rng.random(masks.shape) < IGNORED_FRACTION] = IGNORE_INDEX
    return images, masks


def class_pixel_counts(masks):
    return np.bincount(masks[masks != IGNORE_INDEX].ravel(), minlength=NUM_CLASSES)


# --------------------------------------------------------------------------- Keras / TensorFlow

# name -> (augmentation on, loss spec, class weights, confusion matrix on)
KERAS_VARIANTS = {
    "keras 1  model + CE": (False, "ce", None, False),
    "keras 2  + augmentation": (True, "ce", None, False),
    "keras 3  + CE+Dice, ENet weights": (True, "ce+dice", "enet", False),
    "keras 4  + confusion matrix (trainer)": (True, "ce+dice", "enet", True),
    # The trainer's step before its cross-entropy left TF's fused sparse kernel (docs/performance.md).
    "keras 4- before: fused sparse CE": (True, "sparse-ce+dice", "enet", True),
}


class FusedSparseCrossEntropy(losses.CrossEntropyLoss):
    """keras_seg's cross-entropy as it was: TF's SparseSoftmaxCrossEntropyWithLogits, for comparison."""

    def _pixel_losses(self, y_true, y_pred):
        labels, valid, logits = losses._labels_and_logits(y_true, y_pred, self.ignore_index)
        nll = keras.ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        return nll * self._pixel_weights(labels), valid


def build_variant_loss(loss_spec, class_weights, counts):
    if loss_spec != "sparse-ce+dice":
        return losses.build_loss(loss_spec, num_classes=NUM_CLASSES, class_weights=class_weights,
                                 class_pixel_counts=counts)
    weights = losses.compute_class_weights(counts, class_weights)
    return losses.CombinedLoss([(1.0, FusedSparseCrossEntropy(weights)), (1.0, losses.DiceLoss(class_weights=weights))])


def make_keras_step(model, optimizer, loss_fn, augment_config, iou, counter, jit):
    """One compiled training step of `model`, as the trainer's `replica_train_step` on one device.

    `augment_config` and `iou` are None in the variants without augmentation or metric.
    """

    def train_step(images, masks):
        if augment_config is not None:
            # Seeded by the step counter, as in the trainer (seed 0).
            seed = tf.stack([tf.constant(0, tf.int64), counter.read_value()])
            images, masks = augment.augment_segmentation(images, masks, seed, augment_config)
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = global_batch_loss(loss_fn, masks, logits)
        grads = tape.gradient(loss, model.trainable_variables)
        if iou is not None:
            iou.update_state(masks, logits)
        apply_global_gradients(optimizer, grads, model.trainable_variables, CLIPNORM)
        counter.assign_add(1)
        return loss

    return tf.function(train_step, jit_compile=jit)


def keras_parameter_counts(model):
    trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)
    return trainable, model.count_params()


def keras_steps(images, masks, size, augment_config, jit):
    """{variant name: a callable running one step and returning its loss}, and the model."""
    keras.utils.set_random_seed(0)
    model = build_model("unet_small", NUM_CLASSES, input_size=size)
    # The trainer's optimizer: its clipping is left to apply_global_gradients, as in the trainer.
    optimizer = build_optimizer(TrainConfig(), LEARNING_RATE, model.trainable_variables, clip=False)
    optimizer.build(model.trainable_variables)
    counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    counts = class_pixel_counts(masks)
    images, masks = tf.constant(images), tf.constant(masks)
    steps = {}
    for name, (augmented, loss_spec, class_weights, with_iou) in KERAS_VARIANTS.items():
        loss_fn = build_variant_loss(loss_spec, class_weights, counts)
        iou = metrics.MeanIoU(NUM_CLASSES) if with_iou else None
        step = make_keras_step(model, optimizer, loss_fn, augment_config if augmented else None, iou, counter, jit)
        steps[name] = lambda step=step: float(step(images, masks))
    return steps, model


# --------------------------------------------------------------------------- PyTorch


def torch_conv_bn_relu(in_channels, out_channels, stride=1):
    """Keras' conv_bn_activation: a bias-free 3x3 convolution, batch norm with Keras' defaults, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        # Keras' BatchNormalization: epsilon 1e-3, moving averages kept with momentum 0.99.
        nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.01),
        nn.ReLU(inplace=True),
    )


def torch_conv_block(in_channels, out_channels):
    return nn.Sequential(torch_conv_bn_relu(in_channels, out_channels), torch_conv_bn_relu(out_channels, out_channels))


def build_torch_unet(num_classes, depth=DEPTH, base_filters=BASE_FILTERS, stem_stride=STEM_STRIDE):
    """keras_seg.models.unet.build_unet's layers for unet_small, in torch.nn; run by `torch_unet_forward`."""
    filters = [base_filters * 2**level for level in range(depth + 1)]
    return nn.ModuleDict({
        "stem": torch_conv_bn_relu(3, base_filters, stride=stem_stride),
        "down": nn.ModuleList(torch_conv_block(filters[max(level - 1, 0)], filters[level]) for level in range(depth)),
        "bottleneck": torch_conv_block(filters[depth - 1], filters[depth]),
        # up[level] brings level + 1 to level: a 2x2 transposed convolution (with bias), then the
        # block over [skip, up-sampled] concatenated in that order.
        "transpose": nn.ModuleList(nn.ConvTranspose2d(filters[level + 1], filters[level], 2, stride=2)
                                   for level in range(depth)),
        "up": nn.ModuleList(torch_conv_block(2 * filters[level], filters[level]) for level in range(depth)),
        "logits": nn.Conv2d(base_filters, num_classes, 1),
    })


def torch_unet_forward(unet, images, stem_stride=STEM_STRIDE):
    x = unet["stem"](images)
    skips = []
    for block in unet["down"]:
        x = block(x)
        skips.append(x)
        x = F.max_pool2d(x, 2)
    x = unet["bottleneck"](x)
    for level in reversed(range(len(skips))):
        x = unet["transpose"][level](x)
        x = unet["up"][level](torch.cat([skips[level], x], dim=1))
    # Keras' bilinear UpSampling2D samples at half-pixel centres, as align_corners=False does.
    return F.interpolate(unet["logits"](x), scale_factor=stem_stride, mode="bilinear", align_corners=False)


def torch_parameter_counts(unet):
    trainable = sum(parameter.numel() for parameter in unet.parameters())
    # Keras counts the batch norm's moving mean and variance too; num_batches_tracked has no Keras twin.
    moving_statistics = sum(buffer.numel() for name, buffer in unet.named_buffers() if "running_" in name)
    return trainable, trainable + moving_statistics


def torch_adamw(unet):
    """The trainer's AdamW (keras_seg.trainer.build_optimizer): no weight decay on rank <= 1, Keras' epsilon."""
    config = TrainConfig()
    decayed = [parameter for parameter in unet.parameters() if parameter.ndim > 1]
    not_decayed = [parameter for parameter in unet.parameters() if parameter.ndim <= 1]
    groups = [{"params": decayed, "weight_decay": config.weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LEARNING_RATE, eps=1e-7)


def torch_cross_entropy(logits, masks, class_weights=None):
    """keras_seg's CrossEntropyLoss: the (weighted) sum over the valid pixels / their number."""
    total = F.cross_entropy(logits, masks, weight=class_weights, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (masks != IGNORE_INDEX).sum().clamp_min(1)


def torch_dice(logits, masks, class_weights, smooth=1.0):
    """keras_seg's DiceLoss: 1 - weighted mean over classes of the soft Dice over the batch's valid pixels."""
    valid = (masks != IGNORE_INDEX).unsqueeze(1).float()
    labels = torch.where(masks != IGNORE_INDEX, masks, 0)
    probabilities = logits.softmax(dim=1) * valid
    # One-hot as float32 NCHW directly: F.one_hot would make an int64 NHWC tensor to permute and cast.
    targets = torch.zeros_like(probabilities).scatter_(1, labels.unsqueeze(1), 1.0) * valid
    pixel_axes = (0, 2, 3)
    intersection = (probabilities * targets).sum(pixel_axes)
    cardinality = probabilities.sum(pixel_axes) + targets.sum(pixel_axes)
    dice = (2.0 * intersection + smooth) / (cardinality + smooth)
    return 1.0 - (class_weights * dice).sum() / class_weights.sum().clamp_min(1e-12)


def random_horizontal_flips(images, masks):
    flip = torch.rand(images.shape[0]) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
    return images, masks


def update_confusion(confusion, masks, logits):
    valid = masks != IGNORE_INDEX
    cells = masks[valid] * NUM_CLASSES + logits.argmax(dim=1)[valid]
    confusion += torch.bincount(cells, minlength=NUM_CLASSES**2).view(NUM_CLASSES, NUM_CLASSES)


def torch_update(unet, optimizer, loss):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(unet.parameters(), CLIPNORM)
    optimizer.step()


def torch_steps(images, masks, channels_last):
    """{variant name: a callable running one step and returning its loss}, and the model."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    unet = build_torch_unet(NUM_CLASSES).to(memory_format=memory_format).train()
    optimizer = torch_adamw(unet)
    class_weights = torch.from_numpy(losses.compute_class_weights(class_pixel_counts(masks), "enet"))
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(masks).long()

    def bare_step():
        logits = torch_unet_forward(unet, images.contiguous(memory_format=memory_format))
        loss = torch_cross_entropy(logits, masks)
        torch_update(unet, optimizer, loss)
        return loss.item()

    def trainer_like_step():
        flipped_images, flipped_masks = random_horizontal_flips(images, masks)
        logits = torch_unet_forward(unet, flipped_images.contiguous(memory_format=memory_format))
        cross_entropy = torch_cross_entropy(logits, flipped_masks, class_weights)
        loss = cross_entropy + torch_dice(logits, flipped_masks, class_weights)
        torch_update(unet, optimizer, loss)
        with torch.no_grad():
            update_confusion(confusion, flipped_masks, logits)
        return loss.item()

    return {"torch a  model + CE": bare_step, "torch b  flips, CE+Dice, confusion matrix": trainer_like_step}, unet


# --------------------------------------------------------------------------- timing


def time_round_robin(steps, warmup, timed):
    """Seconds of the first call and of each timed step, per variant: {name: (first, [seconds, ...])}."""
    first = {}
    for name, step in steps.items():
        started = time.perf_counter()
        step()  # a Keras step traces and compiles on its first call
        first[name] = time.perf_counter() - started
        for _ in range(warmup - 1):
            step()
    seconds = {name: [] for name in steps}
    for _ in range(timed):
        for name, step in steps.items():
            started = time.perf_counter()
            step()  # returns a Python float: the step has finished
            seconds[name].append(time.perf_counter() - started)
    return {name: (first[name], seconds[name]) for name in steps}


def print_results(results, batch):
    """One line per variant: first call, median ms/step and img/s, and the spread of the timed steps."""
    print(f"{'variant':<44}{'first call s':>13}{'ms/step':>10}{'img/s':>9}   min - max ms")
    throughput = {}
    for name, (first, seconds) in results.items():
        median = statistics.median(seconds)
        throughput[name] = batch / median
        spread = f"{1000 * min(seconds):.0f} - {1000 * max(seconds):.0f}"
        print(f"{name:<44}{first:>13.1f}{1000 * median:>10.1f}{batch / median:>9.2f}   {spread}")
    return throughput


def print_ratio(throughput, keras_prefix, torch_prefix):
    keras_name = next((name for name in throughput if name.startswith(keras_prefix)), None)
    torch_name = next((name for name in throughput if name.startswith(torch_prefix)), None)
    if keras_name and torch_name:
        ratio = throughput[keras_name] / throughput[torch_name]
        print(f"{keras_prefix.title()} / {torch_prefix.replace('torch', 'PyTorch')} img/s: {ratio:.3f}")


# --------------------------------------------------------------------------- main


def parse_size(text):
    height, _, width = text.lower().partition("x")
    return int(height), int(width)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant, the first compiles (>= 1)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=parse_size, default=(128, 256), help="HxW, multiples of 32")
    parser.add_argument("--jit", action="store_true", help="compile the Keras steps with XLA")
    parser.add_argument("--only", choices=("keras", "torch"), help="run one side only")
    parser.add_argument("--augment", choices=("default", "flip"), default="default",
                        help="Keras augmentation: AugmentConfig() or horizontal flips only (as the PyTorch side)")
    parser.add_argument("--channels-last", action="store_true", help="PyTorch in channels_last memory format")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (the first warm-up step compiles)")
    return args


def main():
    args = parse_args()
    if args.only == "keras":
        torch_state = "not run (--only keras)"
    elif torch is None:
        torch_state = "absent, skipped"
    else:
        torch_state = "run"
        torch.set_num_threads(os.cpu_count())
    print_machine(torch_state)
    height, width = args.size
    augment_config = augment.AugmentConfig() if args.augment == "default" else augment.AugmentConfig.disabled(
        flip_prob=0.5)
    torch_setting = ("channels_last" if args.channels_last else "NCHW") if torch_state == "run" else torch_state
    print(f"unet_small {height}x{width}, batch {args.batch}, float32, {NUM_CLASSES} classes; Keras step "
          f"{'XLA' if args.jit else 'tf.function'}, augmentation {args.augment}; PyTorch {torch_setting}")
    print(f"{args.warmup} warm-up and {args.steps} timed steps per variant; {load_now()} (before)")

    images, masks = random_batch(args.batch, height, width)
    steps, counts = {}, []
    if args.only != "torch":
        keras_variant_steps, model = keras_steps(images, masks, (height, width), augment_config, args.jit)
        steps.update(keras_variant_steps)
        counts.append(("Keras", keras_parameter_counts(model)))
    if torch_state == "run":
        torch_variant_steps, unet = torch_steps(images, masks, args.channels_last)
        steps.update(torch_variant_steps)
        counts.append(("PyTorch", torch_parameter_counts(unet)))
    for side, (trainable, total) in counts:
        print(f"{side} parameters: {trainable:,} trainable, {total:,} with the batch-norm statistics")

    results = time_round_robin(steps, args.warmup, args.steps)
    throughput = print_results(results, args.batch)
    print_ratio(throughput, "keras 4", "torch b")
    print_ratio(throughput, "keras 1", "torch a")
    print(load_now() + " (after)")


if __name__ == "__main__":
    main()
