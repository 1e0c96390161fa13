"""The ``cuda`` backend: the kernels of ``cuda/*.cu`` run on torch tensors.

Kernels launch on torch's current stream and read torch's memory in place (raw pointers, no
copies, no CuPy arrays). A :class:`CudaLinear` keeps only the packed tensors on the GPU, so the
weights take about the artifact's size. Per call it gathers the activations into packed column
order (``gather.cu``) and then picks one of three paths by batch size (rows of ``x``):

* ``gemv``: ``gemv.cu`` for 1 to 8 rows, the decode case;
* ``gemm``: ``gemm.cu``, tensor cores with dequantization into shared memory;
* ``dequant``: ``dequant.cu`` to a transient fp16 weight, then cuBLAS (``torch.matmul``).

:class:`Crossovers` holds the batch sizes where the paths change. The defaults are placeholders
that have not been measured on a GPU yet; ``scripts/bench_kernels.py`` times every path per
shape and batch and reports the measured crossovers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch

from llmq.cuda import loader
from llmq.errors import DeviceError
from llmq.runtime.format.layout import LinearLayout

MIN_CAPABILITY = (8, 0)  # cp.async and mma.sync.m16n8k16 with fp32 accumulation


class Path(str, enum.Enum):
    gemv = "gemv"
    gemm = "gemm"
    dequant = "dequant"


@dataclass(frozen=True)
class Crossovers:
    """Rows up to gemv.cu's GEMV_MAX_BATCH take the gemv path; up to ``gemm_max_batch`` the gemm."""

    gemm_max_batch: int = 512  # above this, dequantize once and let cuBLAS do the matmul (unmeasured)

    def path(self, batch: int) -> Path:
        if batch <= loader.geometry().gemv_max_batch:
            return Path.gemv
        return Path.gemm if batch <= self.gemm_max_batch else Path.dequant


CROSSOVERS = Crossovers()


def packed_columns(layout: LinearLayout) -> np.ndarray:
    """Indices of the real columns in the padded packed order ``[k2p + k4]`` (the 2-bit padding left out)."""
    return np.concatenate([np.arange(layout.k2), layout.k2_padded + np.arange(layout.k4)])


def gemv_vectors(layout: LinearLayout) -> tuple[int, int]:
    """Words per lane load in the 2- and 4-bit parts: the 16-byte width when every row starts aligned."""
    wide = loader.geometry().gemv_vec_wide
    return tuple(wide if words % wide == 0 else 1 for words in (layout.words2, layout.words4))


def cuda_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the cuda backend cannot run here, or None if it can."""
    if device.type != "cuda":
        return f"the device is {device.type}, and the kernels need a CUDA GPU"
    if dtype != torch.float16:
        return f"the kernels compute with fp16 activations, and the dtype is {str(dtype).removeprefix('torch.')}"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"the kernels need compute capability 8.0 or newer (cp.async, mma), and this GPU has {capability}"
    try:
        loader.import_cupy()
    except DeviceError as err:
        return str(err)
    return None


def _check_xp(xp: torch.Tensor, kx: int) -> None:
    """The gathered activations the matmul kernels read with 16-byte vector loads: half [M, kx],
    contiguous, 16-byte aligned (kx is a multiple of 8, so every row then starts aligned too)."""
    if xp.dtype != torch.float16 or xp.dim() != 2 or xp.shape[1] != kx or not xp.is_contiguous():
        raise ValueError(f"xp must be a contiguous fp16 tensor [M, {kx}], got {xp.dtype} {tuple(xp.shape)}")
    if xp.data_ptr() % 16:
        raise ValueError(
            f"xp starts at an address that is not 16-byte aligned ({xp.data_ptr():#x}); the kernels load it "
            "16 bytes at a time. Pass a tensor of its own (e.g. xp.clone()) or the output of gather()"
        )


def _output(out: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``out`` checked against what a kernel will write, or a fresh fp16 tensor."""
    if out is None:
        return torch.empty(shape, dtype=torch.float16, device=device)
    if tuple(out.shape) != shape or out.dtype != torch.float16 or not out.is_contiguous() or out.device != device:
        raise ValueError(
            f"out must be a contiguous fp16 tensor of shape {shape} on {device}, got {out.dtype} {tuple(out.shape)}"
        )
    return out


