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
    # While a training run goes (not at start-up): tf.distribute's per-device input iterator is a
    # GeneratorDataset, which tf.data's graph rewrites cannot serialize; grappler leaves a while
    # loop's merge with a control input unoptimized. Both are said of TensorFlow's own graphs.
    r"^W\d{4} [\d:.]+\s+\d+ dataset\.cc:\d+\] Input of GeneratorDatasetOp::Dataset will not be optimized "
    r"because the dataset does not implement the AsGraphDefInternal\(\) method needed to apply optimizations\.$",
    r"^W\d{4} [\d:.]+\s+\d+ loop_optimizer\.cc:\d+\] Skipping loop optimization for Merge node with control "
    r"input: \S+$",
    # A budget run's probe times the first val batches of a cached val split, and a slow machine's
    # validations may read only its first batches: by design, so TensorFlow's advice does not apply.
    r"^W\d{4} [\d:.]+\s+\d+ cache_dataset_ops\.cc:\d+\] The calling iterator did not fully read the dataset "
    r"being cached\. In order to avoid unexpected truncation of the dataset, the partially cached contents of the "
    r"dataset +will be discarded\.",
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


# The filter on file descriptor 2 while a run goes: a child process, so that what C++ writes just
# before a crash (abort, a fatal check) still comes out once the parent is gone. It ignores Ctrl-C
# and SIGTERM and ends when the last writer closes the pipe.
_FILTER = r'''
import os, re, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
noise = re.compile(sys.argv[1])
pending = b""
while True:
    if pending and not select.select([0], [], [], 0.05)[0]:
        os.write(2, pending)  # a line still being written (a progress bar): out, after a pause
        pending = b""
        continue
    chunk = os.read(0, 65536)
    if not chunk:
        break
    *lines, pending = re.split(rb"(?<=\n)", pending + chunk)
    kept = b"".join(line for line in lines if not noise.search(line.decode("utf-8", "replace").rstrip("\r\n")))
    if kept:
        os.write(2, kept)
if pending:
    os.write(2, pending)
'''


@contextlib.contextmanager
def native_stderr_filtered_while_running():
    """Within the block, what C++ writes to stderr (file descriptor 2) passes through a filter process
    that drops the notices in `NOISE` line by line and lets everything else through as it comes.

    Python's own `sys.stderr`, when it is the process's stderr, keeps writing there directly (a progress
    bar still sees a terminal). Leaving the block restores file descriptor 2 and waits for the filter
    to pass on what it holds. Where no filter process can start, nothing is filtered."""
    import subprocess

    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen([sys.executable, "-S", "-c", _FILTER, NOISE.pattern], stdin=read_end,
                                 stdout=subprocess.DEVNULL, stderr=saved, close_fds=True)
    except OSError:
        child = None
    finally:
        os.close(read_end)
    if child is None:
        os.close(write_end)
        os.close(saved)
        yield
        return
    python_stderr = sys.stderr
    direct = None
    try:
        if python_stderr.fileno() == 2:
            direct = os.fdopen(os.dup(saved), "w", buffering=1, encoding=python_stderr.encoding,
                               errors=python_stderr.errors)
    except (AttributeError, OSError, ValueError):
        pass  # not the process's stderr (a test's capture): it does not go through file descriptor 2
    os.dup2(write_end, 2)
    os.close(write_end)
    if direct is not None:
        sys.stderr = direct
    try:
        yield
    finally:
        if direct is not None:
            direct.flush()
            sys.stderr = python_stderr
            direct.close()
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer in this process: the filter reads to its end
        os.close(saved)
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # a subprocess still holds the pipe: the filter ends with it


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
