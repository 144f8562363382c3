"""One run of open_clip's own trainer (``open_clip_train.main``) with distillation from a CLIP
teacher, on a tiny local model and a local image/caption CSV, recording every step's
(contrastive_loss, distill_loss). tests/test_open_clip_trainer.py runs it twice — open_clip's
``DistillClipLoss`` and ``ck.DistillClipLoss`` — and compares the steps. Nothing is downloaded.

    python open_clip_trainer_run.py WORKDIR make-data        # model configs, teacher, CSV
    python open_clip_trainer_run.py WORKDIR train {open_clip|ck} OUT.json
"""
from __future__ import annotations

import json
import os
import sys

import torch

STEPS, BATCH = 10, 8
STUDENT, TEACHER = "ck-tiny-student", "ck-tiny-teacher"


def _tiny_config(embed_dim: int, width: int) -> dict:
    # no dropout anywhere in open_clip's default CLIP towers; 32 px images, one-layer towers
    return {"embed_dim": embed_dim,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": width, "patch_size": 8,
                           "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": width, "heads": 2,
                         "layers": 1}}


def _import_torchvision() -> None:
    """Import torchvision, tolerating one environment quirk: the only torchvision wheel matching
    a CPU torch 2.13 on this project's machines is the CUDA build, whose C++ operators do not load
    on a CPU torch; its ``_meta_registrations`` then fails on ``torchvision::nms``. Declaring the
    two operator schemas it registers fake kernels for lets it import; open_clip's training never
    calls them (detection ops)."""
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _import_torchvision.keep = lib  # the schemas live as long as the library object
    import torchvision  # noqa: F401,F811


def _register_configs(workdir: str) -> None:
    import open_clip
    open_clip.add_model_config(os.path.join(workdir, "configs"))


def make_data(workdir: str) -> None:
    """Model configs (teacher wider, with its own embedding dimension), a random teacher
    checkpoint, and STEPS·BATCH random images with random captions."""
    import numpy as np
    from PIL import Image
    configs = os.path.join(workdir, "configs")
    os.makedirs(configs, exist_ok=True)
    for name, cfg in ((STUDENT, _tiny_config(16, 32)), (TEACHER, _tiny_config(24, 48))):
        with open(os.path.join(configs, name + ".json"), "w") as f:
            json.dump(cfg, f)
    _register_configs(workdir)
    import open_clip
    torch.manual_seed(1)
    teacher = open_clip.create_model(TEACHER)
    torch.save(teacher.state_dict(), os.path.join(workdir, "teacher.pt"))
    rng = np.random.default_rng(0)
    words = ["red", "green", "cat", "dog", "a", "photo", "of", "small", "large", "tree", "car",
             "blue", "house", "river", "two", "three"]
    images = os.path.join(workdir, "images")
    os.makedirs(images, exist_ok=True)
    with open(os.path.join(workdir, "train.csv"), "w") as f:
        f.write("filepath\ttitle\n")
        for i in range(STEPS * BATCH):
            path = os.path.join(images, f"{i}.png")
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
            f.write(f"{path}\t{' '.join(rng.choice(words, size=5))}\n")


class _Recorder(torch.nn.Module):
    """The trainer's loss, passed through, with every step's values kept."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.steps: list = []

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.steps.append([float(out["contrastive_loss"]), float(out["distill_loss"])])
        return out


def train(workdir: str, which: str, out_path: str) -> None:
    _register_configs(workdir)
    import open_clip
    import open_clip_train.main as trainer
    recorders = []

    def create_loss(args):  # open_clip's factory builds its DistillClipLoss with these arguments
        kw = dict(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                  cache_labels=True, rank=args.rank, world_size=args.world_size,
                  use_horovod=args.horovod)
        if which == "ck":
            import contrastive_kernels as ck
            loss = ck.DistillClipLoss(**kw)
        else:
            loss = open_clip.DistillClipLoss(**kw)
        recorders.append(_Recorder(loss))
        return recorders[-1]

    trainer.create_loss = create_loss
    trainer.main([
        "--model", STUDENT, "--distill-model", TEACHER,
        "--distill-pretrained", os.path.join(workdir, "teacher.pt"),
        "--train-data", os.path.join(workdir, "train.csv"), "--dataset-type", "csv",
        "--csv-img-key", "filepath", "--csv-caption-key", "title", "--csv-separator", "\t",
        "--train-num-samples", str(STEPS * BATCH), "--batch-size", str(BATCH), "--epochs", "1",
        "--lr", "1e-3", "--warmup", "2", "--wd", "0.1", "--precision", "fp32", "--device", "cpu",
        "--workers", "0", "--seed", "0", "--save-frequency", "0", "--report-to", "",
        "--log-every-n-steps", "1", "--logs", os.path.join(workdir, "logs-" + which),
        "--name", "run"])
    with open(out_path, "w") as f:
        json.dump(recorders[0].steps, f)


if __name__ == "__main__":
    _import_torchvision()
    workdir, mode = sys.argv[1], sys.argv[2]
    if mode == "make-data":
        make_data(workdir)
    else:
        train(workdir, sys.argv[3], sys.argv[4])