class _Streams:
    """CuPy handles of torch streams, made once per (device, stream)."""

    def __init__(self) -> None:
        self._streams: dict[tuple[int, int], object] = {}

    def current(self, device_index: int):
        raw = torch.cuda.current_stream(device_index).cuda_stream
        key = (device_index, raw)
        if key not in self._streams:
            cupy = loader.import_cupy()
            self._streams[key] = cupy.cuda.ExternalStream(raw, device_index)
        return self._streams[key]


_STREAMS = _Streams()


def launch(device_index: int, file: str, instance: str, grid: tuple[int, ...], block: tuple[int, ...], **arguments):
    """Launch ``instance`` of ``cuda/FILE`` on torch's current stream of the device.

    ``arguments`` are bound by the kernel's parameter names (tensors or None for pointers, ints).
    CuPy launches in its current device's context, which need not be torch's; the kernel's
    device is made current for the launch.
    """
    args = loader.bind_arguments(loader.kernel_parameters(file, instance), arguments)
    if not (all(d >= 1 for d in grid) and all(d <= loader.CUDA_MAX_GRID_Y for d in grid[1:])):
        raise ValueError(f"grid {grid} for {instance} is outside CUDA's limits")
    if device_index < 0:
        raise DeviceError("a shape-only (meta) CudaLinear cannot launch kernels")
    function = loader.kernel(device_index, file, instance)
    cupy = loader.import_cupy()
    with cupy.cuda.Device(device_index), _STREAMS.current(device_index):
        function(grid, block, args)


