"""``python -m agpo.eval``: held-out accuracy of a model on a task.

    python -m agpo.eval --model PATH_OR_PRESET --dataset gsm8k [--data-path F] [--limit N]
                        [--samples K] [--temperature T] [--out DIR]

Writes ``predictions.jsonl`` (one line per problem: prompt, completion, extracted answer,
reference, correct; with K > 1 every sample and the majority answer) and ``summary.json``
to ``--out``, and prints the summary. The metrics are described in ``agpo.tasks.evaluate``
(``evaluate(model, tokenizer, problems, ...)`` is the same in-process).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from agpo.errors import DataError, ModelNotFoundError
from agpo.models import DTYPES, PRESETS, load_model_and_tokenizer
from agpo.tasks.data import SPLITS, DataConfig, load_problems, task_options
from agpo.tasks.evaluate import default_max_new_tokens, evaluate


# -- the command -------------------------------------------------------------------------
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s.strip("/")).strip("-")[-60:] or "model"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m agpo.eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help=f"preset ({', '.join(PRESETS)}), local folder/.gguf or HF id")
    ap.add_argument("--dataset", default="gsm8k", help="arith, gsm8k, math, math500, file, basic_arithmetic, "
                    "chain_sum, gsm_symbolic, rg:NAME, hf:NAME[:CONFIG]")
    ap.add_argument("--data-path", default=None, help="data file (jsonl/json/csv/parquet)")
    ap.add_argument("--split", default="test", choices=SPLITS, help="which split of the dataset")
    ap.add_argument("--limit", type=int, default=None, help="first N problems")
    ap.add_argument("--prompt-field", default=None, help="question field of a generic file")
    ap.add_argument("--answer-field", default=None, help="answer field of a generic file")
    ap.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                    help="reasoning-gym generator option, repeatable (e.g. max_terms=2); values read as JSON")
    ap.add_argument("--samples", type=int, default=1, help="K samples per problem (mean@K, maj@K)")
    ap.add_argument("--temperature", type=float, default=None, help="0 = greedy (default for K=1; 1.0 for K>1)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0: plain temperature sampling)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the preset's, else 512")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed; also the generated tasks' seed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default=None, choices=DTYPES,
                    help="compute dtype (default None: float32 on CPU, the preset's on GPU)")
    ap.add_argument("--attn", default=None, help="attention implementation (default: flash-attn, else sdpa)")
    ap.add_argument("--out", default=None, help="output folder (default runs/eval/MODEL_DATASET_SPLIT)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit {args.limit}: must be at least 1")
        problems = load_problems(DataConfig(dataset=args.dataset, path=args.data_path, split=args.split,
                                            limit=args.limit, seed=args.seed, prompt_field=args.prompt_field,
                                            answer_field=args.answer_field,
                                            generator_options=task_options(args.task_option)))
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device,
                                                    attn=args.attn, seed=args.seed)
        result = evaluate(model, tokenizer, problems, samples=args.samples, temperature=args.temperature,
                          top_p=args.top_p, batch_size=args.batch_size, seed=args.seed,
                          max_new_tokens=args.max_new_tokens or default_max_new_tokens(args.model, tokenizer),
                          progress=not args.no_progress)
    except (DataError, ModelNotFoundError, ValueError) as e:
        print(f"agpo.eval: error: {e}", file=sys.stderr)
        return 2
    summary = {"model": args.model, "dataset": args.dataset, "data_path": args.data_path, "split": args.split,
               **result["summary"]}
    out = Path(args.out or Path("runs") / "eval" / f"{_slug(args.model)}_{_slug(args.dataset)}_{args.split}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for rec in result["records"]:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'predictions.jsonl'} and {out / 'summary.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
