"""``tether sample``: K responses per prompt from any policy checkpoint, for ranking."""

from __future__ import annotations

import argparse

from tether.config import add_renamed_flag
from tether.data.formats import read_records, write_records


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="sample K responses per prompt from a policy (input for `tether label simulate` / the labeling app)",
    )
    p.add_argument(
        "--policy",
        required=True,
        metavar="[NAME=]PATH",
        help="the policy, as in `tether eval`: an HF model directory, 'default' or 'tiny', optionally named "
        "(NAME is recorded as each response's source policy; default: PATH)",
    )
    add_renamed_flag(
        p,
        "--prompts-file",
        "--prompts",
        dest="prompts",
        help="prompt records (JSONL/Parquet/datasets dir); default: the default task's",
    )
    add_renamed_flag(p, "--out-file", "--out", dest="out", required=True, help="output sample records (JSONL)")
    p.add_argument("--k", type=int, default=4, help="responses per prompt, 2..9 (default 4)")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy-name", help=argparse.SUPPRESS)  # before --policy NAME=PATH
    p.set_defaults(func=_run)


def policy_name_and_path(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` (how `tether eval --policy` names a policy) or a bare PATH, named by itself."""
    name, sep, path = spec.partition("=")
    if sep and name and path and "/" not in name:
        return name, path
    return spec, spec


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
    name, path = policy_name_and_path(args.policy)
    model, tokenizer = load_causal_lm(path)
    with progress_bar("sample") as bar:
        task = bar.add_task("sample", total=len(prompts) * args.k, stats="")
        samples = sample_k(
            model,
            tokenizer,
            prompts,
            args.k,
            policy_name=args.policy_name or name,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=lambda done, total: bar.update(task, completed=done),
        )
    write_records(args.out, samples)
    print(f"wrote {len(samples)} prompts x {args.k} responses to {args.out}")
    return 0
