"""Run by tests/test_verl_engine.py in .venv-verl, under ``torchrun --nproc_per_node W``
(gloo, CPU): ``python -m torch.distributed.run --standalone --nproc_per_node W
tests/verl_engine_check.py MODEL_DIR BATCH_FILE OUT_DIR``.

Each rank takes its rows of the batch the test wrote and, for each layout (packed or
padded; fixed or dynamic micro-batches), runs two real verl FSDP2 engines on them, each
given the rows' temperatures as verl's per-row ``temperature`` tensor: verl's own
``FSDPEngineWithLMHead`` (non-fused), and the engine verl's registry picks (agpo's, with
``impl_backend=agpo``). Both score the rows (log-probs, entropy), then take one training step
on the same loss; each rank saves what came out, the gradients, the shape of every
``lm_head`` output, the ``agpo_eps`` each micro-batch's loss saw and the message that
refuses ``calculate_sum_pi_squared``, to OUT_DIR/rank{R}.pt."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import verl_cpu  # noqa: E402

verl_cpu.use_cpu_platform()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

LAYOUTS = {"packed": dict(remove_padding=True, dynamic_bsz=False),
           "packed_dynamic": dict(remove_padding=True, dynamic_bsz=True),
           "padded": dict(remove_padding=False, dynamic_bsz=False)}


def rows_of(batch: dict, rank: int, world: int) -> dict:
    n = batch["input_ids"].shape[0] // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def tensordict(rows: dict, *, layout: dict, agpo: bool) -> TensorDict:
    td = TensorDict({k: rows[k].clone() for k in ("input_ids", "attention_mask", "response_mask", "position_ids",
                                                  "row", "coef", "agpo_eps")}, batch_size=[rows["row"].shape[0]])
    td = left_right_2_no_padding(td)
    td["temperature"] = rows["temperature"].clone()  # per row, as the AGPO trainer sends it
    tu.assign_non_tensor(td, calculate_entropy=True, use_remove_padding=layout["remove_padding"],
                         use_dynamic_bsz=layout["dynamic_bsz"], micro_batch_size_per_gpu=2, max_token_len_per_gpu=24,
                         use_fused_kernels=agpo, global_batch_size=int(rows["row"].shape[0]))
    return td


def flat(nested: torch.Tensor) -> torch.Tensor:
    return torch.cat(nested.unbind()) if nested.is_nested else nested.reshape(-1)


def run(folder: str, rows: dict, layout: dict, agpo: bool) -> dict:
    eng = verl_cpu.engine(folder, agpo=agpo, verl_own=not agpo, **layout)
    head_shapes, eps_seen = [], []
    head = eng.module.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, o: head_shapes.append(tuple(o.shape)))

    def loss_fn(model_output, data, dp_group=None):
        eps_seen.append((data["row"].clone(), data["agpo_eps"].clone()))
        lp, ent = model_output["log_probs"], model_output["entropy"]
        coef = torch.repeat_interleave(data["coef"], lp.offsets().diff())
        loss = -(flat(lp) * coef).sum() / 50 - 0.1 * flat(ent).sum() / 50
        return loss, {}

    with eng.eval_mode():
        out = eng.infer_batch(tensordict(rows, layout=layout, agpo=agpo))["model_output"]
    scored = {"engine": type(eng).__name__, "logp": [t.clone() for t in out["log_probs"].unbind()],
              "entropy": [t.clone() for t in out["entropy"].unbind()]}
    grads, step = {}, eng.optimizer_step

    def optimizer_step():  # the gradients as the optimizer gets them
        grads.update({n: p.grad.full_tensor().clone() for n, p in eng.module.named_parameters()
                      if p.grad is not None})
        return step()

    eng.optimizer_step = optimizer_step
    with eng.train_mode():
        eng.train_batch(tensordict(rows, layout=layout, agpo=agpo), loss_function=loss_fn)
    refused = None
    if agpo:  # what needs the whole logits is refused, by name
        td = tensordict(rows, layout=layout, agpo=agpo)
        tu.assign_non_tensor(td, calculate_sum_pi_squared=True)
        try:
            with eng.eval_mode():
                eng.infer_batch(td)
        except NotImplementedError as exc:
            refused = str(exc)
    hook.remove()
    return {**scored, "grads": grads, "head_shapes": head_shapes, "eps_seen": eps_seen, "refused": refused}


def main(folder: str, batch_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = rows_of(torch.load(batch_file), rank, world)
    result = {"rows": rows["row"].tolist()}
    for name, layout in LAYOUTS.items():
        result[name] = {"verl": run(folder, rows, layout, agpo=False), "agpo": run(folder, rows, layout, agpo=True)}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
