"""Every kernel compiles with NVRTC for sm_80 and sm_90 on this GPU-less machine, without spills.

NVRTC runs in-process from the pip wheel (``nvidia-cuda-nvrtc``), with the CUDA headers from the
pip runtime wheel or a toolkit; ptxas' ``-v`` report comes back in the program log.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmq.cuda import loader
from llmq.errors import KernelCompileError

ARCHS = ("sm_80", "sm_90")


@pytest.fixture(
    scope="module", params=[(f, a) for f in loader.KERNEL_FILES for a in ARCHS], ids=lambda p: f"{p[0]}-{p[1]}"
)
def build(request):
    name, arch = request.param
    return loader.compile_offline(name, arch)


def _is_hot(expression: str) -> bool:
    """The kernels decode runs on: every GEMV with 16-byte loads, the GEMM tiles, gather, dequant."""
    if expression.startswith("llmq::gemv_mixed<"):
        return expression.endswith(", 4, 4>")
    return True


def test_every_instance_compiles_and_has_a_symbol(build):
    assert build.cubin[:4] == b"\x7fELF"
    assert set(build.lowered) == set(loader.instances(build.name))
    reported = {r.symbol for r in loader.resource_report(build.log)}
    assert set(build.lowered.values()) <= reported


def test_hot_kernels_do_not_spill(build):
    by_symbol = {r.symbol: r for r in loader.resource_report(build.log)}
    for expression, symbol in build.lowered.items():
        if not _is_hot(expression):
            continue
        r = by_symbol[symbol]
        assert (r.spill_store_bytes, r.spill_load_bytes) == (0, 0), f"{expression} spills on {build.arch}: {r}"
        assert r.registers <= 255


def test_a_compile_error_names_the_real_file_and_line():
    source = loader.read_source("gemv.cu")
    marker = "struct Scale2 {"
    assert marker in source
    broken = source.replace(marker, "struct Scale2 { this_is_not_cuda;", 1)
    header = (loader.resources.files(loader.PACKAGE) / "q2.cuh").read_text().splitlines()
    line = next(i for i, text in enumerate(header, start=1) if text.startswith(marker))
    with pytest.raises(KernelCompileError, match=rf"cuda/q2\.cuh\({line}\)"):
        loader.compile_offline("gemv.cu", "sm_80", source=broken)


def test_line_directives_return_to_the_including_file():
    """Each header is inlined once, and the line after an #include is numbered as in the .cu file."""
    source = loader.read_source("gemm.cu")
    assert source.count('#line 1 "cuda/common.cuh"') == 1  # included by q2.cuh and q4.cuh, inlined once
    original = (loader.resources.files(loader.PACKAGE) / "gemm.cu").read_text().splitlines()
    include_q4 = original.index('#include "q4.cuh"') + 1
    assert f'#line {include_q4 + 1} "cuda/gemm.cu"' in source.splitlines()


def test_importing_the_backend_compiles_nothing_and_leaves_cupy_alone():
    code = "import sys, llmq.cuda.loader, llmq.runtime.cuda_backend, llmq.cuda.emulate; print('cupy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_modules_are_compiled_once_per_device_and_file(monkeypatch):
    built = []

    class FakeModule:
        def __init__(self, key):
            self.key = key

        def get_function(self, name):
            return (self.key, name)

    monkeypatch.setattr(
        loader, "_compile_for_device", lambda dev, name: built.append((dev, name)) or FakeModule((dev, name))
    )
    monkeypatch.setattr(loader, "_CACHE", loader._ModuleCache())
    first = loader.kernel(0, "gemm.cu", "llmq::gemm_mixed<1>")
    loader.kernel(0, "gemm.cu", "llmq::gemm_mixed<4>")
    loader.kernel(1, "gemm.cu", "llmq::gemm_mixed<1>")
    assert first == ((0, "gemm.cu"), "llmq::gemm_mixed<1>")
    assert built == [(0, "gemm.cu"), (1, "gemm.cu")]
    with pytest.raises(KeyError, match="not listed"):
        loader.kernel(0, "gemm.cu", "llmq::gemm_mixed<3>")


def test_a_bad_arch_is_refused():
    with pytest.raises(ValueError, match="sm_80"):
        loader.compile_offline("gather.cu", "compute_80")


def test_kernel_parameters_are_read_from_the_source():
    params = loader.kernel_parameters("gather.cu", "llmq::gather_permuted")
    assert [(p.name, p.pointer) for p in params] == [
        ("x", True), ("ldx", False), ("perm", True), ("xp", True), ("M", False), ("k2", False), ("k2p", False),
        ("k4", False),
    ]  # fmt: skip
    for name in loader.KERNEL_FILES:
        for instance in loader.instances(name):
            assert loader.kernel_parameters(name, instance)


def test_arguments_bind_by_name_and_type():
    import numpy as np
    import torch

    params = loader.kernel_parameters("gather.cu", "llmq::gather_permuted")
    t = torch.zeros(4)
    named = {"x": t, "ldx": 4, "perm": None, "xp": t, "M": 1, "k2": 1, "k2p": 16, "k4": 0}
    bound = loader.bind_arguments(params, named)
    assert bound[2] == np.uint64(0) and bound[0] == np.uint64(t.data_ptr()) and bound[1].dtype == np.int32
    with pytest.raises(TypeError, match="missing \\['k4'\\]"):
        loader.bind_arguments(params, {k: v for k, v in named.items() if k != "k4"})
    with pytest.raises(TypeError, match="unexpected \\['k5'\\]"):
        loader.bind_arguments(params, named | {"k5": 1})
    with pytest.raises(TypeError, match="32-bit int"):
        loader.bind_arguments(params, named | {"k2": 2**31})
    with pytest.raises(TypeError, match="tensor or None"):
        loader.bind_arguments(params, named | {"perm": 5})


def test_bench_compile_records_each_files_compile_time(tmp_path):
    from pathlib import Path

    out = tmp_path / "compile.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_compile.py"
    run = [sys.executable, str(script), "--out", str(out), "--archs", "sm_90", "--files", "gather.cu,dequant.cu"]
    subprocess.run([*run, "--repeats", "1"], check=True, capture_output=True, text=True)
    record = json.loads(out.read_text())
    assert [(p["file"], p["arch"], len(p["seconds"])) for p in record["points"]] == [
        ("gather.cu", "sm_90", 1), ("dequant.cu", "sm_90", 1)
    ]  # fmt: skip
    assert record["seconds_per_arch"]["sm_90"] > 0 and record["commit"] and record["cpu"]
