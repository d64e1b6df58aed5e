"""The semi-supervised fine-tune stage on real Fashion-MNIST: top-1/top-5 of the final epoch, the official
recipe as defaults, and a run stopped after k optimizer steps resuming to the bit-identical result."""
from __future__ import annotations

import json
import math

import pytest
import torch

from barlow import finetune
from barlow.config import SMOKE_BATCH, SMOKE_FINETUNE_PERCENT, resolve, smoke
from barlow.errors import BadInput
from tests.test_probe import random_backbone
from tests.ranks import run_ranks


class Stop(Exception):
    pass


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared: and one thread keeps CPU sums in one order
    yield
    torch.set_num_threads(before)


def config(every: int = 1, lr_classifier: float = 0.5, epochs: int = 2) -> dict:
    # 10 % of 384 = 38 balanced images; 38 // 16 = 2 steps an epoch
    return resolve("fmnist_r18", {"pretrain": {"init": "random"}, "finetune": {
        "epochs": epochs, "batch_size": 16, "lr_classifier": lr_classifier, "workers": 1,
        "checkpoint_every_steps": every}})


def run(cfg, weights, data, out, states: list | None = None):
    """run_finetune, keeping the model's weights at every evaluation in ``states``."""
    real = finetune.evaluate

    def capture(model, r):
        if states is not None:
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, r)

    finetune.evaluate = capture
    try:
        return finetune.run_finetune(cfg, weights, data["train"], data["val"], out, 10, log=lambda *a: None,
                                     identity={"dataset": "fmnist"})
    finally:
        finetune.evaluate = real


def stop_after(monkeypatch, steps: int) -> None:
    """Raise Stop when a run's optimizer is about to take its (steps + 1)-th step: counted per live optimizer
    (held here, so that a finished run's freed optimizer cannot lend its id and count to the next run's)."""
    real, taken = finetune.train_step, []

    def step(model, opt, x, y):
        entry = next((e for e in taken if e[0] is opt), None)
        if entry is None:
            entry = [opt, 0]
            taken.append(entry)
        entry[1] += 1
        if entry[1] > steps:
            raise Stop
        return real(model, opt, x, y)

    monkeypatch.setattr(finetune, "train_step", step)


def test_defaults_are_the_official_recipe_and_smoke_shrinks_them():
    # facebookresearch/barlowtwins README (8e8d284): python evaluate.py ... --weights finetune --train-perc 1
    # --epochs 20 --lr-backbone 0.005 --lr-classifier 0.5 --weight-decay 0; evaluate.py: --batch-size 256,
    # SGD(momentum=0.9), train percents (100, 10, 1)
    ft = finetune.with_finetune(resolve("imagenet_r50_ep300"))["finetune"]
    assert {k: ft[k] for k in ("fractions", "epochs", "lr_backbone", "lr_classifier", "weight_decay", "batch_size",
                               "momentum", "subset")} == \
        {"fractions": [1, 10], "epochs": 20, "lr_backbone": 0.005, "lr_classifier": 0.5, "weight_decay": 0.0,
         "batch_size": 256, "momentum": 0.9, "subset": "auto"}
    s = finetune.with_finetune(smoke(resolve("imagenet_r50_ep300")))["finetune"]
    assert (s["epochs"], s["batch_size"], s["subset"], s["lr_classifier"]) == (1, SMOKE_BATCH, "balanced", 0.5)
    assert s["fractions"] == [SMOKE_FINETUNE_PERCENT]


def test_the_smoke_fraction_fills_a_batch_of_every_smoke_dataset(tmp_path):
    """A smoke .beton's 40 % is at least one global batch and every class can give its share: the first 64
    Fashion-MNIST images (smoke's limit_train) and the odd ImageNet-style folder of the smoke workflow test."""
    from barlow.config import SMOKE_CONVERT
    from barlow.convert import FashionMNIST
    from barlow.finetune_subset import balanced_indices
    from tests.conftest import FMNIST

    fm = FashionMNIST(FMNIST, "train").labels[:SMOKE_CONVERT["limit_train"]]
    folder = [c for c in range(3) for _ in range(16)]  # write_odd_image_folder: 3 classes x 16
    for labels in (fm, folder):
        assert len(balanced_indices(labels, SMOKE_FINETUNE_PERCENT, 0)) >= SMOKE_BATCH


