"""tools/train_on_device.sh end to end on the CPU (DEVICE=cpu, tiny crops): the script that a
GPU session runs on a lent machine whose time is scarce must work the first time.

One run goes through a fresh start and a cold resume (a new machine: only the light-checkpoint
parts that came back, carried in again; the warm resume from runs/fcn/last.pt is train()'s exact
resume, tested in test_fcn.py). What comes back must obey the device tool's limits (<= 8 files of <= 16 MiB, plain
names), and the joined weights parts must load with ``load_pretrained``.
"""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from ectfast.nets import data as D
from ectfast.nets.model import load_pretrained, read_weights

from test_fcn import synthetic_crops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "train_on_device.sh")
NAME = re.compile(r"^[A-Za-z0-9._-]+$")

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "split", "timeout", "python3")),
                                reason="needs bash, coreutils split/timeout and python3")


def _run(env, **kw):
    e = {**os.environ, **env, "OMP_NUM_THREADS": "1"}
    e.pop("PYTHONPATH", None)  # the script sets its own
    return subprocess.run(["bash", SCRIPT], env={**e, **{k: str(v) for k, v in kw.items()}},
                          capture_output=True, text=True, timeout=300)


def _check_out(out):
    files = sorted(os.listdir(out))
    assert len(files) <= 8, files
    for f in files:
        assert NAME.match(f) and os.path.isfile(os.path.join(out, f)), f
        assert os.path.getsize(os.path.join(out, f)) <= 16 * 2**20, f
    return files


def _join(out, stem, dest):
    parts = sorted(f for f in os.listdir(out) if f.startswith(stem + ".part-"))
    with open(dest, "wb") as w:
        for p in parts:
            with open(os.path.join(out, p), "rb") as r:
                w.write(r.read())
    return parts


def test_train_on_device_fresh_then_cold(pdm, tmp_path):
    packed = tmp_path / "p.npz"
    D.pack(str(packed), synthetic_crops(pdm), synthetic_crops(pdm, 4, seed=1), quality=95)
    run, carried = tmp_path / "run", tmp_path / "ckpt"
    env = dict(PACKED=str(packed), RUN=str(run), CARRIED=str(carried), DEVICE="cpu", BS="4",
               INPUT_SIZE="32", WORKERS="1")  # 8 faces / 4 = 2 steps per epoch

    # fresh: EPOCHS=auto cannot time a GPU here and says so; stops at MAX_STEPS
    r1 = _run(env, OUT=tmp_path / "o1", MAX_STEPS=1)
    assert r1.returncode == 0, r1.stdout[-2000:] + r1.stderr[-2000:]
    assert "EPOCHS=auto without a GPU" in r1.stderr and "starting a new run" in r1.stdout
    files = _check_out(tmp_path / "o1")
    assert {"light.pt.part-00", "light.pt.part-01", "fcn_300w.pt.part-00", "train.log", "log.jsonl"} <= set(files)
    assert (run / "last.pt").is_file()

    # warm (runs/.../last.pt still there: exact resume; tested at the train() level in test_fcn.py):
    # here only the cold path, the one that needs the script's own logic
    # cold: a fresh machine with only the carried light parts
    carried.mkdir()
    for f in os.listdir(tmp_path / "o1"):
        if f.startswith("light.pt.part-"):
            shutil.copy(tmp_path / "o1" / f, carried / f)
    shutil.rmtree(run)
    r3 = _run(env, OUT=tmp_path / "o3")
    assert r3.returncode == 0, r3.stdout[-2000:] + r3.stderr[-2000:]
    assert "cold machine" in r3.stderr and "warm resume" in r3.stdout and "at step 1/4" in r3.stdout
    assert '"stopped": "done"' in r3.stdout
    _check_out(tmp_path / "o3")
    w = str(tmp_path / "fcn_300w.pt")
    assert len(_join(tmp_path / "o3", "fcn_300w.pt", w)) == 2
    model = load_pretrained(w)
    assert model.primary.conv2.weight.dtype == torch.float32
    meta = read_weights(w)["meta"]
    assert meta["step"] == 4 and meta["epochs"] == 2 and meta["input_size"] == 32 and meta["best_step"] == 4
    assert np.isfinite(meta["val_nme_interocular_subpixel"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_train_on_device_refuses_cpu_training(tmp_path):
    packed = tmp_path / "p.npz"
    packed.write_bytes(b"")  # only its presence is checked before the GPU check
    r = _run({}, PACKED=packed, RUN=tmp_path / "run", OUT=tmp_path / "o")
    assert r.returncode == 3 and "refusing to train on the CPU" in r.stderr
    assert not (tmp_path / "run" / "last.pt").exists()
