"""The trainer's step against the same UNet trained in PyTorch, side by side on this machine.

One process trains `unet_small` (a stride-2 stem, 4 levels of 16 -> 256 filters, batch norm,
ReLU, transposed-conv up-sampling, logits up-sampled bilinearly x2) on one random batch
(128x256, batch 8, float32, 19 classes, 255 = ignore on some pixels, made once) with the
trainer's own compiled step and, when `torch` imports, the same architecture written in
`torch.nn` (NCHW).

The Keras side is the step a training run compiles, not a copy of it:
`keras_seg.training.bench.FixedBatchStep` builds it from the config that
`python -m keras_seg.train --preset unet_small --data DIR --precision float32` resolves (the
preset's augmentation, CE + Dice with ENet class weights from the batch's pixel counts, the train
mIoU's confusion matrix, AdamW with the trainer's global-norm clipping and learning-rate
schedule), fed the batch through the strategy. Its lighter variants are the same step with the
train command's overrides; the confusion matrix is part of every one (the real step always keeps
the train mIoU), so the old "keras 4" breakdown, which added it last, is gone:

  keras 1  --no-augment --loss ce --class-weights none: model + CE (+ confusion matrix)
  keras 2  --loss ce --class-weights none: + the preset's augmentation
  keras 3  the preset's step as a run trains it: + CE + Dice with ENet weights
  torch a  model + CE (ignore_index=255): no confusion matrix
  torch b  + random horizontal flips per sample, CE + Dice with the same weights and definitions
           as `keras_seg.losses` (the CE sum is divided by the valid pixels, not by their weights),
           and a `bincount` confusion matrix over the valid pixels: the work of keras 3

Both sides take the run's update: AdamW with the config's weight decay (none on biases and
batch-norm parameters), gradients clipped to the config's global norm (1.0); the Keras side's rate
follows the run's schedule, PyTorch's stays at the config's base rate (the rate costs nothing). The PyTorch side
flips only, while the preset also scales, jitters colours and changes saturation and hue:
`--augment flip` gives the Keras side the same flips alone (`--no-augment --augment
flip_prob=0.5`), for a like-for-like keras 3 / torch b.

After the warm-up steps (the first call traces and compiles), the variants take their timed
steps round-robin, one step each in turn, so that load from other processes on a shared machine
falls on them all alike; each figure is the median over the timed steps. Each Keras step is one
call of the compiled loop running `--steps-per-call` steps (default 1; the trainer runs 10 in a
call, `steps_per_call`), timed per step.

    python tools/bench_vs_torch.py                        # 3 warm-up and 20 timed steps per variant
    python tools/bench_vs_torch.py --steps 3 --warmup 1   # a smoke check
    python tools/bench_vs_torch.py --augment flip --jit --only keras

Reading it: the header gives the CPU (bf16 matrix units: avx512_bf16, amx), whether TensorFlow's
oneDNN kernels are on (keras-seg turns them on unless TF_ENABLE_ONEDNN_OPTS is set), the
versions and the thread settings; the load average and CPU pressure (the share of time a task
waited for a CPU), before and after, tell whether other work shared the cores: a load above the
core count or a pressure well above 0 makes every figure noisy. PyTorch's OpenMP threads wait for
each other at every operation; spinning while they wait (libgomp spins a while by default), one
thread held off its core stalls them all: on a shared 2-core machine PyTorch's bare step then took
anywhere from 0.3 s to 4.5 s. So the script sets `OMP_WAIT_POLICY=PASSIVE` (threads sleep while
they wait) unless the environment sets it; the header shows it. Both parameter counts are
printed: the trainable ones must be equal, or the two models differ. A wide min - max spread of a
variant's steps says its median is not to be trusted. The ratios at the end are Keras img/s /
PyTorch img/s: below 1, the Keras step is the slower one.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import numpy as np

# The two runtimes take turns in one process: PyTorch's OpenMP threads must sleep when its step is
# done, not spin, or they compete with the TensorFlow step that follows; under load from other
# processes spinning threads also stall each other (see "Reading it" above). Set before anything
# loads an OpenMP runtime; OMP_WAIT_POLICY=ACTIVE in the environment measures the spinning default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_seg.quiet import import_tensorflow, native_stderr_filtered_while_running  # noqa: E402  (sets oneDNN's variable first)

tf = import_tensorflow()

import keras  # noqa: E402

from keras_seg import losses  # noqa: E402
from keras_seg.distribute import onednn_state  # noqa: E402
from keras_seg.labels import IGNORE_INDEX  # noqa: E402

try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError:
    torch = None


def load_profile_step():
    """tools/profile_step.py, which holds the real step's helpers (tools/ is not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profile_step.py")
    spec = importlib.util.spec_from_file_location("keras_seg_tools_profile_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


profile_step = load_profile_step()
NUM_CLASSES = profile_step.NUM_CLASSES
PRESET = "unet_small"
# unet_small's layers (keras_seg.models.presets), for the PyTorch copy.
DEPTH, BASE_FILTERS, STEM_STRIDE = 4, 16, 2
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")


# --------------------------------------------------------------------------- the machine


def print_machine(torch_state):
    print(profile_step.cpu_description())
    torch_version = torch.__version__ if torch is not None else "absent"
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, PyTorch {torch_version}")
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    onednn = onednn_state()
    print(f"TF threads: intra-op {intra or 'default'}, inter-op {inter or 'default'} (0 = one per core); "
          f"oneDNN {'on' if onednn['enabled'] else 'off'} ({onednn['why']})")
    if torch_state == "run":
        print(f"torch threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op, "
              f"mkldnn {torch.backends.mkldnn.is_available()}")
    environment = ", ".join(f"{name}={os.environ[name]}" for name in THREAD_VARIABLES if name in os.environ)
    print(f"environment: {environment or 'none of ' + ', '.join(THREAD_VARIABLES)}")


def load_now():
    """The load average and, where the kernel reports it, the share of time a task waited for a CPU."""
    text = profile_step.load_average()
    try:
        with open("/proc/pressure/cpu") as pressure:
            some = dict(field.split("=") for field in pressure.readline().split()[1:])
        text += f", CPU pressure {some['avg10']}% (10 s) {some['avg60']}% (60 s)"
    except (OSError, KeyError, ValueError):
        pass
    return text


def class_pixel_counts(masks):
    return np.bincount(masks[masks != IGNORE_INDEX].ravel(), minlength=NUM_CLASSES)


# --------------------------------------------------------------------------- Keras / TensorFlow: the real step

# name -> the train command's overrides of the preset's step
KERAS_VARIANTS = {
    "keras 1  model + CE, no augmentation": ["--no-augment", "--loss", "ce", "--class-weights", "none"],
    "keras 2  + augmentation": ["--loss", "ce", "--class-weights", "none"],
    "keras 3  + CE+Dice, ENet weights (trainer)": [],
}
FLIPS_ONLY = ["--no-augment", "--augment", "flip_prob=0.5"]


def run_config(size, batch, jit, flips_only, variant=()):
    """The config `keras_seg.train --preset unet_small` resolves with the bench's size, batch and a
    variant's overrides."""
    height, width = size
    overrides = ["--precision", "float32", "--image-size", f"{height}x{width}", "--batch-size", str(batch),
                 *(["--jit"] if jit else []), *(FLIPS_ONLY if flips_only else []), *variant]
    return profile_step.step_config(PRESET, overrides=overrides)


def keras_parameter_counts(model):
    trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)
    return trainable, model.count_params()


