"""``tether run``: the whole InstructGPT loop (paper Figure 2) with rounds, provenance and resume.

    data → SFT (PPO-init, 10 % pretraining mix) → for each round:
        sample K responses per prompt from the current best policy → comparisons (simulated panel,
        or people's rankings) → RM on all comparisons so far → PPO-ptx (and PPO, γ = 0, in the last
        round) → evaluation on held-out users' prompts by held-out labelers → report

Every stage records itself in ``manifest.json`` (status, inputs, outputs, which policy produced
which samples, which RM trained which policy). Rerunning the same command skips finished stages and
resumes an interrupted one from its own checkpoint, so a crash costs at most one checkpoint
interval. Each round's PPO starts from the PPO-init SFT model with that model as the frozen
reference; only the data (comparisons from the previous round's best policy) and the RM change.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.config import EvalConfig, RunConfig, save_config, to_dict
from tether.data.formats import Comparison, read_records, write_records


class Manifest:
    """The run's provenance record: one entry per stage, written atomically after every change."""

    def __init__(self, path: Path, config: dict[str, Any]):
        self.path = path
        if path.exists():
            self.data = json.loads(path.read_text())
            if self.data.get("config") != config:
                changed = sorted(
                    k for k in set(config) | set(self.data["config"]) if config.get(k) != self.data["config"].get(k)
                )
                raise ValueError(
                    f"{path.parent} holds a run with a different config (fields {changed}); "
                    "use another out_dir or the same config to resume"
                )
        else:
            self.data = {"tether_version": _version(), "config": config, "stages": {}}
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)

    def done(self, name: str) -> bool:
        return self.data["stages"].get(name, {}).get("status") == "done"

    def outputs(self, name: str) -> dict[str, Any]:
        return self.data["stages"][name]["outputs"]

    def run(self, name: str, fn: Callable[[], dict[str, Any]], inputs: dict[str, Any], log) -> dict[str, Any]:
        """Run a stage unless the manifest says it finished; record inputs, outputs and timing."""
        if self.done(name):
            log(f"[dim]run: {name} already done, skipping[/]")
            return self.outputs(name)
        entry = self.data["stages"].setdefault(name, {})
        entry.update(status="running", inputs=inputs, started=entry.get("started") or time.time())
        entry["attempts"] = entry.get("attempts", 0) + 1
        self._write()
        log(f"[bold cyan]run: {name}[/]")
        t0 = time.time()
        outputs = fn()
        entry.update(status="done", outputs=outputs, finished=time.time())
        entry["seconds_last_attempt"] = round(time.time() - t0, 1)
        self._write()
        return outputs


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tether")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class RunResult:
    out_dir: Path
    report: Path | None
    manifest: dict[str, Any]


