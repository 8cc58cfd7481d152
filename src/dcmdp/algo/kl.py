"""KL divergence to a reference policy: a regulariser the trainer adds beside any policy loss.

``loss = policy_loss + kl_coef * kl_to_reference_k3(logp, ref_logp, mask)`` with the reference
the initial policy (``loss.kl_coef`` in the config; 0 turns it off).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dcmdp.algo.masked import masked_mean

# Bounds of the k3 estimator: the log ratio before exp(), and each token's k3 value. With top-k /
# top-p the reference can give probability 0 to a token the policy keeps (log ratio -inf, k3
# +inf); verl's "low_var_kl" clamps the same way (log ratio to +-20, k3 to 10).
KL_LOG_RATIO_BOUND = 20.0
KL_K3_MAX = 10.0


def kl_to_reference_k3(logp_BT: Tensor, ref_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Token mean over the mask of the k3 estimator of KL(pi || ref), differentiable in ``logp_BT``.

    ``k3 = exp(log_r) - 1 - log_r`` with ``log_r = ref_logp - logp`` (Schulman's low-variance,
    always >= 0 estimator). Masked positions are replaced before any arithmetic: at prompt and
    padding positions both log-probs can be -inf under top-k / top-p, and ``-inf - -inf`` would
    put NaN into the gradient even behind a ``torch.where``. ``log_r`` is clamped to
    +-KL_LOG_RATIO_BOUND and k3 to KL_K3_MAX (a clamped token passes no gradient).
    """
    keep = mask_BT != 0
    zeros = torch.zeros_like(logp_BT)
    logp = torch.where(keep, logp_BT, zeros)
    ref = torch.where(keep, ref_logp_BT.detach(), zeros)
    finite = torch.isfinite(logp) & torch.isfinite(ref)
    # A probability 0 on one side only is the bound in that direction; on both sides, no term.
    edge = torch.where(torch.isneginf(ref), -KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)
    edge = torch.where(torch.isneginf(ref) & torch.isneginf(logp), zeros, edge)
    log_r = torch.where(finite, ref - logp, edge).clamp(-KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)
    k3 = (torch.exp(log_r) - 1 - log_r).clamp(max=KL_K3_MAX)
    return masked_mean(k3, keep)
