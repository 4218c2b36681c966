"""Low-rank float16 corrections of the quantization error, as mlx-lm LoRA factors.

For a weight W (out x in) quantized to deq(Q(W)), the error E = W - deq(Q(W))
is approximated by a rank-r matrix C and shipped as an mlx-lm adapter with
scale 1: LoRALinear computes y = x deq^T + (x A) B, so C = B^T A^T with
A = lora_a (in x r) and B = lora_b (r x out). Two choices of C:

- `svd`: the best rank-r approximation of E (truncated SVD; LQER / LoRC);
- `subspace`: E restricted to the fine-tune's own subspace, U U^T E V V^T
  (U, V orthonormal bases of the adapter's output / input spaces: the noise
  delta-survival's subspace_snr measures), truncated to rank r inside it.
"""

from __future__ import annotations

import numpy as np

CORRECTIONS = ("svd", "subspace")


def _split(us: np.ndarray, s: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # sqrt(s) on both sides keeps both factors near the same magnitude in float16.
    root = np.sqrt(np.maximum(s, 0.0)).astype(np.float32)
    lora_a = (vt.T * root[None, :]).astype(np.float32)  # in x r
    lora_b = (us * root[None, :]).T.astype(np.float32)  # r x out
    return lora_a, lora_b


def svd_factors(err: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """lora_a (in x r), lora_b (r x out) with lora_b^T lora_a^T the best rank-r approximation of err."""
    err = np.asarray(err, np.float32)
    rank = min(rank, *err.shape)
    us, s, vt = np.linalg.svd(err, full_matrices=False)
    return _split(us[:, :rank], s[:rank], vt[:rank])


def subspace_factors(err: np.ndarray, u: np.ndarray, v: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors of the best rank-r approximation of U U^T err V V^T (u: out x k, v: in x k orthonormal)."""
    err = np.asarray(err, np.float32)
    m = u.T @ err @ v  # k x k: the error's coordinates in the fine-tune's subspace
    p, s, qt = np.linalg.svd(m, full_matrices=False)
    rank = min(rank, len(s))
    return _split(u @ p[:, :rank], s[:rank], qt[:rank] @ v.T)


def correction(lora_a: np.ndarray, lora_b: np.ndarray) -> np.ndarray:
    """The dense correction C (out x in) the factors add to the weight."""
    return lora_b.T @ lora_a.T


def energy_kept(err: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, u=None, v=None) -> dict:
    """How much of the error the correction removes: overall, and inside the
    fine-tune's subspace when its bases are given (1 = all of it)."""
    c = correction(lora_a, lora_b)
    rest = err - c
    out = {"error_removed": float(1.0 - (rest**2).sum() / max(float((err**2).sum()), 1e-30))}
    if u is not None and v is not None:
        before = u.T @ err @ v
        after = u.T @ rest @ v
        out["subspace_error_removed"] = float(1.0 - (after**2).sum() / max(float((before**2).sum()), 1e-30))
    return out


def extra_bits_per_weight(shapes: list[tuple[int, int]], rank: int, total_params: int, dtype_bits: int = 16) -> float:
    """What rank-r float16 factors on tensors of these (out, in) shapes add to bits per weight."""
    return dtype_bits * rank * sum(o + i for o, i in shapes) / total_params


def rank_for_budget(shapes: list[tuple[int, int]], budget_bits: float, total_params: int, max_rank: int) -> int:
    """The largest rank whose factors fit in `budget_bits` per weight (0 if none fits)."""
    per_rank = extra_bits_per_weight(shapes, 1, total_params)
    if per_rank <= 0:
        return 0
    return int(max(0, min(max_rank, np.floor(budget_bits / per_rank + 1e-9))))
