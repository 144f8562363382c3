"""``ck.DistillClipLoss`` inside open_clip's own trainer (``open_clip_train.main``): a tiny local
student and a local random teacher checkpoint (its own embedding dimension), 10 steps of
distillation training on local random images, open_clip's ``DistillClipLoss`` vs ours swapped in
through the trainer's ``create_loss``. Every step's two losses agree to 1e-5 — after the first step
they depend on every earlier step's gradients (student features and ``logit_scale``) too.
Each run is a fresh process (tests/open_clip_trainer_run.py) with the trainer's own imports
(torchvision, ftfy, braceexpand, webdataset), which ``make setup`` puts into .venv/open_clip_trainer,
on its path; nothing is downloaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

RUNNER = os.path.join(os.path.dirname(__file__), "open_clip_trainer_run.py")
TRAINER_SITE = os.environ.get("CK_TRAINER_SITE", os.path.join(sys.prefix, "open_clip_trainer"))

pytestmark = pytest.mark.skipif(
    not os.path.isdir(TRAINER_SITE),
    reason=f"open_clip's trainer needs its imports in {TRAINER_SITE} (make setup installs them)")


def _run(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (TRAINER_SITE, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, RUNNER, *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stderr[-4000:]}"


def test_distill_clip_loss_in_open_clips_trainer(tmp_path):
    work = str(tmp_path)
    _run(work, "make-data")
    steps = {}
    for which in ("open_clip", "ck"):
        out = os.path.join(work, which + ".json")
        _run(work, "train", which, out)
        with open(out) as f:
            steps[which] = json.load(f)
    theirs, ours = steps["open_clip"], steps["ck"]
    assert len(theirs) == len(ours) == 10
    for i, (a, b) in enumerate(zip(ours, theirs)):
        for name, x, y in zip(("contrastive_loss", "distill_loss"), a, b):
            assert abs(x - y) <= 1e-5, f"step {i}: {name} {x} (ck) vs {y} (open_clip)"
    # not vacuous: training moved the losses, and the teacher's term is its own number
    assert max(abs(a[0] - b[0]) for a, b in zip(theirs[1:], theirs[:-1])) > 1e-3
    assert all(abs(c - d) > 1e-3 for c, d in theirs)