def run_pipeline(cfg: RunConfig, log=print) -> RunResult:
    """Run (or resume) the whole pipeline; returns where the report is."""
    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    manifest = Manifest(out / "manifest.json", to_dict(cfg))

    # 1. Data: prompts preprocessed and split by user; demonstrations of train/valid users only.
    data = manifest.run(
        "data",
        lambda: _stage_data(cfg, out / "data", log),
        {"prompts": cfg.prompts_file, "demonstrations": cfg.demonstrations_file, "pretrain": cfg.pretrain_file},
        log,
    )

    # 2. SFT: the PPO-init model (SFT with pretraining text mixed in).
    sft_cfg = dataclasses.replace(
        cfg.sft,
        train_file=data["demos_train"],
        valid_file=data["demos_valid"],
        pretrain_file=data["pretrain_train"],
        out_dir=str(out / "sft"),
        seed=cfg.seed,
    )
    sft = manifest.run(
        "sft",
        lambda: _stage_sft(sft_cfg, log),
        {"demonstrations": data["demos_train"], "base": cfg.sft.model.name_or_path},
        log,
    )
    policy, policy_name = sft["policy"], "sft"

    all_labels: list[dict] = []
    for r in range(1, cfg.rounds + 1):
        rdir = out / f"round-{r}"
        # 3. K responses per prompt from the current best policy.
        samples = manifest.run(
            f"round-{r}/sample",
            lambda rdir=rdir, policy=policy, policy_name=policy_name, r=r: _stage_sample(
                cfg, data["prompts_train"], policy, policy_name, rdir, r, log
            ),
            {"policy": policy, "policy_name": policy_name},
            log,
        )
        # 4. Comparisons: the simulated panel's training labelers (plus held-out ones for evaluation only).
        labels = manifest.run(
            f"round-{r}/label",
            lambda rdir=rdir, samples=samples, r=r: _stage_label(cfg, samples, rdir, r, log),
            {"samples": samples["samples"]},
            log,
        )
        all_labels.append(labels)
        # 5. The reward model on all comparisons so far, initialised from SFT.
        rm = manifest.run(
            f"round-{r}/rm",
            lambda rdir=rdir, labs=list(all_labels): _stage_rm(cfg, sft["policy"], labs, data, rdir, log),
            {"comparisons": [lab["comparisons"] for lab in all_labels], "init": sft["policy"]},
            log,
        )
        # 6. PPO-ptx against that RM (and plain PPO, gamma = 0, in the last round for the comparison).
        variants = ["ppo_ptx"] + (["ppo"] if r == cfg.rounds and cfg.run_ppo_baseline else [])
        trained = {}
        for variant in variants:
            trained[variant] = manifest.run(
                f"round-{r}/{variant}",
                lambda rdir=rdir, variant=variant, rm=rm, r=r: _stage_ppo(
                    cfg, variant, sft["policy"], rm["reward_model"], data, rdir, log, last=r == cfg.rounds
                ),
                {"init": sft["policy"], "reference": sft["policy"], "reward_model": rm["reward_model"]},
                log,
            )
        policy, policy_name = trained["ppo_ptx"]["policy"], f"ppo_ptx@round-{r}"

    # 7. Evaluation on held-out users' prompts by held-out labelers, and the report.
    policies, reward_model, _ = run_eval_policies(cfg, manifest.data["stages"])
    ev = manifest.run(
        "eval",
        lambda: evaluate_run(cfg, manifest.data["stages"], out, out / "eval", out / "report", log),
        {"policies": policies, "reward_model": reward_model, "prompts": cfg.eval.prompts or data["prompts_test"]},
        log,
    )
    return RunResult(out_dir=out, report=Path(ev["report"]), manifest=manifest.data)


# --------------------------------------------------------------------------------------------
# Stages. Each returns a JSON-able dict of its outputs (paths as strings) for the manifest.


