"""Pretraining's log: metrics.csv (one row per optimizer step, with the monitor's values where it
evaluated), the TensorBoard events, the progress lines and the finiteness check of the losses, fed
one step at a time by barlow/pretrain.py's loop (``Log``) and synced to the host in batches."""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import torch

from barlow import monitor as monitoring
from barlow import tb
from barlow.atomic import write_text

METRICS = ["step", "epoch", "loss", "lr", "samples_per_s", "elapsed_s", *monitoring.COLUMNS]

# A non-finite loss under fp16 is the loss scaler's business (it skips the step and lowers the
# scale); this many in a row means the run itself diverged.
MAX_SKIPPED_STEPS = 20


def _check_finite(loss: float, skipped: int, step: int, epoch: int, scaler, ckpt_path: Path) -> int:
    """Non-finite steps in a row so far; raises when it is the run, not the loss scale, that diverged."""
    finite = math.isfinite(loss)
    skipped = 0 if finite else skipped + 1
    if not finite and (not scaler.is_enabled() or skipped > MAX_SKIPPED_STEPS):
        raise FloatingPointError(
            f"loss is {loss} at step {step} (epoch {epoch})"
            + (f", the {skipped}th non-finite step in a row" if scaler.is_enabled() else "")
            + f"; the last good checkpoint ({ckpt_path}) is kept; lower pretrain.lr or check the data")
    return skipped


# Host syncs of the losses: each step's loss stays on the device until SYNC_EVERY steps or SYNC_S
# seconds have gone by (a GPU step had two syncs, isfinite and item, and a metrics.csv flush; a
# sync every second or two costs nothing, and metrics.csv stays as fresh for whoever watches it).
# Also synced before every checkpoint (a non-finite loss is caught before its weights are kept) and
# every monitor evaluation.
SYNC_EVERY, SYNC_S = 25, 2.0


class Log:
    """metrics.csv, the progress lines and the finiteness check, fed one step at a time."""

    def __init__(self, path: Path, rows: list, env, total: int, steps_per_epoch: int, scaler, ckpt_path: Path, state):
        self.rows, self.env, self.total, self.per_epoch = rows, env, total, steps_per_epoch
        self.scaler, self.ckpt_path = scaler, ckpt_path
        self.first = state["step"] if state else 0
        self.pending: list = []  # [step, loss tensor, lr, images, elapsed_s, monitor values]
        self.skipped, self.t0 = 0, time.time()
        self.restart_window()
        self.file = self.writer = self.tb = None
        if env.main:
            write_metrics(path, rows)
            self.file = open(path, "a", newline="")
            self.writer = csv.writer(self.file)
            self.tb = tb.writer(path.parent, self.first)

    def add(self, step: int, loss: torch.Tensor, lrs: list[float], images: int, elapsed_s: float) -> None:
        """Step ``step``'s loss (still on the device), its learning rate per parameter group, its images."""
        self.pending.append([step, loss.detach(), lrs, images, elapsed_s, {}])

    def full(self) -> bool:
        return len(self.pending) >= SYNC_EVERY or time.time() - self.t_window >= SYNC_S

    def watch(self, mon) -> None:
        """The monitor's evaluation after the last step: its values go into that step's row, its time
        (from the moment the device has caught up) is taken out of the throughput."""
        if self.pending and self.pending[-1][1].is_cuda:
            torch.cuda.synchronize()
        t = time.time()
        self.pending[-1][5] = mon.evaluate()
        self.excluded += time.time() - t
        self.sync()

    def restart_window(self) -> None:
        self.t_window, self.excluded = time.time(), 0.0

    def sync(self) -> None:
        """One host sync for the pending steps: check them, write their rows, print progress."""
        if not self.pending:
            return
        losses = torch.stack([x[1] for x in self.pending]).float().cpu().tolist()
        now = time.time()
        rate = sum(x[3] for x in self.pending) / max(now - self.t_window - self.excluded, 1e-9)  # the window's mean
        gpu_gb = torch.cuda.max_memory_allocated() / 2**30 if self.pending[-1][1].is_cuda else None
        for (step, _, lrs, _, elapsed, watched), loss in zip(self.pending, losses):
            lr = lrs[0]
            # (named by the steps done before it, as the checkpoint it falls back to counts them)
            self.skipped = _check_finite(loss, self.skipped, step - 1, (step - 1) // self.per_epoch, self.scaler,
                                         self.ckpt_path)
            self.rows.append([step, round(step / self.per_epoch, 4), loss, lr, round(rate, 1), round(elapsed, 2),
                              *(watched.get(c, "") for c in monitoring.COLUMNS)])
            if self.tb is not None:
                tb.write_step(self.tb, step, loss, lrs, rate, watched, gpu_gb)
            if self.writer is not None:
                self.writer.writerow(self.rows[-1])
                if watched:
                    print(f"step {step}/{self.total} monitor: kNN k=20 {watched['knn_k20']:.2f}, k=200 "
                          f"{watched['knn_k200']:.2f}, online linear {watched['linear_top1']:.2f} "
                          f"({watched['monitor_s']:.1f} s)", flush=True)
                self._progress(step, loss, lr, rate, now)
        self.pending = []
        if self.file is not None:
            self.file.flush()
        if self.tb is not None:
            self.tb.flush()
        self.restart_window()

    def _progress(self, step: int, loss: float, lr: float, rate: float, now: float) -> None:
        if step % max(1, min(50, self.total // 20)) == 0 or step == self.total:
            eta = (self.total - step) * (now - self.t0) / max(1, step - self.first)
            print(f"step {step}/{self.total} epoch {(step - 1) // self.per_epoch} loss {loss:.2f} lr {lr:.4g} "
                  f"{rate:.0f} img/s eta {eta / 60:.1f} min", flush=True)

    def close(self) -> None:
        self.sync()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def write_metrics(path: Path, rows: list) -> None:
    # rows of a checkpoint written before the monitor's columns existed are padded with empty cells
    rows = [list(r) + [""] * (len(METRICS) - len(r)) for r in rows]
    text = ",".join(METRICS) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
    write_text(path, text)
