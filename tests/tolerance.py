"""Float comparisons whose tolerance is measured in the test, not guessed.

Two float32 computations of the same math (a carved model and the masked dense one, a fast kernel
and its reference, one process and two) differ by rounding, and by how much depends on the order of
the sums: the thread count, the CPU's vector width, the batch shape. A fixed atol sits somewhere in
that spread and passes or fails with the machine. A check here takes instead a floor measured on the
computation it checks (the float32 result's distance from a float64 run of the same computation, or
the spread of runs that differ only by rounding) and allows MARGIN times it, norm-relative, so that
no single element near zero decides.
"""

from __future__ import annotations

import copy

import torch

# One rounding of a float32 result, relative: no floor is smaller, even where a float64 run happens
# to round to the same float32 values.
FLOAT32_EPS = torch.finfo(torch.float32).eps
# Two float32 results that are each about one floor away from the exact value are up to about two
# floors apart; the floor itself, measured on one input, varies a few times between inputs and
# machines. Ten covers both, and a real error (a wrong mask, a missing term) is orders above it.
MARGIN = 10.0


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected||, computed in float64 (0 where both are zero)."""
    actual, expected = _float64(actual), _float64(expected)
    scale = expected.norm().item()
    gap = (actual - expected).norm().item()
    return gap / scale if scale else gap


def _float64(values) -> torch.Tensor:
    # a tensor keeps its values; Python floats (log-likelihoods, logged losses) must not pass through float32
    return values.double() if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)


def float64_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 twin of a float32 module: the same weights, and rounding about 1e-9 times smaller."""
    return copy.deepcopy(module).double()


@torch.no_grad()
def float32_floor(run, module: torch.nn.Module) -> float:
    """How far `run(module)` in float32 is from the same run on a float64 copy: this computation's rounding error."""
    return relative_error(run(module), run(float64_copy(module)))


def assert_within_floor(actual, expected, floor: float, what: str, margin: float = MARGIN) -> None:
    """actual equals expected up to `margin` times the measured rounding floor, norm-relative."""
    error = relative_error(actual, expected)
    bound = margin * max(floor, FLOAT32_EPS)
    assert error <= bound, (
        f"{what}: ||actual - expected|| / ||expected|| = {error:.2e} exceeds {margin:g} x the float32 rounding "
        f"floor {floor:.2e} of this computation (= {bound:.2e}); this is a difference in the computation, not rounding"
    )


@torch.no_grad()
def nudge_one_ulp(tensors, seed: int) -> None:
    """Move every element one float32 step up or down (at random, in place): a change the size of one rounding."""
    generator = torch.Generator().manual_seed(seed)
    for tensor in tensors:
        up = torch.rand(tensor.shape, generator=generator) < 0.5
        target = torch.where(up, torch.inf, -torch.inf).to(tensor.dtype)
        tensor.copy_(torch.nextafter(tensor, target))