def _stage_data(cfg: RunConfig, ddir: Path, log) -> dict[str, Any]:
    from tether.data.preprocess import PreprocessConfig, preprocess_prompts
    from tether.data.task import build_default_task

    task = build_default_task(seed=cfg.seed, n_users=cfg.task_users, prompts_per_user=cfg.task_prompts_per_user)
    prompts = read_records(cfg.prompts_file, "prompt") if cfg.prompts_file else task.prompts
    demos = read_records(cfg.demonstrations_file, "demonstration") if cfg.demonstrations_file else task.demonstrations
    pretrain = read_records(cfg.pretrain_file, "pretrain") if cfg.pretrain_file else task.pretrain_train
    heldout = (
        read_records(cfg.pretrain_heldout_file, "pretrain") if cfg.pretrain_heldout_file else task.pretrain_heldout
    )
    if cfg.comparisons_file:  # joins round 1's rankings: validated now, not after SFT and sampling
        read_records(cfg.comparisons_file, "comparison")
    pre = PreprocessConfig(seed=cfg.seed, max_per_user=cfg.max_prompts_per_user, fractions=cfg.split_fractions)
    result = preprocess_prompts(prompts, pre)
    result.save(ddir / "prompts")
    splits = result.splits
    log(
        f"data: {len(prompts)} prompts → train {len(splits['train'])} / valid {len(splits['valid'])} / "
        f"test {len(splits['test'])} (split by user; {sum(result.report.removed.values())} removed by preprocessing)"
    )
    # Demonstrations follow their prompt's split (by prompt_id, else by text), so no test user leaks into SFT.
    split_of = {p.id: s for s, ps in splits.items() for p in ps} | {p.text: s for s, ps in splits.items() for p in ps}
    demo_split: dict[str, list] = {"train": [], "valid": [], "test": []}
    unmatched = 0
    for d in demos:
        s = split_of.get(d.prompt_id or "") or split_of.get(d.prompt)
        if s is None:
            unmatched += 1
            s = "train" if cfg.demonstrations_file else None  # user files may hold demos without prompts
        if s is not None:
            demo_split[s].append(d)
    if unmatched:
        log(
            f"data: {unmatched} demonstrations match no kept prompt"
            + (
                " (used for training)"
                if cfg.demonstrations_file
                else " (their prompts were removed by preprocessing; not used)"
            )
        )
    paths = {
        "prompts_train": write_records(ddir / "prompts_train.jsonl", splits["train"]),
        "prompts_valid": write_records(ddir / "prompts_valid.jsonl", splits["valid"]),
        "prompts_test": write_records(ddir / "prompts_test.jsonl", splits["test"]),
        "demos_train": write_records(ddir / "demonstrations_train.jsonl", demo_split["train"]),
        "demos_valid": write_records(
            ddir / "demonstrations_valid.jsonl", demo_split["valid"] or demo_split["train"][:8]
        ),
        "pretrain_train": write_records(ddir / "pretrain_train.jsonl", pretrain),
        "pretrain_heldout": write_records(ddir / "pretrain_heldout.jsonl", heldout),
    }
    return {k: str(v) for k, v in paths.items()} | {"preprocess_report": dataclasses.asdict(result.report)}


def _stage_sft(cfg, log) -> dict[str, Any]:
    from tether.sft.train import train_sft

    res = train_sft(cfg, show_samples=0, log=log)
    return {
        "policy": str(res.final_dir.resolve()),
        "selected_epoch": res.selected_epoch,
        "valid_loss_before": res.valid_loss_before,
        "valid_loss_after": res.valid_loss_after,
    }


def _stage_sample(cfg: RunConfig, prompts_path: str, policy: str, policy_name: str, rdir: Path, r: int, log):
    from tether.models.generation import sample_k
    from tether.models.loading import autocast, load_causal_lm

    prompts = read_records(prompts_path, "prompt")
    rng = random.Random(cfg.seed * 1000 + r)  # a fresh draw of prompts each round
    chosen = rng.sample(prompts, min(cfg.rm_prompts_per_round, len(prompts)))
    model, tokenizer = load_causal_lm(policy)
    with autocast(cfg.ppo.policy, next(model.parameters()).device):
        samples = sample_k(
            model,
            tokenizer,
            chosen,
            cfg.k,
            policy_name=policy_name,
            max_new_tokens=cfg.ppo.max_new_tokens,
            temperature=1.0,
            seed=cfg.seed + r,
            batch_size=cfg.sample_batch_size,
        )
    path = write_records(rdir / "samples.jsonl", samples)
    log(f"sample: {len(samples)} prompts x {cfg.k} responses from {policy_name}")
    return {"samples": str(path), "policy": policy, "policy_name": policy_name}


