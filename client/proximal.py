"""FedProx's proximal term (Li et al., MLSys 2020) in the client's local training.

FedProx has each client minimise ``F_k(w) + mu/2 * ||w - w_global||^2``, where
``w_global`` is the model the round started from (the server's FedProx strategy
sends ``mu`` as ``proximal-mu`` in the train config). The term's gradient,
``mu * (w - w_global)``, is applied as a step of its own after every optimizer step,

    w <- w - lr * mu * (w - w_global)        (the factor lr * mu capped at 1)

decoupled from the optimizer the way AdamW decouples weight decay (Loshchilov and
Hutter, ICLR 2019), instead of being added to the loss. With plain SGD the two are
the same update. With the client's AdamW they are not: AdamW rescales each
coordinate's gradient to about ``lr``, so where the task gradient is zero (the
embedding rows of tokens not in the batch) the tiny pull of a loss term becomes a
full +-lr step that moves the model away from the global one. Being data-independent,
the decoupled step is also plain post-processing under Opacus' DP-SGD, whose
per-sample clipping would not see a loss term on the parameters alone.

The pull per step is ``lr * mu``: with AdamW's small learning rates (5e-5 for
fine-tuning) ``mu`` must be correspondingly larger than the 0.001-1 used with SGD.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from sepal.model import exchanged_parameters

StepHook = Callable[[torch.optim.Optimizer, tuple, dict], None]


def proximal_step(model: torch.nn.Module, global_weights: OrderedDict[str, np.ndarray],
                  mu: float) -> StepHook:
    """A hook for ``optimizer.register_step_post_hook`` applying the proximal step.

    The (parameter, anchor) pairs are taken from ``model`` now, so they still refer
    to the right tensors after a wrapper (Opacus' GradSampleModule) renames them.
    """
    pairs = [(param, torch.as_tensor(global_weights[name]).to(param.device, param.dtype))
             for name, param in exchanged_parameters(model).items()]

    @torch.no_grad()
    def hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        factor = min(1.0, optimizer.param_groups[0]["lr"] * mu)
        for param, anchor in pairs:
            param.sub_(factor * (param - anchor))

    return hook
