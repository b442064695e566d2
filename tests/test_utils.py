import json
import os
import stat
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from small_params import cpu
from vqprior.errors import ParamsError
from vqprior.grids import save_grid
from vqprior.io import atomic_group, atomic_path, write_history_csv, write_json_atomic
from vqprior.runtime import cpu_has_bf16, resolve_precision, resolve_runtime


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "m.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary file left behind


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_outputs_get_the_mode_of_any_new_file_not_mkstemps_0600(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "m.json", {"a": 1})
        (tmp_path / "plain").write_text("x")  # what open() makes under this umask
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == mode


def test_a_killed_writers_temporary_goes_with_the_next_write_a_live_ones_stays(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid whose process has ended, as after a SIGKILL
    dead = tmp_path / f".m.json.{gone.pid}.k1ll3d.tmp"
    live = tmp_path / f".m.json.{os.getppid()}.w0rk1n.tmp"  # our parent: alive, maybe writing
    other = tmp_path / f".n.json.{gone.pid}.0th3r.tmp"  # another output's: cleaned when that output is written
    for p in (dead, live, other):
        p.write_text("half")
    write_json_atomic(tmp_path / "m.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.json", live.name, other.name])


def test_a_group_of_files_appears_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_json_atomic(a, {"v": 1})
    write_json_atomic(b, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_group():
            write_json_atomic(a, {"v": 2})  # complete, but held back
            assert json.loads(a.read_text()) == {"v": 1}
            with atomic_path(b) as tmp:
                tmp.write_text("half")
                raise RuntimeError("killed")
    assert json.loads(a.read_text()) == json.loads(b.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]
    with atomic_group():
        write_json_atomic(a, {"v": 2})
        write_json_atomic(b, {"v": 2})
    assert json.loads(a.read_text()) == json.loads(b.read_text()) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_runtime_resolution_on_cpu(monkeypatch):
    rt = resolve_runtime(cpu())
    assert rt.device.type == "cpu" and rt.precision == "fp32"
    auto = resolve_runtime(cpu(precision="auto"))
    assert auto.precision == ("bf16" if cpu_has_bf16() else "fp32")
    with auto.autocast():
        y = torch.ones(4, 4) @ torch.ones(4, 4)
    assert y.dtype == (torch.bfloat16 if auto.precision == "bf16" else torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    with pytest.raises(ParamsError, match="no CUDA GPU"):
        resolve_runtime(cpu(device="cuda", precision="auto"))
    assert resolve_runtime(cpu(device="auto", precision="auto")).device.type in ("cpu", "mps")


def test_auto_precision_never_picks_bf16_under_an_avx2_kernel_cap(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 is how an AVX2-only CPU is measured on a newer one: bf16 would be emulated there."""
    cpu = torch.device("cpu")
    native = "avx512_bf16" in open("/proc/cpuinfo").read() or "amx_bf16" in open("/proc/cpuinfo").read()
    for cap, expected in [("AVX2", False), ("avx2", False), ("AVX512_CORE", False), ("SSE41", False),
                          ("AVX512_CORE_BF16", native), ("AVX512_CORE_AMX", native), ("", native)]:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert cpu_has_bf16() is expected, cap
        assert resolve_precision("auto", cpu) == ("bf16" if expected else "fp32"), cap
        assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"  # as asked
    assert resolve_precision("auto", torch.device("mps")) == "fp32"


def test_compile_option_keeps_names_and_outputs():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    eager, names = model(x), list(model.state_dict())
    resolve_runtime(cpu(compile=False)).optimise(model)
    assert model._compiled_call_impl is None
    resolve_runtime(cpu(compile=True)).optimise(model)
    assert model._compiled_call_impl is not None
    assert list(model.state_dict()) == names  # checkpoints load into compiled and eager models alike
    torch.testing.assert_close(model(x), eager)


def test_channels_last_keeps_names_and_outputs():
    """The layout CUDA runs convolutions in (set by resolve_runtime there), checked here on the CPU."""
    from dataclasses import replace

    from small_params import SMALL_VQ
    from vqprior.models.vqvae import VQVAE

    torch.manual_seed(0)
    model, x = VQVAE(SMALL_VQ).eval(), torch.rand(2, 1, 28, 28)
    eager, state = model(x)[0], {k: v.clone() for k, v in model.state_dict().items()}
    replace(resolve_runtime(cpu()), channels_last=True).optimise(model)
    assert model.encoder[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x)[0], eager, atol=1e-5, rtol=1e-4)
    fresh = VQVAE(SMALL_VQ)
    fresh.load_state_dict(model.state_dict())  # a channels-last checkpoint loads into an eager model
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    assert not resolve_runtime(cpu()).channels_last  # the CPU keeps NCHW (oneDNN picks its own layout)


def test_grid_png_layout(tmp_path):
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 4, 5) * 40
    save_grid(images, tmp_path / "g.png", nrow=3, pad=1)
    png = np.array(Image.open(tmp_path / "g.png"))
    assert png.shape == (2 * 5 + 1, 3 * 6 + 1)  # rows of 4+1 px, columns of 5+1 px
    assert png[1, 1] == 0 and png[1, 7] == 40 and png[6, 1] == 120 and png[0, 0] == 255


def test_history_csv(tmp_path):
    write_history_csv(tmp_path / "h.csv", [{"loss": 1.0, "lr": 0.1}, {"loss": 0.5, "lr": 0.05}])
    assert (tmp_path / "h.csv").read_text().splitlines() == ["epoch,loss,lr", "1,1,0.1", "2,0.5,0.05"]