class CudaLinear:
    """The packed tensors of one layer on a GPU, and the calls that multiply by them.

    layout   the layer's :class:`LinearLayout`
    packed   name suffix -> tensor, as :meth:`LinearLayout.tensor_specs` lists them, on one CUDA device
    """

    def __init__(self, layout: LinearLayout, packed: dict[str, torch.Tensor]):
        self.layout = layout
        self.t = {name: tensor.contiguous() for name, tensor in packed.items()}
        device = self.t["perm"].device
        if device.type == "meta":  # shapes only: checks argument binding without a GPU, never launches
            self.device_index = -1
        elif device.type == "cuda":
            self.device_index = device.index if device.index is not None else torch.cuda.current_device()
        else:
            raise DeviceError(f"the cuda backend needs the packed tensors on a GPU, not on {device}")
        self.k2p = layout.k2_padded
        self.kx = self.k2p + layout.k4
        aligned = all(t.data_ptr() % 16 == 0 for n, t in self.t.items() if n.startswith("qweight"))
        self.vectors = gemv_vectors(layout) if aligned else (1, 1)
        self.columns = torch.from_numpy(packed_columns(layout)).to(device)

    # -- the three steps a call is made of -------------------------------------------------
    def gather(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x half [M, K] (rows contiguous) -> xp half [M, kx]: packed column order, 2-bit padding zeroed."""
        m, lay, g = x.shape[0], self.layout, loader.geometry()
        xp = _output(out, (m, self.kx), x.device)
        launch(self.device_index, "gather.cu", "llmq::gather_permuted", g.gather_grid(self.kx, m), (g.gather_threads,),
               x=x, ldx=x.stride(0), perm=self.t["perm"], xp=xp, M=m, k2=lay.k2, k2p=self.k2p, k4=lay.k4)  # fmt: skip
        return xp

    def _parts(self) -> dict:
        """The packed tensors and sizes every matmul kernel takes, by parameter name."""
        lay, t = self.layout, self.t
        return {
            "q2": t.get("qweight2"), "meta2": t.get("meta2"), "scale2": t.get("scale2"), "szero2": t.get("szero2"),
            "k2p": self.k2p, "g1": lay.g1, "g2": lay.g2,
            "q4": t.get("qweight4"), "scale4": t.get("scale4"), "zero4": t.get("zero4"), "k4": lay.k4, "g4": lay.g4,
        }  # fmt: skip

    def _outliers(self) -> dict:
        t = self.t
        return {"orow": t.get("outlier_rowptr"), "ocol": t.get("outlier_col"), "oval": t.get("outlier_val")}

    def gemv(self, xp: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """xp half [M, kx] (from :meth:`gather`), 1 <= M <= GEMV_MAX_BATCH -> y half [M, N]."""
        _check_xp(xp, self.kx)
        m, n, g = xp.shape[0], self.layout.out_features, loader.geometry()
        if not 1 <= m <= g.gemv_max_batch:
            raise ValueError(f"the gemv path serves 1 to {g.gemv_max_batch} rows, not {m}")
        y = _output(out, (m, n), xp.device)
        vec2, vec4 = self.vectors
        instance = f"llmq::gemv_mixed<{m}, {g.gemv_rows}, {vec2}, {vec4}>"
        launch(self.device_index, "gemv.cu", instance, g.gemv_grid(n), (32 * g.gemv_warps,),
               xp=xp, y=y, bias=bias, N=n, kx=self.kx, **self._parts(), **self._outliers())  # fmt: skip
        return y

    def gemm(self, xp: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """xp half [M, kx] (from :meth:`gather`) -> y half [M, N], on tensor cores; outliers added after."""
        _check_xp(xp, self.kx)
        m, n, g = xp.shape[0], self.layout.out_features, loader.geometry()
        tiles = g.gemm_tiles_for(m)
        y = _output(out, (m, n), xp.device)
        launch(self.device_index, "gemm.cu", f"llmq::gemm_mixed<{tiles}>", g.gemm_grid(n, m, tiles),
               (g.gemm_threads,), xp=xp, y=y, bias=bias, M=m, N=n, kx=self.kx, **self._parts())  # fmt: skip
        if self.layout.n_outliers:
            self.add_outliers(xp, y)
        return y

    def add_outliers(self, xp: torch.Tensor, y: torch.Tensor) -> None:
        n, g = self.layout.out_features, loader.geometry()
        launch(self.device_index, "dequant.cu", "llmq::outliers_add", g.outliers_grid(n), (32 * g.outlier_warps,),
               xp=xp, kx=self.kx, y=y, M=xp.shape[0], N=n, **self._outliers())  # fmt: skip

    def dequant_packed(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as fp16 ``[N, k2p + k4]`` in packed column order, outliers included, padding zero."""
        lay, g = self.layout, loader.geometry()
        wp = _output(out, (lay.out_features, self.kx), self.t["perm"].device)
        grid = g.dequant_grid(lay.out_features, lay.words2 + lay.words4)
        launch(self.device_index, "dequant.cu", "llmq::dequant_packed", grid, (g.dequant_threads,),
               wp=wp, N=lay.out_features, k2=lay.k2, **self._parts(), **self._outliers())  # fmt: skip
        return wp

    def dequantize(self) -> torch.Tensor:
        """The weight as fp16 ``[N, K]`` in the original column order (for tests and the torch path)."""
        wp = self.dequant_packed()
        weight = torch.empty(self.layout.out_features, self.layout.in_features, dtype=wp.dtype, device=wp.device)
        weight[:, self.t["perm"].long()] = wp[:, self.columns]
        return weight

    # -- the matmul ------------------------------------------------------------------------
    def __call__(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        path: Path | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """y = x Wᵀ + bias. x half [..., K] on this layer's device; y half [..., N].

        ``path`` forces a path (benchmarks, tests); ``out`` (half ``[rows, N]``) receives y.
        """
        lay = self.layout
        if x.dtype != torch.float16 or x.shape[-1] != lay.in_features:
            raise DeviceError(
                f"the cuda backend multiplies fp16 [..., {lay.in_features}] inputs, got {x.dtype} {tuple(x.shape)}"
            )
        if x.device != self.t["perm"].device:
            raise DeviceError(f"the input is on {x.device}, this layer's packed weights on {self.t['perm'].device}")
        if bias is not None and (bias.dtype != torch.float16 or bias.shape != (lay.out_features,)):
            raise DeviceError(f"the bias must be fp16 [{lay.out_features}], got {bias.dtype} {tuple(bias.shape)}")
        lead = x.shape[:-1]
        rows = x.reshape(-1, lay.in_features)
        if rows.shape[0] == 0:
            return x.new_empty(*lead, lay.out_features)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        xp = self.gather(rows)
        path = path or CROSSOVERS.path(rows.shape[0])
        if path == Path.gemv:
            y = self.gemv(xp, bias, out)
        elif path == Path.gemm:
            y = self.gemm(xp, bias, out)
        else:
            wp = self.dequant_packed()
            y = _output(out, (rows.shape[0], lay.out_features), x.device)
            torch.matmul(xp, wp.T, out=y) if bias is None else torch.addmm(bias, xp, wp.T, out=y)
        return y.reshape(*lead, lay.out_features)
