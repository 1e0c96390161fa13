"""GPTQ error compensation on fixed per-column grids (Frantar et al., 2022).

Columns are rounded one at a time, in the packed (permuted) order, and each rounding error is
spread over the not-yet-rounded columns through the inverse Hessian, so the layer's *output*
error on the calibration inputs is what gets minimised. The grids (scale and zero of every
group, 2-bit or 4-bit) are fixed beforehand from the original weights ("static groups"), which
keeps the second-order scale blocks of the 2-bit part consistent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from llmq.errors import NumericsError

log = logging.getLogger("llmq.gptq")


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, retries: int = 6,
                           stop: Callable[[], None] = lambda: None) -> torch.Tensor:  # fmt: skip
    """Upper Cholesky factor of ``(H + λI)^-1`` with ``λ = damp * mean(diag H)``.

    A Hessian that is not positive definite (few samples, dead channels) is retried with ten
    times the damping, and the retry is logged; it never crashes the run. ``stop`` is called
    before each of the three fp64 steps (at a 70B's K = 28672 each takes minutes on a CPU, and
    none can be interrupted inside).
    """
    dead = torch.diag(hessian) <= 0
    diagonal = torch.where(dead, 1.0, torch.diag(hessian).to(torch.float64))
    mean_diag = float(diagonal.mean())
    # One [K, K] fp64 matrix at a time (a 70B model's K = 28672 makes it 6.6 GB): LAPACK works on
    # column-major matrices, and a symmetric matrix's transpose is itself, so on the transposed view
    # torch runs all three steps in place instead of copying each input into a fresh column-major
    # buffer. A failed try leaves the buffer spoilt: the next is rebuilt from the caller's Hessian.
    for attempt in range(retries):
        lam = damp * (10**attempt) * mean_diag
        try:
            work = hessian.to(torch.float64, copy=True)  # the caller's Hessian is never written
            work[dead, dead] = 1.0
            work.diagonal().add_(lam)
            column_major = work.mT
            stop()
            torch.linalg.cholesky(column_major, out=column_major)
            stop()
            torch.cholesky_inverse(column_major, out=column_major)
            stop()
            torch.linalg.cholesky(column_major, upper=True, out=column_major)
            return column_major.to(torch.float32, memory_format=torch.contiguous_format)
        except torch.linalg.LinAlgError:
            log.warning("Hessian not positive definite at damping %.3g; retrying with %.3g", lam, lam * 10)
    raise NumericsError(
        f"the Hessian stayed singular up to damping {damp * 10 ** (retries - 1)}; use more calibration samples"
    )


def gptq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmax: torch.Tensor,
    damp: float = 0.01,
    block: int = 128,
    device: torch.device | None = None,
    exact: torch.Tensor | None = None,
    factor: torch.Tensor | None = None,
    stop: Callable[[], None] = lambda: None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes for ``weight`` ``[N, K]`` on the grids ``scale * (q - zero)``, ``0 <= q <= qmax``.

    ``scale``/``zero`` are ``[N, K]`` (each column's group parameters), ``qmax`` is ``[K]`` (3 or 15),
    ``hessian`` is ``[K, K]`` in the same column order as ``weight``. Runs on ``device`` (default:
    the weight's); results come back on the weight's device.

    ``exact`` (bool ``[N, K]``) marks weights that will be stored exactly elsewhere (outliers): they
    carry no rounding error, so none is pushed onto later columns, and the second result holds,
    at those positions, the (error-updated) values to store. Returns ``(codes, exact values)``.

    ``factor``: :func:`inverse_hessian_factor` of this ``hessian`` and ``damp``, when the caller
    has it from an earlier call (a second pass over the same matrix skips the fp64 factorisations).
    ``stop`` is called before the factorisation's steps and each block of columns.
    """
    home = weight.device
    device = home if device is None else device
    weight, hessian, scale, zero, qmax = (t.to(device) for t in (weight, hessian, scale, zero, qmax))
    exact = None if exact is None else exact.to(device)
    w = weight.to(torch.float32).clone()
    dead = torch.diag(hessian) <= 0
    w[:, dead] = 0.0
    hinv = inverse_hessian_factor(hessian, damp, stop=stop) if factor is None else factor.to(device)
    n, k = w.shape
    codes = torch.zeros(n, k, dtype=torch.float32, device=device)
    targets = None if exact is None else torch.zeros(n, k, dtype=torch.float32, device=device)
    for start in range(0, k, block):
        stop()
        end = min(start + block, k)
        w1 = w[:, start:end].clone()
        errors = torch.zeros_like(w1)
        h1 = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            q = torch.clamp(torch.round(w1[:, i] / scale[:, col] + zero[:, col]), 0, qmax[col])
            codes[:, col] = q
            decoded = scale[:, col] * (q - zero[:, col])
            if exact is not None:
                decoded = torch.where(exact[:, col], w1[:, i], decoded)
                targets[:, col] = torch.where(exact[:, col], w1[:, i], 0.0)
            err = (w1[:, i] - decoded) / h1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    return codes.long().to(home), None if targets is None else targets.to(home)