def _stage_label(cfg: RunConfig, samples: dict, rdir: Path, r: int, log) -> dict[str, Any]:
    """Rank the samples with the simulated panel.

    A slice of prompts (``heldout_labeler_prompts``) is the RM's validation set: each of its
    samples is ranked by two training labelers (for inter-labeler agreement) and by every held-out
    labeler (never trained on, SPEC "held-out labelers"). The rest is ranked by
    ``labelers_per_sample`` training labelers and is what the RM trains on.
    """
    from tether.labelers.panel import Panel, pairwise_agreement

    panel = Panel()
    items = read_records(samples["samples"], "sample")
    n_valid = min(cfg.heldout_labeler_prompts, len(items) // 2)
    valid_items, train_items = items[:n_valid], items[n_valid:]
    train = panel.label(train_items, labelers_per_sample=cfg.labelers_per_sample, seed=cfg.seed + r)
    if cfg.comparisons_file and r == 1:  # people's rankings join the first round's training data
        human = read_records(cfg.comparisons_file, "comparison")
        train = train + human
        log(f"label: added {len(human)} comparisons from {cfg.comparisons_file}")
    overlap = panel.label(valid_items, labelers_per_sample=2, seed=cfg.seed + 100 + r)
    heldout = panel.label(
        valid_items,
        labelers_per_sample=len(panel.heldout_labelers),
        labelers=panel.heldout_labelers,
        seed=cfg.seed + 200 + r,
    )
    agreement = pairwise_agreement(overlap)
    path = write_records(rdir / "comparisons_train.jsonl", train)
    vpath = write_records(rdir / "comparisons_valid.jsonl", overlap + heldout)
    dropped = len(train_items) * cfg.labelers_per_sample - len(train)
    log(
        f"label: {len(train)} training comparisons ({dropped} all-tie judgements left out), "
        f"{len(overlap) + len(heldout)} validation; training-labeler {agreement}"
    )
    return {
        "comparisons": str(path),
        "valid_comparisons": str(vpath),
        "labeler_agreement": agreement.rate,
        "samples": samples["samples"],
        "labeled_by": "simulated panel",
    }


def _stage_rm(cfg: RunConfig, sft_policy: str, rounds: list[dict], data: dict, rdir: Path, log):
    from tether.labelers.panel import Panel
    from tether.reward.train import train_reward_model

    train = [c for lab in rounds for c in read_records(lab["comparisons"], "comparison")]
    valid = [c for lab in rounds for c in read_records(lab["valid_comparisons"], "comparison")]
    rm_cfg = dataclasses.replace(
        cfg.rm,
        train_file=str(write_records(rdir / "rm_train.jsonl", train)),
        valid_file=str(write_records(rdir / "rm_valid.jsonl", valid)),
        demonstrations_file=data["demos_train"],
        out_dir=str(rdir / "rm"),
        seed=cfg.seed,
        heldout_panel_labelers=True,
    )
    rm_cfg.model = dataclasses.replace(cfg.rm.model, name_or_path=sft_policy)
    res = train_reward_model(rm_cfg, panel_heldout_labelers=[lab.id for lab in Panel().heldout_labelers], log=log)
    ev = res.eval_after
    return {
        "reward_model": str(Path(res.final_dir).resolve()),
        "trained_on": [lab["comparisons"] for lab in rounds],
        "accuracy": ev.overall.accuracy,
        "train_labeler_accuracy": ev.train_labelers.accuracy,
        "heldout_labeler_accuracy": ev.heldout_labelers.accuracy,
        "labeler_agreement": ev.labeler_agreement.get("rate"),
        "bias": res.normalization.bias,
        "gain": res.normalization.gain,
    }


def _stage_ppo(
    cfg: RunConfig, variant: str, sft_policy: str, reward_model: str, data: dict, rdir: Path, log, *, last: bool
):
    from tether.ppo.train import train_ppo

    curve = cfg.curve_every if variant == "ppo_ptx" and last else 0
    ppo_cfg = dataclasses.replace(
        cfg.ppo,
        reward_model=reward_model,
        prompts_file=data["prompts_train"],
        pretrain_file=data["pretrain_train"],
        out_dir=str(rdir / variant),
        seed=cfg.seed,
        ptx_coef=cfg.ppo.ptx_coef if variant == "ppo_ptx" else 0.0,
        keep_policy_every=curve or cfg.ppo.keep_policy_every,
    )
    ppo_cfg.policy = dataclasses.replace(cfg.ppo.policy, name_or_path=sft_policy)
    res = train_ppo(ppo_cfg, log=log)
    out = {"policy": str(Path(res.policy_dir).resolve()), "ptx_coef": ppo_cfg.ptx_coef}
    if curve:  # checkpoints along the way, by episodes trained (the final one is the policy itself)
        out["checkpoints"] = {
            str(it * ppo_cfg.batch_size): str((rdir / variant / f"iter-{it}").resolve())
            for it in range(curve, ppo_cfg.iterations, curve)
        }
        out["episodes"] = ppo_cfg.iterations * ppo_cfg.batch_size
    return out


def best_of_name(cfg: EvalConfig) -> str:
    """The evaluation's name for the baseline's best-of-N by the final RM (``eval.sft_best_of``)."""
    return f"{cfg.baseline}_bo{cfg.sft_best_of}"


def run_eval_policies(cfg: RunConfig, stages: dict[str, Any]) -> tuple[dict[str, str], str, str]:
    """(policies to evaluate by name, the final reward model, the SFT policy) of a run's manifest."""
    from tether.eval.evaluate import CURVE_PREFIX

    sft = stages["sft"]["outputs"]["policy"]
    last = f"round-{cfg.rounds}"
    policies = {}
    if cfg.eval.base:
        policies["base"] = cfg.sft.model.name_or_path
    policies["sft"] = sft
    if cfg.eval.sft_best_of:
        policies[best_of_name(cfg.eval)] = policies[cfg.eval.baseline]
    if cfg.run_ppo_baseline:
        policies["ppo"] = stages[f"{last}/ppo"]["outputs"]["policy"]
    ptx = stages[f"{last}/ppo_ptx"]["outputs"]
    for episodes, path in ptx.get("checkpoints", {}).items():  # run.curve_every: the compute curve
        policies[f"{CURVE_PREFIX}{episodes}"] = path
    policies["ppo_ptx"] = ptx["policy"]
    return policies, stages[f"{last}/rm"]["outputs"]["reward_model"], sft


def run_eval_config(cfg: RunConfig, eval_cfg: EvalConfig | None = None) -> EvalConfig:
    """The run's evaluation settings (or ``eval_cfg``) with its unset length filled in: the
    policies are evaluated at the response length PPO trained them at."""
    eval_cfg = eval_cfg or cfg.eval
    if eval_cfg.max_new_tokens is None:
        eval_cfg = dataclasses.replace(eval_cfg, max_new_tokens=cfg.ppo.max_new_tokens)
    return eval_cfg


def evaluate_run(
    cfg: RunConfig,
    stages: dict[str, Any],
    run_dir: Path,
    eval_dir: Path,
    report_dir: Path,
    log,
    *,
    eval_cfg: EvalConfig | None = None,
    human_comparisons: list[Comparison] | None = None,
) -> dict[str, Any]:
    """Evaluate a finished run's policies on its own test split (users never seen in training)
    and held-out pretraining text; writes ``eval_dir/eval.json`` and ``report_dir/report.html``.

    Used by ``tether run`` (its last stage) and ``tether eval --run DIR`` (re-evaluating a run,
    e.g. with more samples per prompt).
    """
    from tether.eval.evaluate import evaluate_policies, save_eval
    from tether.eval.report import write_report

    ecfg = run_eval_config(cfg, eval_cfg)
    data = stages["data"]["outputs"]
    policies, reward_model, sft = run_eval_policies(dataclasses.replace(cfg, eval=ecfg), stages)
    prompts = read_records(ecfg.prompts or data["prompts_test"], "prompt")[: ecfg.limit or None]
    pretrain = read_records(ecfg.pretrain or data["pretrain_heldout"], "pretrain")[: ecfg.pretrain_texts or None]
    report = evaluate_policies(
        policies,
        prompts,
        ecfg,
        reward_model=reward_model,
        ref_policy=sft,
        pretrain_heldout=pretrain,
        human_comparisons=human_comparisons or (),
        best_of={best_of_name(ecfg): ecfg.sft_best_of} if ecfg.sft_best_of else None,
        autocast_dtype=cfg.ppo.policy.autocast,
        log=log,
    )
    eval_path = save_eval(report, eval_dir / "eval.json")
    final_episodes = stages[f"round-{cfg.rounds}/ppo_ptx"]["outputs"].get("episodes")
    path = write_report(report, report_dir, run_dir=run_dir, final_episodes=final_episodes)
    return {
        "eval": str(eval_path),
        "report": str(path),
        "win_rates": {p.name: p.win_rate for p in report.policies},
        "expected_win_rates": {p.name: p.expected_win_rate for p in report.policies},
    }
