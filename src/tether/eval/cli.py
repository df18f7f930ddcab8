"""``tether eval``: compare policies on held-out prompts; writes eval.json and report.html.

Two ways in: ``--run DIR`` evaluates a finished ``tether run`` (its policies, its reward model, its
test split and held-out pretraining text, its evaluation settings unless flags override them);
``--policy NAME=PATH ...`` evaluates any model directories. Settings are :class:`EvalConfig`'s.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from tether.config import (
    EvalConfig,
    RunConfig,
    add_config_args,
    add_renamed_flag,
    config_from_args,
    from_dict,
    set_dotted,
    to_dict,
)
from tether.data.formats import read_records
from tether.data.sources import alignment_tax_off, eval_sources, record_inputs

if TYPE_CHECKING:
    from tether.eval.evaluate import EvalReport


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="compare policies: win rate vs a baseline (held-out labelers), Likert, flags, RM score, KL, alignment tax",
    )
    p.add_argument("--run", help="a finished `tether run` directory: evaluate its policies on its test split")
    p.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a policy to evaluate (repeat): NAME=HF dir, 'default' or 'tiny'",
    )
    p.add_argument("--reward-model", help="RM directory: report mean RM score (default with --run: the run's)")
    p.add_argument("--ref-policy", help="reference (SFT) policy: report KL to it (default with --run: the run's)")
    p.add_argument("--human", help="comparisons ranked by people (with per-response policies): human win rates")
    p.add_argument(
        "--simulated-labelers",
        action="store_true",
        help="on prompts of your own, also print the simulated panel's win rates and Likert (their rubric is "
        "written for the built-in task's prompts; on the built-in task they are always printed)",
    )
    p.add_argument(
        "--best-of",
        action="append",
        default=[],
        metavar="NAME=N",
        help="make policy NAME best-of-N: keep the response the --reward-model scores highest of N samples "
        "(repeat; e.g. --policy sft_bo4=runs/sft/final --best-of sft_bo4=4)",
    )
    add_renamed_flag(
        p,
        "--out-dir",
        "--out",
        dest="out",
        help="output directory (eval.json, report.html, PNGs); default runs/eval, or RUN/eval-cli",
    )
    add_config_args(p, EvalConfig)
    p.set_defaults(func=_run)


def _pairs(specs: list[str], flag: str, what: str) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} expects NAME={what}, got {spec!r}")
        out[name] = value
    return out


def _run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the evaluation (torch) and the report (matplotlib), which
    # `tether --help` must not load.
    from tether.eval.evaluate import evaluate_policies, load_eval, save_eval
    from tether.eval.report import write_report

    human = read_records(args.human, "comparison") if args.human else None
    best_of = {}
    for name, n in _pairs(args.best_of, "--best-of", "N").items():
        if not n.isdigit():
            raise ValueError(f"--best-of expects NAME=N with N a whole number, got {name}={n}")
        best_of[name] = int(n)
    if args.run:
        from tether.pipeline import Manifest, evaluate_run

        run = Path(args.run)
        if not (run / "manifest.json").exists() or not (run / "config.yaml").exists():
            raise FileNotFoundError(f"--run {run}: no manifest.json / config.yaml (not a tether run directory)")
        if args.policy or args.best_of or args.reward_model or args.ref_policy:
            raise ValueError("--run evaluates the run's own policies: leave out --policy, --best-of, --reward-model")
        run_cfg = from_dict(RunConfig, yaml.safe_load((run / "config.yaml").read_text()))
        manifest = Manifest(run / "manifest.json")
        missing = [s for s in ("data", "sft", f"round-{run_cfg.rounds}/ppo_ptx") if not manifest.done(s)]
        if missing:
            raise ValueError(f"--run {run}: stages {missing} are not finished; rerun `tether run` first")
        # The run's own evaluation settings, with the flags given here on top.
        data = to_dict(run_cfg.eval)
        for key, value in vars(args).items():
            if key.startswith("cfg__"):
                set_dotted(data, key[len("cfg__") :], value)
        eval_cfg = from_dict(EvalConfig, data)
        eval_cfg.validate()
        out = Path(args.out) if args.out else run / "eval-cli"
        res = evaluate_run(run_cfg, manifest, out, out, print, eval_cfg=eval_cfg, human_comparisons=human)
        report = load_eval(res.eval)
        path = res.report
    else:
        policies = _pairs(args.policy, "--policy", "PATH")
        if not policies:
            raise ValueError("tether eval needs --run DIR or at least one --policy NAME=PATH")
        cfg = eval_sources(config_from_args(EvalConfig, "eval", args), print)
        own_prompts = bool(cfg.prompts_file)
        if cfg.prompts_file:
            prompts = read_records(cfg.prompts_file, "prompt")
        else:
            from tether.data.task import default_splits

            prompts = default_splits(seed=cfg.seed)["test"]
        if cfg.pretrain_file:
            pretrain = read_records(cfg.pretrain_file, "pretrain")
        elif alignment_tax_off(cfg):
            pretrain = []
        else:
            from tether.data.task import build_default_task

            pretrain = build_default_task().pretrain_heldout
        if cfg.sft_best_of:
            best_of.setdefault(f"{cfg.baseline}_bo{cfg.sft_best_of}", cfg.sft_best_of)
            policies.setdefault(f"{cfg.baseline}_bo{cfg.sft_best_of}", policies.get(cfg.baseline, ""))
        report = evaluate_policies(
            policies,
            prompts[: cfg.limit or None],
            cfg,
            reward_model=args.reward_model,
            ref_policy=args.ref_policy,
            pretrain_heldout=pretrain[: cfg.pretrain_texts or None],
            human_comparisons=human or (),
            best_of=best_of,
        )
        out = Path(args.out or "runs/eval")
        save_eval(report, out / "eval.json")
        record_inputs(cfg, out)
        path = write_report(report, out)
    if args.run:
        own_prompts = bool(run_cfg.prompts_file or eval_cfg.prompts_file)
    _print_summary(report, own_prompts, args.simulated_labelers)
    print(f"report: {path}")
    return 0


def _print_summary(report: EvalReport, own_prompts: bool, simulated: bool) -> None:
    """One line per policy. On prompts of the user's own, people's rankings (--human) and the RM
    lead; the simulated panel (its rubric written for the built-in task's constraint prompts) is
    printed only when asked for, and labelled so."""
    for p in report.policies:
        ppl = "off" if p.pretrain_ppl is None else f"{p.pretrain_ppl:.2f}"
        panel = (
            f"expected win {_ci(p.expected_win_rate, p.expected_win_ci)}  sampled win {_ci(p.win_rate, p.win_ci)}  "
            f"likert {p.likert:.2f}"
        )
        if not own_prompts:
            print(f"{p.name:>10}: {panel}  len {p.length:.1f}  ppl {ppl}")
            continue
        human = "–" if p.human_win_rate is None else f"{p.human_win_rate:.3f} (n {p.human_n})"
        rm = "–" if p.rm_score is None else f"{p.rm_score:+.3f}"
        kl = "–" if p.kl_to_ref is None else f"{p.kl_to_ref:.3f}"
        print(f"{p.name:>10}: human win {human}  RM score {rm}  KL {kl}  len {p.length:.1f}  ppl {ppl}")
        if simulated:
            print(f"{'':>10}  simulated labelers written for the built-in task: {panel}")
    if own_prompts and not simulated:
        print("(the simulated labelers' figures are left out on your prompts: --simulated-labelers shows them)")


def _ci(rate: float | None, ci: tuple[float, float] | None) -> str:
    if rate is None:
        return "–"
    return f"{rate:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{rate:.3f}"
