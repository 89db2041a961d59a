"""Test-session set-up shared by every test module.

TensorFlow can split the host CPU into logical devices only before it initializes, so the three
logical CPUs that the tf.distribute tests need (2 or 3 replicas) are configured here, once, at
collection time.
"""

import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_seg.quiet import import_tensorflow  # noqa: E402

# TensorFlow's C++ start-up notices are filtered as the commands do: pytest's capture does not hold
# them back in pytest-xdist's workers, which import this file before they capture.
tf = import_tensorflow()

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 3
)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """`../shared/data` beside the checkout; tests that use it skip cleanly where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
