#!/usr/bin/env python
"""Convert a segmentation dataset, as downloaded, into sharded TFRecords.

    python tools/make_tfrecords.py {cityscapes,voc,cityscapes-pairs,folder,tfds} --input DIR --output DIR

See `--help`, and the README's "Converting a dataset" section.
"""

import os
import sys

# Run from a checkout without installing: the repository root holds keras_seg/ and pipelines/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