def test_finetune_writes_final_top1_top5_and_its_subset(fmnist_tiny, tmp_path):
    weights = random_backbone(tmp_path / "backbone.pth")
    out = tmp_path / "ft" / "finetune_10.json"
    states = []
    summary = run(config(every=100), weights, fmnist_tiny, out, states)
    assert json.loads(out.read_text())["top1"] == summary["top1"]
    assert (summary["percent"], summary["fraction"], summary["method"], summary["train_images"]) == (10, 0.1,
                                                                                                     "balanced", 38)
    assert summary["epochs"] == summary["epoch_reported"] == 2 and [h["epoch"] for h in summary["per_epoch"]] == [1, 2]
    final = summary["per_epoch"][-1]
    assert (summary["top1"], summary["top5"]) == (final["top1"], final["top5"])
    for h in summary["per_epoch"]:
        assert 0 <= h["top1"] <= h["top5"] <= 100 and h["top5"] > 0
        assert abs(h["top1"] * 256 / 100 - round(h["top1"] * 256 / 100)) < 0.02  # a count of the 256 val images
    # CosineAnnealingLR(T_max=2) stepped per epoch: epoch 1 at the base lr, epoch 2 at half of it
    assert [h["lr_classifier"] for h in summary["per_epoch"]] == [0.5, pytest.approx(0.5 * (1 + math.cos(math.pi / 2)) / 2)]
    assert [h["lr_backbone"] for h in summary["per_epoch"]] == [0.005, pytest.approx(0.0025)]
    assert summary["best_on_val"]["top1"] == max(h["top1"] for h in summary["per_epoch"])
    sub = json.loads(open(summary["subset_file"]).read())
    assert sub["indices"] and len(sub["indices"]) == 38 and sub["seed"] == 0 and sub["dataset"] == "fmnist"
    assert summary["subset_sha256"] == finetune.file_sha256(summary["subset_file"])
    assert not finetune.checkpoint_path(out).exists()
    # end to end: the backbone trained with BatchNorm in train mode (its running statistics moved), the head too
    loaded = torch.load(weights, weights_only=True)["state_dict"]
    assert not torch.equal(states[-1]["backbone.layer1.0.bn1.running_mean"], loaded["layer1.0.bn1.running_mean"])
    assert not torch.equal(states[-1]["backbone.conv1.weight"], loaded["conv1.weight"])
    assert states[-1]["fc.weight"].shape == (10, 512)
    assert (summary["top1"], summary["top5"]) == _val_accuracy(states[-1], fmnist_tiny["val"])


def _val_accuracy(state: dict, val) -> tuple[float, float]:
    """Top-1/top-5 of the model's weights on val, computed apart from the stage: whole images, the preset's
    normalisation by hand, eval mode, torch's topk."""
    from barlow.loader import make_loader
    from barlow.model import backbone

    model = finetune.Classifier(backbone("resnet18"), 10)
    model.load_state_dict(state)
    model.eval()
    it = iter(make_loader(val, 256, train=False, workers=1, drop_last=False))
    try:
        x, y = next(it)[:2]
    finally:
        it.close()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ([0.286] * 3, [0.353] * 3))  # fmnist_r18's views
    with torch.no_grad():
        top = model((x.float() / 255 - mean) / std).topk(5, 1).indices
    right = top == y.long()[:, None]
    return round(100 * int(right[:, 0].sum()) / 256, 2), round(100 * int(right.any(1).sum()) / 256, 2)


def test_a_stopped_run_resumes_to_the_unbroken_result(fmnist_tiny, tmp_path, monkeypatch):
    weights = random_backbone(tmp_path / "backbone.pth")
    unbroken_states = []
    unbroken = run(config(), weights, fmnist_tiny, tmp_path / "a" / "finetune.json", unbroken_states)

    out = tmp_path / "b" / "finetune.json"
    ckpt = finetune.checkpoint_path(out)
    with monkeypatch.context() as m:
        stop_after(m, 2)  # stops at the first step of epoch 2: the checkpoint is epoch 1's, after its evaluation
        with pytest.raises(Stop):
            run(config(), weights, fmnist_tiny, out)
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 2 and len(state["history"]) == 1 and not out.exists()

    with pytest.raises(BadInput, match=r"finetune.checkpoint.pt: made with another fine-tune config "
                                       r"\(finetune.lr_classifier: 0.5 -> 0.1\)") as e:
        run(config(lr_classifier=0.1), weights, fmnist_tiny, out)
    assert "\n" not in str(e.value)
    with pytest.raises(BadInput, match=r"finetune.checkpoint.pt: made for other backbone weights"):
        run(config(), _other(tmp_path), fmnist_tiny, out)

    with monkeypatch.context() as m:
        stop_after(m, 1)  # one more step (mid-epoch 2, checkpointed: every step), then stopped
        with pytest.raises(Stop):
            run(config(every=1), weights, fmnist_tiny, out)
    assert torch.load(ckpt, weights_only=True)["step"] == 3

    states = []
    resumed = run(config(every=5), weights, fmnist_tiny, out, states)  # the cadence is a runtime knob: free
    assert resumed["per_epoch"] == unbroken["per_epoch"]
    assert (resumed["top1"], resumed["top5"]) == (unbroken["top1"], unbroken["top5"])
    assert len(states) == 1 and not ckpt.exists()
    for name, value in states[0].items():
        assert torch.equal(value, unbroken_states[-1][name]), name


