"""`evaluate` / `predict --tile` with a window the run's model cannot take: one line, exit 2, no traceback
(issue 31 item 9); a window it can take still runs."""

import cv2
import numpy as np
import pytest

from keras_seg import demo, evaluate, predict
from tiny_run import MODEL, write_run

STRIDE = 2 ** MODEL["depth"]  # the tiny U-Net's three 2x2 pools: 8, by hand


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tile")
    data_dir = demo.write_demo_dataset(str(root / "data"), splits={"val": 1}, size=(48, 64), log=lambda _: None)
    photo = root / "photo.png"
    cv2.imwrite(str(photo), np.full((48, 64, 3), 90, np.uint8))
    return {"run": write_run(root / "run"), "data": data_dir, "photo": str(photo), "root": root}


@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize("model", ["run", "best.keras"])
def test_a_window_off_the_stride_is_one_line(setup, command, model, tmp_path, capsys):
    path = setup["run"] if model == "run" else f"{setup['run']}/best.keras"
    where = ["--data", setup["data"]] if command == "evaluate" else ["--input", setup["photo"]]
    main = evaluate.main if command == "evaluate" else predict.main
    with pytest.raises(SystemExit) as exit_info:
        main(["--no-progress", "--model", path, *where, "--output", str(tmp_path / "out"), "--inference", "slide",
              "--tile", f"{STRIDE + 4}x{2 * STRIDE}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == (f"error: --tile 12x16: both sides must be multiples of {STRIDE}, the stride of the unet model "
                   f"of {setup['run']}\n")
    assert not (tmp_path / "out").exists()


def test_a_window_on_the_stride_still_runs(setup, tmp_path):
    assert predict.main(["--no-progress", "--model", setup["run"], "--input", setup["photo"], "--output",
                         str(tmp_path / "out"), "--inference", "slide", "--tile", f"{2 * STRIDE}x{3 * STRIDE}"]) == 0
    assert cv2.imread(str(tmp_path / "out" / "photo_mask.png")).shape[:2] == (48, 64)
