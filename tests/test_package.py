"""The package root: every public name it lists resolves."""

import keras_seg


def test_every_public_name_resolves():
    for name in keras_seg.__all__:
        assert getattr(keras_seg, name) is not None, name


def test_gpu_install_and_its_docker_image_agree():
    """One documented GPU install: the `gpu` extra brings TensorFlow with CUDA, and Dockerfile.gpu installs it."""
    import configparser
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = configparser.ConfigParser()
    config.read(os.path.join(root, "setup.cfg"))
    gpu = [line.strip() for line in config["options.extras_require"]["gpu"].strip().splitlines()]
    assert gpu == ["tensorflow[and-cuda]>=2.16"]
    with open(os.path.join(root, "Dockerfile.gpu")) as f:
        dockerfile = f.read()
    assert 'pip install --no-cache-dir ".[gpu]"' in dockerfile
    with open(os.path.join(root, "README.md")) as f:
        assert 'pip install -e ".[gpu]"' in f.read()
