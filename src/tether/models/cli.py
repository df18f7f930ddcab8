"""``tether sample``: K responses per prompt from any policy checkpoint, for ranking."""

from __future__ import annotations

import argparse

from tether.data.formats import read_records, write_records


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="sample K responses per prompt from a policy (input for `tether label simulate` / the labeling app)",
    )
    p.add_argument("--policy", required=True, help="policy: HF model directory, 'default' or 'tiny'")
    p.add_argument("--prompts", help="prompt records (JSONL/Parquet/datasets dir); default: the default task's")
    p.add_argument("--out", required=True, help="output sample records (JSONL)")
    p.add_argument("--k", type=int, default=4, help="responses per prompt, 2..9 (default 4)")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy-name", help="name recorded as each response's source policy (default: --policy)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: sampling (torch, transformers, rich), which `tether --help` must not load.
    from tether.metrics import progress_bar
    from tether.models.generation import sample_k
    from tether.models.loading import load_causal_lm

    if args.prompts:
        prompts = read_records(args.prompts, "prompt")
    else:
        from tether.data.task import build_default_task

        prompts = build_default_task().prompts
    prompts = prompts[: args.limit] if args.limit else prompts
    model, tokenizer = load_causal_lm(args.policy)
    with progress_bar("sample") as bar:
        task = bar.add_task("sample", total=len(prompts) * args.k, stats="")
        samples = sample_k(
            model,
            tokenizer,
            prompts,
            args.k,
            policy_name=args.policy_name or args.policy,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=lambda done, total: bar.update(task, completed=done),
        )
    write_records(args.out, samples)
    print(f"wrote {len(samples)} prompts x {args.k} responses to {args.out}")
    return 0
