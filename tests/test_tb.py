"""barlow.tb: TensorBoard is optional; without it the stage runs on and says so once per process."""
from __future__ import annotations

import sys

from barlow import tb


def test_without_tensorboard_no_writer_and_one_note(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an environment without it gives
    monkeypatch.setattr(tb, "_said", False)
    assert tb.writer(tmp_path, 0) is None and tb.writer(tmp_path, 5) is None
    out = capsys.readouterr().out
    assert out.count("note: tensorboard is not installed") == 1 and not (tmp_path / "tb").exists()


def test_with_tensorboard_the_events_go_to_the_run_folder(tmp_path):
    w = tb.writer(tmp_path, 0)
    w.add_scalar("loss", 1.0, 1)
    w.close()
    assert list((tmp_path / "tb").iterdir())
