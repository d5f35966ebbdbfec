"""Weight refactorization: every ``every`` steps re-balance each factorized weight without moving it.

For every parametrization with factors B (m x r) and A (r x n) (low_rank, sltrain, and lora's B A):
B <- U_r sqrt(S_r), A <- sqrt(S_r) V_r^T where U_r S_r V_r^T is the SVD of the product B A, computed
in fp32 without any m x n matrix: QR of B and of A^T, then an r x r SVD of R_B R_A^T. The new factors
are written in place into the (possibly sharded) originals, computed from the whole factors, so every
rank writes the same values. The sparse part S and the scale alpha / r are untouched.

Column signs are normalized (the largest-magnitude entry of each column of B is positive), so a
second refactorization gives back the same factors. Directions with a zero singular value (e.g. a
LoRA B that is still zero) get a zero column in B and an orthonormal row in A, so the product stays
the same and both factors keep receiving gradients; a weight whose product is exactly zero is left
as it is.

Refactorization changes the factors, so Adam moments of B and A no longer match them: compose with
``momentum_reset`` for that (this method does not touch optimizer state).
"""

from __future__ import annotations

import dataclasses

import torch

from slimtrain.registry import Capability, HookStage, Method, Requirement, StepContext, check_range, hookimpl
from slimtrain.registry.parametrization import FactorizedParametrization, iter_parametrized, originals
from slimtrain.registry.tensors import full_tensor, write_full_

NAME = "refactorization"


@torch.no_grad()
def balanced_factors(b: torch.Tensor, a: torch.Tensor, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Balanced factors of the product ``b @ a`` in fp32 (None when the product is zero)."""
    work = torch.promote_types(torch.promote_types(b.dtype, a.dtype), torch.float32)  # fp32, or fp64 if given
    b32, a32 = b.to(work), a.to(work)
    if not (b32.abs().max() > 0 and a32.abs().max() > 0):
        return None
    qb, rb = torch.linalg.qr(b32)  # b = qb rb, qb m x r
    qa, ra = torch.linalg.qr(a32.t())  # a^T = qa ra, qa n x r
    u, s, vh = torch.linalg.svd(rb @ ra.t())  # r x r
    root = s.sqrt()
    new_b = (qb @ u) * root  # m x r
    new_a_dir = vh @ qa.t()  # r x n, orthonormal rows
    new_a = root[:, None] * new_a_dir
    dead = s <= tol * s.max() if s.numel() else s.bool()
    if bool(dead.any()):
        new_b[:, dead] = 0.0
        new_a[dead] = new_a_dir[dead]
    # Sign convention: the largest-magnitude entry of each column of B (row of A where B is dead) > 0.
    col_ref = new_b.gather(0, new_b.abs().argmax(0, keepdim=True)).squeeze(0)
    row_ref = new_a.gather(1, new_a.abs().argmax(1, keepdim=True)).squeeze(1)
    sign = torch.where(torch.where(dead, row_ref, col_ref) < 0, -1.0, 1.0)
    return (new_b * sign).contiguous(), (sign[:, None] * new_a).contiguous()


def refactorize_(model: torch.nn.Module) -> int:
    """Refactorize every factorized weight of ``model`` in place; returns how many were changed."""
    changed = 0
    for _fqn, linear, p in iter_parametrized(model):
        if not isinstance(p, FactorizedParametrization):
            continue
        orig = originals(linear)
        if "B" not in orig or "A" not in orig:
            continue
        out = balanced_factors(full_tensor(orig["B"]), full_tensor(orig["A"]))
        if out is None:
            continue
        write_full_(orig["B"], out[0])
        write_full_(orig["A"], out[1])
        changed += 1
    return changed


@dataclasses.dataclass(frozen=True)
class RefactorizationConfig:
    every: int = 200  # steps between refactorizations

    def __post_init__(self) -> None:
        check_range(NAME, "every", self.every, low=1)


class Refactorization(Method):
    name = NAME
    summary = "every N steps re-balance factors B, A of each factorized weight (SVD of B A), weight unchanged"
    Config = RefactorizationConfig
    provides = frozenset({Capability.STEP_HOOK})
    requires = (Requirement(Capability.FACTORIZED, "a factorized parametrization"),)
    hook_stage = HookStage.WEIGHTS

    def after_step(self, ctx: StepContext) -> None:
        if ctx.step % self.config.every != 0:
            return
        for part in ctx.model_parts:
            refactorize_(part)


@hookimpl
def register_methods(register):
    register(Refactorization)
