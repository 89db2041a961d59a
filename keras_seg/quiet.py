"""A quiet start-up: TensorFlow's native start-up notices kept off stderr, every other line kept.

Importing TensorFlow 2.21 writes from C++, before absl logging is initialised (so that
`TF_CPP_MIN_LOG_LEVEL` cannot hold them back), notices a user can do nothing about: absl's
"All log messages before absl::InitializeLog() is called ...", oneDNN's "custom operations are
on", "Could not find cuda drivers"; and the first look for GPUs on a machine without one logs
"failed call to cuInit". `import_tensorflow` imports TensorFlow and looks for GPUs with the
process's stderr (file descriptor 2, which C++ writes to) sent to a scratch file, then writes
back every line that is not one of those notices: a real warning or error still shows.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

# Lines TensorFlow, absl and CUDA write at start-up on a machine without a GPU (TF 2.21).
NOISE = re.compile("|".join([
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"^I\d{4} [\d:.]+\s+\d+ \S+:\d+\] ",  # absl INFO lines from C++ (oneDNN, cudart stub, CPU features)
    r"Could not find cuda drivers on your machine",
    r"failed call to cuInit",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"TF-TRT Warning: Could not find TensorRT",
    r"This TensorFlow binary is optimized to use available CPU instructions",
    r"^To enable the following instructions: .* rebuild TensorFlow",
    r"computation_placer\.cc.*already registered",
]))


def is_noise(line: str) -> bool:
    return bool(NOISE.search(line))


@contextlib.contextmanager
def native_stderr_filtered():
    """Within the block, stderr (C++ and Python alike) goes to a scratch file; afterwards the lines
    that are not start-up noise are written to stderr, in order."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not is_noise(line)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def import_tensorflow():
    """Import TensorFlow and Keras, and look for GPUs, without the start-up noise; returns `tensorflow`."""
    # Level 1 holds back C++ INFO only: level 2 would also drop TensorFlow's real WARNINGs (such as a
    # cache read in part) for the whole process; start-up's own notices are filtered by line.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with native_stderr_filtered():
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # the cuInit attempt logs here, once
    return tf
