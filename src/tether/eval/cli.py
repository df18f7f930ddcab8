"""``tether eval``: compare policies on held-out prompts; writes eval.json and report.html."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="compare policies: win rate vs a baseline (held-out labelers), Likert, flags, RM score, KL, alignment tax",
    )
    p.add_argument(
        "--policy",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a policy to evaluate (repeat): NAME=HF dir, 'default' or 'tiny'",
    )
    p.add_argument("--baseline", required=True, help="NAME of the policy to compare against (e.g. sft)")
    p.add_argument("--prompts", help="held-out prompt records; default: the default task's test split")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--reward-model", help="RM directory: report mean RM score")
    p.add_argument("--ref-policy", help="reference (SFT) policy: report KL to it")
    p.add_argument(
        "--pretrain",
        help="held-out pretraining text records: report perplexity (alignment tax); "
        "default: the default task's held-out corpus",
    )
    p.add_argument("--human", help="comparisons ranked by people (with per-response policies): human win rates")
    p.add_argument(
        "--samples-per-prompt",
        type=int,
        default=1,
        help="responses per prompt and policy (narrows the win-rate interval; bootstrapped over prompts)",
    )
    p.add_argument(
        "--best-of",
        action="append",
        default=[],
        metavar="NAME=N",
        help="make policy NAME best-of-N: keep the response the --reward-model scores highest of N samples "
        "(repeat; e.g. --policy sft_bo4=runs/sft/final --best-of sft_bo4=4)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="sequences sampled per forward pass")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval", help="output directory (eval.json, report.html, PNGs)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from tether.data.formats import read_records
    from tether.eval.evaluate import evaluate_policies
    from tether.eval.report import write_report

    policies = {}
    for spec in args.policy:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--policy expects NAME=PATH, got {spec!r}")
        policies[name] = path
    best_of = {}
    for spec in args.best_of:
        name, sep, n = spec.partition("=")
        if not sep or not n.isdigit():
            raise ValueError(f"--best-of expects NAME=N with N a whole number, got {spec!r}")
        best_of[name] = int(n)
    if args.prompts:
        prompts = read_records(args.prompts, "prompt")
    else:
        from tether.pipeline import default_splits

        prompts = default_splits(seed=args.seed)["test"]
    prompts = prompts[: args.limit] if args.limit else prompts
    if args.pretrain:
        pretrain = read_records(args.pretrain, "pretrain")
    else:
        from tether.data.task import build_default_task

        pretrain = build_default_task().pretrain_heldout
    human = read_records(args.human, "comparison") if args.human else ()
    report = evaluate_policies(
        policies,
        prompts,
        baseline=args.baseline,
        reward_model=args.reward_model,
        ref_policy=args.ref_policy,
        pretrain_heldout=pretrain,
        human_comparisons=human,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        samples_per_prompt=args.samples_per_prompt,
        best_of=best_of,
        seed=args.seed,
    )
    path = write_report(report, args.out)
    for p in report.policies:
        ci = f"[{p.win_ci[0]:.2f}, {p.win_ci[1]:.2f}]" if p.win_ci else ""
        print(
            f"{p.name:>10}: win {p.win_rate:.3f} {ci}  likert {p.likert:.2f}  len {p.length:.1f}  "
            f"ppl {p.pretrain_ppl if p.pretrain_ppl is None else round(p.pretrain_ppl, 2)}"
        )
    print(f"report: {path}")
    return 0
