"""The one place kernels are read, compiled and cached.

Each ``.cu`` file in this package is one translation unit. Its ``#include "x.cuh"`` lines are
inlined here with ``#line`` directives, so an NVRTC error names the real file and line. The
template instances each file provides are listed by :func:`instances`; NVRTC compiles exactly
those (name expressions), for the architecture of the device at hand, through
``cupy.RawModule``. Compiled modules are cached per device and file; nothing is compiled when
this module is imported.

:func:`compile_offline` runs NVRTC directly, without a GPU or a driver, for any ``sm_XX``; CI
uses it to compile-check every kernel for sm_80 and sm_90 and to read the ptxas resource
report (registers, spills, stack) that :func:`resource_report` parses.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import operator
import os
import re
import sys
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from llmq.errors import DeviceError, KernelCompileError

PACKAGE = "llmq.cuda"
KERNEL_FILES = ("gather.cu", "gemv.cu", "gemm.cu", "dequant.cu")
CUDA_MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y (and z); gridDim.x goes to 2**31 - 1


@dataclass(frozen=True)
class Geometry:
    """The launch constants the kernels declare (``constexpr int`` in each ``.cu``), read from the
    sources so the host's grids and the numpy emulation cannot drift from the kernels."""

    gather_threads: int  # gather.cu GATHER_THREADS
    dequant_threads: int  # dequant.cu DEQUANT_THREADS
    outlier_warps: int  # dequant.cu OUTLIER_WARPS
    gemv_warps: int  # gemv.cu GEMV_WARPS
    gemv_rows: int  # gemv.cu GEMV_ROWS
    gemv_max_batch: int  # gemv.cu GEMV_MAX_BATCH
    gemv_vec_wide: int  # gemv.cu GEMV_VEC_WIDE
    gemm_bn: int  # gemm.cu GEMM_BN
    gemm_bk: int  # gemm.cu GEMM_BK
    gemm_lds: int  # gemm.cu GEMM_LDS
    gemm_threads: int  # gemm.cu GEMM_THREADS
    gemm_tile_m: int  # gemm.cu GEMM_TILE_M
    gemm_max_tiles: int  # gemm.cu GEMM_MAX_TILES

    @property
    def gemv_vecs(self) -> tuple[int, int]:
        """Words per lane load: 1, or the 16-byte width when a part's rows allow it."""
        return 1, self.gemv_vec_wide

    @property
    def gemm_tiles(self) -> tuple[int, ...]:
        """The m16 tiles per block instantiated: powers of two up to GEMM_MAX_TILES."""
        return tuple(1 << i for i in range(self.gemm_max_tiles.bit_length()) if 1 << i <= self.gemm_max_tiles)

    # Launch grids, shared by the host (runtime/cuda_backend.py) and the emulation (emulate.py).
    def gather_grid(self, kx: int, m: int) -> tuple[int, int]:
        """gather.cu: one thread per packed column; rows beyond gridDim.y are looped over in the kernel."""
        return -(-kx // self.gather_threads), min(m, CUDA_MAX_GRID_Y)

    def gemv_grid(self, n: int) -> tuple[int]:
        return (-(-n // (self.gemv_warps * self.gemv_rows)),)

    def gemm_tiles_for(self, m: int) -> int:
        """The fewest m16 tiles per block that cover ``m`` rows (the largest instance above that)."""
        return next((t for t in self.gemm_tiles if self.gemm_tile_m * t >= m), self.gemm_tiles[-1])

    def gemm_grid(self, n: int, m: int, tiles: int) -> tuple[int, int]:
        return -(-n // self.gemm_bn), -(-m // (self.gemm_tile_m * tiles))

    def dequant_grid(self, n: int, words_per_row: int) -> tuple[int]:
        return (-(-n * words_per_row // self.dequant_threads),)

    def outliers_grid(self, n: int) -> tuple[int]:
        return (-(-n // self.outlier_warps),)


@functools.cache
def geometry() -> Geometry:
    """The kernels' launch constants, read once from the ``.cu`` files."""
    declared: dict[str, int] = {}
    for name in KERNEL_FILES:
        declared |= constants(name)
    fields = Geometry.__dataclass_fields__
    missing = [f.upper() for f in fields if f.upper() not in declared]
    if missing:
        raise KernelCompileError(f"the kernel sources do not declare {missing} as constexpr int")
    return Geometry(**{f: declared[f.upper()] for f in fields})


@functools.cache
def instances(name: str) -> tuple[str, ...]:
    """Every kernel ``cuda/NAME`` provides, spelled as NVRTC name expressions."""
    g = geometry()
    if name == "gemv.cu":
        return tuple(
            f"llmq::gemv_mixed<{batch}, {g.gemv_rows}, {vec2}, {vec4}>"
            for batch in range(1, g.gemv_max_batch + 1)
            for vec2 in g.gemv_vecs
            for vec4 in g.gemv_vecs
        )
    if name == "gemm.cu":
        return tuple(f"llmq::gemm_mixed<{tiles}>" for tiles in g.gemm_tiles)
    return _PLAIN_INSTANCES.get(name, ())


_PLAIN_INSTANCES = {
    "gather.cu": ("llmq::gather_permuted",),
    "dequant.cu": ("llmq::dequant_packed", "llmq::outliers_add"),
}


_CONSTEXPR = re.compile(r"^constexpr\s+int\s+([A-Z][A-Z0-9_]*)\s*=\s*([^;]+);", re.M)


@functools.cache
def constants(name: str) -> dict[str, int]:
    """``constexpr int NAME = expression;`` at the top level of ``cuda/NAME``, evaluated (integers,
    earlier names, + - * /); no code from the file is executed."""
    text = resources.files(PACKAGE).joinpath(name).read_text(encoding="utf-8")
    values: dict[str, int] = {}
    for constant, expression in _CONSTEXPR.findall(text):
        try:
            values[constant] = _integer(ast.parse(expression.strip(), mode="eval").body, values)
        except (SyntaxError, ValueError) as err:
            raise KernelCompileError(f"cuda/{name}: constexpr {constant} = {expression.strip()}: {err}") from None
    return values


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.floordiv}


def _integer(node: ast.expr, names: dict[str, int]) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_integer(node.left, names), _integer(node.right, names))
    raise ValueError("only integers, earlier constants and + - * / are understood")


OPTIONS = ("-std=c++17",)
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def read_source(name: str, _seen: set[str] | None = None) -> str:
    """The translation unit of ``name``: local includes inlined once each, with ``#line`` markers."""
    seen = set() if _seen is None else _seen
    seen.add(name)
    try:
        text = resources.files(PACKAGE).joinpath(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KernelCompileError(f"kernel source cuda/{name} is missing from the installed llmq package") from None
    out = [f'#line 1 "cuda/{name}"']
    for number, line in enumerate(text.splitlines(), start=1):
        match = _INCLUDE.match(line)
        if match:
            header = match.group(1)
            if header not in seen:
                out.append(read_source(header, seen))
            out.append(f'#line {number + 1} "cuda/{name}"')
        elif line.strip() == "#pragma once":
            out.append("")  # inlined once by construction; NVRTC warns about it in a main file
        else:
            out.append(line)
    return "\n".join(out)


def find_cuda_include_dir() -> Path | None:
    """A directory holding ``cuda_fp16.h``: $CUDA_PATH, $CUDA_HOME, the pip CUDA runtime, /usr/local/cuda."""
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_PATH", "CUDA_HOME") if os.environ.get(v)]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(Path(root).glob("cu*/include")) + [Path(root) / "cuda_runtime" / "include"]
    candidates.append(Path("/usr/local/cuda/include"))
    return next((path for path in candidates if (path / "cuda_fp16.h").is_file()), None)


HEADER_HINT = (
    "the kernels include cuda_fp16.h; install the CUDA headers with `pip install 'nvidia-cuda-runtime==13.0.*'` "
    "(or the CUDA 12 equivalent) or set CUDA_PATH to a CUDA toolkit"
)


def cuda_include_dir() -> Path:
    """:func:`find_cuda_include_dir`, or a KernelCompileError saying how to get the headers."""
    found = find_cuda_include_dir()
    if found is None:
        raise KernelCompileError(f"cannot find the CUDA headers: {HEADER_HINT}")
    return found


def import_cupy():
    """Import CuPy, or raise DeviceError saying how to get it.

    The repository root holds this package's ``cuda/`` folder; when the root is on ``sys.path``
    (``python -m`` from a checkout) it would shadow NVIDIA's ``cuda`` namespace package, which
    CuPy imports. Such entries are left out while CuPy is imported.
    """
    if "cupy" in sys.modules:
        return sys.modules["cupy"]
    ours = Path(__file__).resolve().parent
    shadowing = [p for p in sys.path if (Path(p or ".").resolve() / "cuda") == ours]
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if p not in shadowing]
    if shadowing and "cuda" in sys.modules and getattr(sys.modules["cuda"], "__file__", None):
        del sys.modules["cuda"]
    try:
        import cupy
    except ImportError as err:
        raise DeviceError(
            f"the cuda backend needs CuPy ({err}); install it with `pip install 'llmq[cuda13]'` "
            "(or llmq[cuda12]), or use --backend torch"
        ) from err
    finally:
        sys.path[:] = saved
    return cupy


class _ModuleCache:
    """Compiled ``cupy.RawModule`` per (device index, file); thread-safe, filled lazily."""

    def __init__(self) -> None:
        self._modules: dict[tuple[int, str], object] = {}
        self._functions: dict[tuple[int, str, str], object] = {}
        self._lock = threading.Lock()

    def function(self, device_index: int, name: str, instance: str):
        key = (device_index, name, instance)
        found = self._functions.get(key)  # the hot path: no lock, no driver call (CUDA-graph capture safe)
        if found is not None:
            return found
        with self._lock:
            module_key = (device_index, name)
            if module_key not in self._modules:
                self._modules[module_key] = _compile_for_device(device_index, name)
            self._functions[key] = self._modules[module_key].get_function(instance)
            return self._functions[key]


_CACHE = _ModuleCache()


def kernel(device_index: int, name: str, instance: str):
    """The ``cupy.RawKernel`` for ``instance`` (one of ``instances(name)``) on CUDA device ``device_index``."""
    if instance not in instances(name):
        raise KeyError(f"{instance!r} is not listed among the instances of cuda/{name}")
    return _CACHE.function(device_index, name, instance)


def _compile_for_device(device_index: int, name: str):
    cupy = import_cupy()
    source = read_source(name)
    include = find_cuda_include_dir()  # None: leave the search to CuPy's own CUDA path
    options = (*OPTIONS, f"-I{include}") if include else OPTIONS
    with cupy.cuda.Device(device_index):
        try:
            module = cupy.RawModule(code=source, options=options, name_expressions=list(instances(name)))
            module.compile()
        except cupy.cuda.compiler.CompileException as err:
            hint = "" if include else f"\n({HEADER_HINT})"
            raise KernelCompileError(f"NVRTC could not compile cuda/{name}:\n{err.get_message()}{hint}") from None
    return module


@dataclass(frozen=True)
class Parameter:
    name: str
    pointer: bool  # a device pointer; otherwise a 32-bit int


def kernel_parameters(name: str, instance: str) -> tuple[Parameter, ...]:
    """The parameters of the ``__global__`` function behind ``instance``, read from ``cuda/NAME``.

    Callers bind their arguments by these names (:func:`bind_arguments`), so a launch cannot
    pass them in the wrong order when a kernel's signature changes.
    """
    return _parameters(name, instance.removeprefix("llmq::").split("<")[0])


@functools.cache
def _parameters(name: str, function: str) -> tuple[Parameter, ...]:
    text = resources.files(PACKAGE).joinpath(name).read_text(encoding="utf-8")
    match = re.search(r"__global__[^;{]*?\b" + re.escape(function) + r"\s*\(([^)]*)\)\s*\{", text, re.S)
    if match is None:
        raise KernelCompileError(f"cuda/{name} has no __global__ function {function}")
    params = []
    for declaration in match.group(1).split(","):
        words = re.findall(r"[A-Za-z_]\w*", declaration)
        if not words or not (declaration.count("*") == 1 or words[-2:-1] == ["int"]):
            problem = f"{function} parameter {declaration.strip()!r} is not a pointer or an int"
            raise KernelCompileError(f"cuda/{name}: {problem}")
        params.append(Parameter(words[-1], "*" in declaration))
    return tuple(params)


def bind_arguments(params: tuple[Parameter, ...], arguments: dict) -> tuple:
    """Kernel arguments in signature order: tensors or None for pointers (as uint64), ints as int32."""
    import numpy as np

    missing = [p.name for p in params if p.name not in arguments]
    extra = sorted(set(arguments) - {p.name for p in params})
    if missing or extra:
        raise TypeError(f"kernel arguments do not match the signature: missing {missing}, unexpected {extra}")
    bound = []
    for p in params:
        value = arguments[p.name]
        if p.pointer:
            if value is not None and not hasattr(value, "data_ptr"):
                raise TypeError(f"kernel argument {p.name} must be a tensor or None, got {type(value).__name__}")
            bound.append(np.uint64(0 if value is None else value.data_ptr()))
        else:
            if not isinstance(value, int) or not -(2**31) <= value < 2**31:
                raise TypeError(f"kernel argument {p.name} must be a 32-bit int, got {value!r}")
            bound.append(np.int32(value))
    return tuple(bound)


@dataclass(frozen=True)
class OfflineBuild:
    """What NVRTC made of one file for one architecture, without a GPU."""

    name: str
    arch: str
    cubin: bytes
    log: str
    lowered: dict[str, str]  # name expression -> mangled symbol


def compile_offline(name: str, arch: str, source: str | None = None) -> OfflineBuild:
    """Compile ``cuda/NAME`` (or ``source`` under that name) to a cubin for ``arch`` (e.g. ``sm_90``)."""
    if not re.fullmatch(r"sm_\d{2,3}a?", arch):
        raise ValueError(f"arch {arch!r} is not of the form sm_80 / sm_90a")
    import_cupy()  # keeps the cuda/ shadowing guard in one place
    from cupy_backends.cuda.libs import nvrtc

    text = read_source(name) if source is None else source
    program = nvrtc.createProgram(text, name, [], [])
    try:
        for expression in instances(name):
            nvrtc.addNameExpression(program, expression)
        options = [*OPTIONS, f"-I{cuda_include_dir()}", f"-arch={arch}", "-Xptxas=-v"]
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError:
            raise KernelCompileError(
                f"NVRTC could not compile cuda/{name} for {arch}:\n{nvrtc.getProgramLog(program)}"
            ) from None
        lowered = {e: nvrtc.getLoweredName(program, e) for e in instances(name)}
        return OfflineBuild(name, arch, nvrtc.getCUBIN(program), nvrtc.getProgramLog(program), lowered)
    finally:
        nvrtc.destroyProgram(program)


@dataclass(frozen=True)
class KernelResources:
    symbol: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def resource_report(log: str) -> list[KernelResources]:
    """Parse ptxas ``-v`` output (from :func:`compile_offline`) into one record per kernel."""
    records, current = [], None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = {"symbol": m.group(1), "stack": 0, "stores": 0, "loads": 0, "regs": None, "smem": 0}
        elif current is not None and (m := _FRAME.search(line)):
            current["stack"], current["stores"], current["loads"] = map(int, m.groups())
        elif current is not None and (m := _USED.search(line)):
            current["regs"] = int(m.group(1))
            if m := _SMEM.search(line):
                current["smem"] = int(m.group(1))
            records.append(
                KernelResources(
                    current["symbol"],
                    current["regs"],
                    current["stack"],
                    current["stores"],
                    current["loads"],
                    current["smem"],
                )
            )
            current = None
    return records
