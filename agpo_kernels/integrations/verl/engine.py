"""agpo's fused LM head inside verl's FSDP engine: with ``model.use_fused_kernels=True`` and
``model.fused_kernel_options.impl_backend=agpo``, the actor's and reference's log-probs and
entropy come from ``agpo_kernels.linear_logprobs`` at each row's temperature, and the
``[tokens, vocab]`` logits never exist. verl's own fused kernels refuse a per-row
temperature (``use_fused_kernels does not support per sample temperature yet``); its
non-fused path materialises the logits (plus a temperature-scaled copy and, for the
entropy, a softmax).

How: ``AGPOFSDPEngineWithLMHead`` subclasses verl's ``FSDPEngineWithLMHead`` and is
registered under the ``("cuda", "nvidia")`` key of verl's engine registry, which
``EngineRegistry.get_engine_cls`` prefers to the plain ``"cuda"`` key (NVIDIA only: other
CUDA-compatible vendors get verl's own engine). Whenever the plugin is installed it is the
FSDP/FSDP2 language-model engine on NVIDIA GPUs, so it stays verl's engine line for line
unless asked with ``impl_backend=agpo``: the model's output-embedding module (``lm_head``) gets a forward
  that, while the engine has a request pending, returns ``[..., 2]`` "logits": the
  log-prob of the engine's (rolled) label and the entropy, at the engine's per-token
  temperatures. The head is still called from inside the model's own forward and its
  result is the model's output, so FSDP2 gathers the weight for the forward and again
  for the backward (its pre-backward hook sits on the module's outputs) as on verl's
  path. The engine then hands the two columns to verl's fused-kernel output handling
  (packing, Ulysses gather, nesting), as verl's own fused forward would.

The temperature is verl's ``temperature`` field, a scalar or a ``[B]`` tensor of per-row
values, read as verl's non-fused path reads it. (Keeping verl's V1 trainer from writing its
scalar over a per-row tensor is the AGPO trainer's job: ``agpo.integrations.verl.trainer``.)

Not supported with ``impl_backend=agpo`` (each refused with a message): verl's top-k
distillation and ``calculate_sum_pi_squared``, which need the whole logits; models whose
forward changes the logits after the head (Gemma2's soft-capping, Cohere's and Granite's
logit scales), which would transform the two columns instead.
"""

from __future__ import annotations

import types

import torch
from verl.utils import tensordict_utils as tu
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from agpo_kernels.linear_logprobs import linear_logprobs

AGPO_BACKEND = "agpo"
"""``fused_kernel_options.impl_backend`` value that selects agpo's head."""


class _HeadRequest:
    """What the patched head computes for one micro-batch."""

    def __init__(self, labels: torch.Tensor, temperature: torch.Tensor, rows: torch.Tensor | None):
        self.labels = labels            # [L] packed next-token ids
        self.temperature = temperature  # [L] fp32 per-token temperature
        self.rows = rows                # [B, S] bool valid positions of a padded batch, or None (packed)


def _agpo_head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    """Forward of the model's ``lm_head`` under ``impl_backend=agpo``: a plain linear layer
    unless the engine left a request, in which case ``[..., 2]``: log-prob and entropy."""
    request = getattr(self, "_agpo_request", None)
    if request is None:
        return torch.nn.functional.linear(hidden, self.weight, self.bias)
    weight, bias = self.weight, self.bias
    if hasattr(weight, "full_tensor"):  # a tensor-parallel (vocabulary-sharded) head
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    flat = hidden.reshape(-1, hidden.shape[-1]) if request.rows is None else hidden[request.rows]
    if flat.shape[0] != request.labels.shape[0]:
        raise RuntimeError(f"agpo head: {flat.shape[0]} hidden rows for {request.labels.shape[0]} labels; the "
                           "model's forward reached lm_head with a layout this engine does not know")
    logp, entropy = linear_logprobs(flat, weight, request.labels, bias=bias, temperature=request.temperature,
                                    ignore_index=None)
    stats = torch.stack([logp, entropy], dim=-1)  # [L, 2]
    if request.rows is None:
        return stats.reshape(*hidden.shape[:-1], 2)
    dense = stats.new_zeros(*request.rows.shape, 2)
    return dense.masked_scatter(request.rows.unsqueeze(-1), stats)


LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}
"""Model-config attributes (and their no-op values) of forwards that transform the head's output."""


def check_head_model(config) -> None:
    """Raises ``NotImplementedError`` for a model (its HF config) whose forward transforms the
    head's output: there it would transform the log-prob and entropy columns instead."""
    for attr, noop in LOGIT_TRANSFORMS.items():
        value = getattr(config, attr, noop)
        if value is not None and value != noop:
            raise NotImplementedError(f"impl_backend={AGPO_BACKEND}: this model's forward changes the logits after "
                                      f"its head ({attr}={value}); set use_fused_kernels=false")


def _refuse(micro_batch, key: str, why: str) -> None:
    if tu.get_non_tensor_data(data=micro_batch, key=key, default=False):
        raise NotImplementedError(f"{key}=True with fused_kernel_options.impl_backend={AGPO_BACKEND}: {why}; "
                                  "turn it off or use impl_backend=torch without per-row temperatures")


@EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cuda", vendor="nvidia")
class AGPOFSDPEngineWithLMHead(FSDPEngineWithLMHead):
    """verl's FSDP language-model engine, with agpo's head under ``impl_backend=agpo``
    (module docstring)."""

    @property
    def agpo_head(self) -> bool:
        """Whether this engine computes log-probs with agpo's fused head."""
        options = self.model_config.fused_kernel_options or {}
        return bool(self.model_config.use_fused_kernels) and options.get("impl_backend") == AGPO_BACKEND

    def _build_module(self):
        module = super()._build_module()
        if self.agpo_head:
            check_head_model(module.config)
            head = module.get_output_embeddings()
            if not isinstance(head, torch.nn.Linear):
                raise NotImplementedError(f"impl_backend={AGPO_BACKEND} needs the model's output embeddings to be a "
                                          f"torch.nn.Linear, got {type(head).__name__}")
            head.forward = types.MethodType(_agpo_head_forward, head)
            self._agpo_lm_head = head
        return module

    def prepare_model_inputs(self, micro_batch):
        if not self.agpo_head:
            return super().prepare_model_inputs(micro_batch)
        _refuse(micro_batch, "distillation_use_topk", "top-k distillation reads the whole logits")
        _refuse(micro_batch, "calculate_sum_pi_squared", "sum(pi^2) needs the whole logits")
        # verl's non-fused preparation: labels and per-token temperatures, no fused-only args
        plain = micro_batch.copy()
        tu.assign_non_tensor(plain, use_fused_kernels=False)
        model_inputs, output_args = super().prepare_model_inputs(plain)
        if "temperature_rmpad" in output_args:  # packed (use_remove_padding)
            request = _HeadRequest(output_args["input_ids_rmpad_rolled"], output_args["temperature_rmpad"], None)
        else:  # padded: [B, S] hidden states, valid positions from the nested lengths
            lengths = micro_batch["input_ids"].offsets().diff()
            width = model_inputs["input_ids"].shape[1]
            rows = torch.arange(width, device=lengths.device) < lengths.unsqueeze(1)
            temperature = output_args["temperature"].to(torch.float32).unsqueeze(1).expand(-1, width)[rows]
            request = _HeadRequest(output_args["input_ids_rmpad_rolled"], temperature, rows)
        self._agpo_lm_head._agpo_request = request
        return model_inputs, output_args

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        if not self.agpo_head:
            return super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        self._agpo_lm_head._agpo_request = None
        stats = output.logits
        if stats.shape[-1] != 2:
            raise RuntimeError("agpo head: the model's forward did not return its lm_head's output as logits; "
                               "impl_backend=agpo supports models whose forward ends in get_output_embeddings()")
        # [1, L] packed or [B, S] padded, the shapes verl's fused forward returns
        fused = types.SimpleNamespace(log_probs=stats[..., 0], entropy=stats[..., 1])
        if not tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False):
            micro_batch = micro_batch.copy()
            tu.assign_non_tensor(micro_batch, use_fused_kernels=True)
        return super().prepare_model_outputs(fused, output_args, micro_batch, logits_processor_func)