def keras_steps(images, masks, configs, steps_per_call):
    """{variant name: a callable running `steps_per_call` real steps}, and one of their models."""
    from keras_seg.training.bench import FixedBatchStep

    steps = {}
    for name, config in configs.items():
        step = FixedBatchStep(config, images, masks, NUM_CLASSES, precision="float32")
        steps[name] = lambda step=step: step(steps_per_call)
    return steps, step.model


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


def torch_adamw(unet, config):
    """The run's AdamW (keras_seg.training.step.build_optimizer): no weight decay on rank <= 1, Keras' epsilon."""
    decayed = [parameter for parameter in unet.parameters() if parameter.ndim > 1]
    not_decayed = [parameter for parameter in unet.parameters() if parameter.ndim <= 1]
    groups = [{"params": decayed, "weight_decay": config.weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, eps=1e-7)


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


def torch_update(unet, optimizer, loss, clipnorm):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(unet.parameters(), clipnorm)
    optimizer.step()


def torch_steps(images, masks, channels_last, config):
    """{variant name: a callable running one step and returning its loss}, and the model; the update is
    `config`'s (the Keras side's run config)."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    unet = build_torch_unet(NUM_CLASSES).to(memory_format=memory_format).train()
    optimizer = torch_adamw(unet, config)
    class_weights = torch.from_numpy(losses.compute_class_weights(class_pixel_counts(masks), "enet"))
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(masks).long()

    def bare_step():
        logits = torch_unet_forward(unet, images.contiguous(memory_format=memory_format))
        loss = torch_cross_entropy(logits, masks)
        torch_update(unet, optimizer, loss, config.clipnorm)
        return loss.item()

    def trainer_like_step():
        flipped_images, flipped_masks = random_horizontal_flips(images, masks)
        logits = torch_unet_forward(unet, flipped_images.contiguous(memory_format=memory_format))
        cross_entropy = torch_cross_entropy(logits, flipped_masks, class_weights)
        loss = cross_entropy + torch_dice(logits, flipped_masks, class_weights)
        torch_update(unet, optimizer, loss, config.clipnorm)
        with torch.no_grad():
            update_confusion(confusion, flipped_masks, logits)
        return loss.item()

    return {"torch a  model + CE": bare_step, "torch b  flips, CE+Dice, confusion matrix": trainer_like_step}, unet


# --------------------------------------------------------------------------- timing


def time_round_robin(steps, warmup, timed, steps_per_call=None):
    """Seconds of the first call and of each timed step, per variant: {name: (first, [seconds, ...])}.

    `steps_per_call` {name: k}: a call of that variant runs k steps (its seconds are per step)."""
    per_call = steps_per_call or {}
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
            seconds[name].append((time.perf_counter() - started) / per_call.get(name, 1))
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


def print_ratio(throughput, keras_prefix, torch_prefix, note=""):
    keras_name = next((name for name in throughput if name.startswith(keras_prefix)), None)
    torch_name = next((name for name in throughput if name.startswith(torch_prefix)), None)
    if keras_name and torch_name:
        ratio = throughput[keras_name] / throughput[torch_name]
        print(f"{keras_prefix.title()} / {torch_prefix.replace('torch', 'PyTorch')} img/s: {ratio:.3f}{note}")


# --------------------------------------------------------------------------- main


def parse_size(text):
    height, _, width = text.lower().partition("x")
    try:
        return int(height), int(width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 128x256, got {text!r}") from None


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant, the first compiles (>= 1)")
    parser.add_argument("--batch", "--batch-size", type=int, default=8)
    parser.add_argument("--size", "--image-size", type=parse_size, default=(128, 256), help="HxW, multiples of 32")
    parser.add_argument("--jit", action="store_true", help="compile the Keras steps with XLA (train --jit)")
    parser.add_argument("--only", choices=("keras", "torch"), help="run one side only")
    parser.add_argument("--augment", choices=("default", "flip"), default="default",
                        help="Keras augmentation: the preset's, or horizontal flips only (as the PyTorch side)")
    parser.add_argument("--steps-per-call", type=int, default=1,
                        help="Keras steps in one call of the compiled loop (the trainer: 10); timed per step")
    parser.add_argument("--channels-last", action="store_true", help="PyTorch in channels_last memory format")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1 or args.batch < 1 or args.steps_per_call < 1:
        parser.error("--steps, --warmup, --batch and --steps-per-call must be >= 1 (the first warm-up step compiles)")
    return args


def main():
    args = parse_args()
    if args.only == "torch" and torch is None:
        sys.exit("bench_vs_torch.py: --only torch, but torch does not import here (pip install torch, CPU build)")
    # tf.distribute's per-device iterator logs a notice at each step's first call: filtered, as train does.
    with native_stderr_filtered_while_running():
        bench(args)


def bench(args):
    height, width = args.size
    # Every config first: a bad size is one line before anything is built.
    configs = {} if args.only == "torch" else {
        name: run_config(args.size, args.batch, args.jit, args.augment == "flip", variant)
        for name, variant in KERAS_VARIANTS.items()}
    trainer_config = run_config(args.size, args.batch, args.jit, args.augment == "flip")
    if args.only == "keras":
        torch_state = "not run (--only keras)"
    elif torch is None:
        torch_state = "absent, skipped"
    else:
        torch_state = "run"
        torch.set_num_threads(os.cpu_count())
    print_machine(torch_state)
    torch_setting = ("channels_last" if args.channels_last else "NCHW") if torch_state == "run" else torch_state
    augmentation = "the preset's" if args.augment == "default" else "flips only"
    print(f"{PRESET} {height}x{width}, batch {args.batch}, float32, {NUM_CLASSES} classes; Keras: the trainer's step "
          f"({'XLA' if args.jit else 'tf.function'}, {args.steps_per_call} a call), augmentation {augmentation}; "
          f"PyTorch {torch_setting}")
    print(f"{args.warmup} warm-up and {args.steps} timed steps per variant; {load_now()} (before)")

    images, masks = profile_step.random_batch(args.batch, height, width)
    steps, counts, per_call = {}, [], {}
    if configs:
        keras_variant_steps, model = keras_steps(images, masks, configs, args.steps_per_call)
        steps.update(keras_variant_steps)
        per_call = {name: args.steps_per_call for name in keras_variant_steps}
        counts.append(("Keras", keras_parameter_counts(model)))
    if torch_state == "run":
        torch_variant_steps, unet = torch_steps(images, masks, args.channels_last, trainer_config)
        steps.update(torch_variant_steps)
        counts.append(("PyTorch", torch_parameter_counts(unet)))
    for side, (trainable, total) in counts:
        print(f"{side} parameters: {trainable:,} trainable, {total:,} with the batch-norm statistics")

    results = time_round_robin(steps, args.warmup, args.steps, per_call)
    throughput = print_results(results, args.batch)
    print_ratio(throughput, "keras 3", "torch b")
    print_ratio(throughput, "keras 1", "torch a", " (keras 1 updates a confusion matrix, torch a does not)")
    print(load_now() + " (after)")


if __name__ == "__main__":
    main()
