"""`precision: auto` picks bf16 only where the CPU has bf16 instructions (elsewhere it is emulated)."""
import torch

from barlow.pretrain import native_bf16, resolve_precision

SAPPHIRE = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512_bf16 amx_bf16 amx_tile\n"
SKYLAKE = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512dq\n"  # AVX-512 without bf16: emulated


def test_native_bf16_reads_the_cpu_flags():
    assert native_bf16(SAPPHIRE)
    assert not native_bf16(SKYLAKE)
    assert not native_bf16("")


def test_explicit_precision_is_kept_and_auto_resolves_from_the_cpu_flags(monkeypatch, tmp_path):
    cpu = torch.device("cpu")
    for p in ("fp32", "amp_bf16", "amp_fp16"):
        assert resolve_precision(p, cpu) == p
    # auto reads /proc/cpuinfo: give it a known CPU each time (expected values written by hand)
    from pathlib import Path

    real_read = Path.read_text
    for flags, expected in ((SAPPHIRE, "amp_bf16"), (SKYLAKE, "fp32")):
        monkeypatch.setattr(Path, "read_text", lambda self, *a, _f=flags, **k: _f if str(self) == "/proc/cpuinfo"
                            else real_read(self, *a, **k))
        assert resolve_precision("auto", cpu) == expected


def test_smoke_mode_runs_fp16_presets_as_auto_on_a_cpu_only(monkeypatch):
    from pathlib import Path

    from barlow.config import resolve, smoke

    cfg = smoke(resolve("cifar10_r18_ep1000"))  # an OpenMixup preset: amp_fp16, as on its GPUs
    assert cfg["pretrain"]["precision"] == "amp_fp16" and cfg["pretrain"]["cpu_fp16"] == "auto"
    assert resolve("cifar10_r18_ep1000")["pretrain"]["cpu_fp16"] == "fp16"  # a real run keeps what it asks
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: SKYLAKE if str(self) == "/proc/cpuinfo"
                        else real_read(self, *a, **k))
    assert resolve_precision("amp_fp16", torch.device("cpu"), "auto") == "fp32"
    assert resolve_precision("amp_fp16", torch.device("cpu"), "fp16") == "amp_fp16"
    assert resolve_precision("amp_fp16", torch.device("cuda"), "auto") == "amp_fp16"  # the CUDA path stays