def _other(tmp_path):
    """Backbone weights other than random_backbone's (another seed)."""
    from barlow.atomic import save_torch
    from barlow.model import backbone

    torch.manual_seed(1)
    path = tmp_path / "other.pth"
    save_torch({"arch": "resnet18", "state_dict": backbone("resnet18").state_dict(), "epochs": 0, "steps": 0}, path)
    return path


def test_cli_finetune_help_and_a_bad_percent(capsys):
    from barlow import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--percent" in text and "--backbone" in text and "--val" in text
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--backbone", "b", "--train", "t", "--val", "v", "--out", "o", "--percent", "0"])
    assert e.value.code == 2 and "a percent must lie in (0, 100]" in capsys.readouterr().err


def test_cli_finetune_runs_inline(fmnist_tiny, tmp_path, monkeypatch):
    from barlow import cli, distributed

    monkeypatch.setattr(distributed, "use_task_cpus", lambda: None)  # keep this test's one thread
    weights = random_backbone(tmp_path / "backbone.pth")
    overrides = tmp_path / "over.yaml"
    overrides.write_text("pretrain: {init: random}\nfinetune: {epochs: 1, batch_size: 16, workers: 1}\n")
    out = tmp_path / "ft.json"
    assert cli.main(["finetune", "--preset", "fmnist_r18", "--config", str(overrides), "--backbone", str(weights),
                     "--train", str(fmnist_tiny["train"]), "--val", str(fmnist_tiny["val"]), "--percent", "10",
                     "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["percent"] == 10 and summary["epoch_reported"] == 1 and 0 <= summary["top1"] <= summary["top5"]


def _rank(rank: int, world: int, port: int, cfg, weights, data, out_dir) -> None:
    import os

    import torch.distributed as dist

    from barlow.distributed import Env

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        states, real = [], finetune.evaluate

        def capture(model, r):
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            result = real(model, r)
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})  # as evaluated
            return result

        finetune.evaluate = capture
        summary = finetune.run_finetune(cfg, weights, data["train"], data["val"], f"{out_dir}/finetune.json", 10,
                                        env=Env(rank, world, rank, "cpu"), log=lambda *a: None)
        torch.save({"top1": summary["top1"], "top5": summary["top5"], "state": states[-2], "evaluated": states[-1]},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch and FFCV
def test_two_processes_split_the_batches_and_evaluate_with_rank_0s_statistics(fmnist_tiny, tmp_path):
    """Each rank takes half of every global batch (BatchNorm per rank, as evaluate.py's DDP without SyncBN); the
    sharded evaluation counts every val image once, all with rank 0's running statistics."""

    from tests.conftest import free_port

    weights = random_backbone(tmp_path / "backbone.pth")
    run_ranks(_rank, 2, free_port(), config(epochs=1), weights, fmnist_tiny, str(tmp_path))
    written = json.loads((tmp_path / "finetune.json").read_text())
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert sorted(p.name for p in tmp_path.glob("finetune*")) == ["finetune.json", "finetune.subset.json"]
    assert got[0]["top1"] == got[1]["top1"] == written["top1"] and got[0]["top5"] == got[1]["top5"] == written["top5"]
    assert (written["top1"], written["top5"]) == _val_accuracy(got[0]["state"], fmnist_tiny["val"])
    # the ranks' BatchNorm statistics differ (each saw its half of the batches); their weights agree (DDP)
    bn = "backbone.bn1.running_mean"
    assert not torch.equal(got[0]["state"][bn], got[1]["state"][bn])
    for name, value in got[0]["state"].items():  # evaluated with rank 0's on both ranks
        assert torch.equal(got[1]["evaluated"][name], value), name
    torch.testing.assert_close(got[0]["state"]["backbone.conv1.weight"], got[1]["state"]["backbone.conv1.weight"])
