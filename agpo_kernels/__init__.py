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
the backward (``backward="recompute"``, 8NDV). docs/algorithm.md#the-policy-loss has the math,
docs/kernels.md the designs.

Layers, each importing only those below it (tests/test_layout.py checks it):

- public: ``agpo_loss``, ``linear_logprobs``, ``reference``, ``integrations`` (these may
  use ``agpo.algo`` alone of the training package);
- ``dispatch``: which engine runs a call, and the probe of "auto";
- designs: ``fused_loss`` (forward-gradient), ``recompute``, ``surrogate`` (autograd
  objective); they receive the engine as an argument;
- engines: ``torch_engine/``, ``triton_engine/``;
- shared: ``inputs`` (argument checks and layouts), ``chunks``, ``partials``,
  ``precision``, ``epilogue``.

Nothing here imports the ``agpo`` training package outside ``integrations``.
"""

from agpo_kernels.agpo_loss import AGPOLoss, agpo_loss
from agpo_kernels.linear_logprobs import linear_logprobs
from agpo_kernels.reference import linear_stats_reference

__all__ = ["linear_logprobs", "agpo_loss", "AGPOLoss", "linear_stats_reference"]
__version__ = "0.1.0"
