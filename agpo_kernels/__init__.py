"""agpo_kernels: the fused LM-head + AGPO loss, importable into any trainer.

    from agpo_kernels import linear_logprobs, agpo_loss, AGPOLoss

* ``linear_logprobs``: token log-probs and entropies from hidden states and the LM-head
  weight, without ``[tokens x vocab]`` logits.
* ``agpo_loss`` / ``AGPOLoss``: the clipped GRPO/AGPO surrogate with per-sequence eps and
  temperature, KL to a reference, entropy bonus and dual clip on top of the same fused
  projection. Returns ``(loss, metrics)``.

Implementations (``impl=``): "reference" (naive eager, the test oracle), "torch" (tiled,
bounded memory, any device), "triton" (GPU kernels; CPU via ``TRITON_INTERPRET=1``) and
"auto" (triton on a CUDA device where it works, else torch). ``agpo_loss`` forms its
gradients during the forward call (``backward="forward"``, 6NDV) or recomputes logits in
the backward (``backward="recompute"``, 8NDV). SPEC section 2 has the math,
docs/kernels.md the designs.
"""

from .agpo_loss import AGPOLoss, agpo_loss
from .linear_logprobs import linear_logprobs
from .reference import linear_stats_reference

__all__ = ["linear_logprobs", "agpo_loss", "AGPOLoss", "linear_stats_reference"]
__version__ = "0.1.0"
