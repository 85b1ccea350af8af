"""A fast all-finite check for the hot paths (every tensor sent or received is checked).

``bool(torch.isfinite(t).all())`` builds several full-size temporaries on CPU (about 2.5 ms per
million float32 elements on this project's 2-core machine); two reductions do the same job in
about 0.2 ms. Max and min propagate NaN, +Inf shows up in the max and -Inf in the min.
"""

from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """True if ``t`` holds no NaN, +Inf or -Inf (always true for integer and empty tensors)."""
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return True
    if t.is_complex():
        return all_finite(torch.view_as_real(t))
    return bool(torch.isfinite(t.amax()) & torch.isfinite(t.amin()))
