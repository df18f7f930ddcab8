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
import os
import random
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar, cast

from tether.cluster import Executor, Local
from tether.config import EvalConfig, PPOConfig, RMConfig, RunConfig, SFTConfig, input_sources, save_config, to_dict
from tether.data.agreement import pairwise_agreement
from tether.data.formats import Comparison, Sample, read_records, write_records
from tether.data.preprocess import PreprocessConfig, preprocess_prompts
from tether.data.task import build_default_task
from tether.eval.evaluate import CURVE_PREFIX, compute_curve, evaluate_policies, save_curve, save_eval
from tether.eval.report import write_report
from tether.labelers.panel import Panel
from tether.metrics import percent
from tether.models.generation import sample_k
from tether.models.loading import autocast, load_causal_lm
from tether.ppo.train import train_ppo
from tether.reward.train import train_reward_model
from tether.sft.train import train_sft

Log = Callable[[str], None]  # where a stage reports progress (print, a rich console)


# --------------------------------------------------------------------------------------------
# What each stage hands to the next: one typed record per stage, kept in manifest.json with every
# path relative to the run directory (a run moved or copied elsewhere resumes and evaluates there).


@dataclass
class DataOutputs:
    prompts_train: Path  # JSONL files, split by user
    prompts_valid: Path
    prompts_test: Path
    demos_train: Path  # demonstrations of the train / valid users
    demos_valid: Path
    pretrain_train: Path
    pretrain_heldout: Path
    preprocess_report: dict[str, Any]


@dataclass
class SFTOutputs:
    policy: Path  # the selected epoch's Hugging Face directory
    selected_epoch: int
    valid_loss_before: float
    valid_loss_after: float


@dataclass
class SampleOutputs:
    samples: Path  # K responses per prompt (JSONL of Sample)
    policy: Path  # the policy that answered
    policy_name: str


@dataclass
class LabelOutputs:
    comparisons: Path  # the training labelers' rankings (JSONL of Comparison)
    valid_comparisons: Path  # overlap and held-out labelers' rankings of the validation slice
    labeler_agreement: float | None
    samples: Path
    labeled_by: str


@dataclass
class RMOutputs:
    reward_model: Path  # the normalised RM's Hugging Face directory
    trained_on: list[Path]  # each round's comparisons file
    accuracy: float | None
    train_labeler_accuracy: float | None
    heldout_labeler_accuracy: float | None
    labeler_agreement: float | None
    bias: float
    gain: float


@dataclass
class PPOOutputs:
    policy: Path
    ptx_coef: float
    checkpoints: dict[str, Path] = field(default_factory=dict)  # run.curve_every: episodes -> kept policy
    episodes: int | None = None  # episodes trained (with checkpoints)


@dataclass
class EvalOutputs:
    eval: Path
    report: Path
    curve: Path | None
    win_rates: dict[str, float | None]
    expected_win_rates: dict[str, float | None]


Record = TypeVar("Record")


def _to_json(value: Any, run_dir: Path) -> Any:
    """A record (or inputs dict) as JSON: paths inside ``run_dir`` (Paths, or absolute path
    strings) relative to it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name), run_dir) for f in dataclasses.fields(value)}
    if isinstance(value, Path) or (isinstance(value, str) and os.path.isabs(value)):
        absolute, root = Path(os.path.abspath(value)), Path(os.path.abspath(run_dir))
        return str(absolute.relative_to(root)) if absolute.is_relative_to(root) else str(value)
    if isinstance(value, dict):
        return {k: _to_json(v, run_dir) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v, run_dir) for v in value]
    return value


def _from_json(tp: Any, value: Any, run_dir: Path) -> Any:
    """The inverse of :func:`_to_json` for a field of type ``tp``: relative paths joined to
    ``run_dir`` (absolute ones, as older manifests hold, stay as they are)."""
    if value is None:
        return None
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _from_json(args[0], value, run_dir)
    if tp is Path:
        return run_dir / value
    if typing.get_origin(tp) is list:
        return [_from_json(args[0], v, run_dir) for v in value]
    if typing.get_origin(tp) is dict:
        return {k: _from_json(args[1], v, run_dir) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{k: _from_json(hints[k], v, run_dir) for k, v in value.items()})
    return value


class Manifest:
    """The run's provenance record: one entry per stage, written atomically after every change."""

    def __init__(self, path: Path, config: dict[str, Any] | None = None, executor: str = "local"):
        """Open (or start) ``path``; with ``config``, a run of another config there is an error
        (its ``out_dir`` aside: a moved run is the same run)."""
        self.path, self.dir, self.executor = path, path.parent, executor
        if path.exists():
            self.data = json.loads(path.read_text())
            saved = self.data["config"]
            if config is not None and _without_out_dir(saved) != _without_out_dir(config):
                changed = sorted(
                    k for k in set(config) | set(saved) if k != "out_dir" and config.get(k) != saved.get(k)
                )
                raise ValueError(
                    f"{path.parent} holds a run with a different config (fields {changed}); "
                    "use another out_dir or the same config to resume"
                )
        elif config is None:
            raise FileNotFoundError(f"{path} does not exist (not a tether run directory)")
        else:
            # The config without its out_dir: the manifest names no place (the run can move).
            self.data = {"tether_version": _version(), "config": _without_out_dir(config), "stages": {}}
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)

    @property
    def stages(self) -> dict[str, Any]:
        """Every stage's entry as JSON (status, inputs, outputs, timing): for reports and tests."""
        return cast(dict[str, Any], self.data["stages"])

    def done(self, name: str) -> bool:
        return self.stages.get(name, {}).get("status") == "done"

    def outputs(self, name: str, record: type[Record]) -> Record:
        """A finished stage's record, its paths under this run directory (wherever it is now)."""
        return cast(Record, _from_json(record, self.stages[name]["outputs"], self.dir))

    def run(
        self, name: str, record: type[Record], fn: Callable[[], Record], inputs: dict[str, Any], log: Log
    ) -> Record:
        """Run a stage unless the manifest says it finished; record inputs, outputs and timing."""
        if self.done(name):
            log(f"[dim]run: {name} already done, skipping[/]")
            return self.outputs(name, record)
        entry = self.stages.setdefault(name, {})
        entry.update(
            status="running",
            inputs=_to_json(inputs, self.dir),
            started=entry.get("started") or time.time(),
            executor=self.executor,
        )
        entry["attempts"] = entry.get("attempts", 0) + 1
        self._write()
        log(f"[bold cyan]run: {name}[/]")
        t0 = time.time()
        outputs = fn()
        entry.update(status="done", outputs=_to_json(outputs, self.dir), finished=time.time())
        entry["seconds_last_attempt"] = round(time.time() - t0, 1)
        self._write()
        return outputs


def _without_out_dir(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "out_dir"}


def _version() -> str:
    try:
        return version("tether")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class RunResult:
    out_dir: Path
    report: Path
    evaluation: EvalOutputs
    manifest: dict[str, Any]


def run_pipeline(cfg: RunConfig, log: Log = print, executor: Executor | None = None) -> RunResult:
    """Run (or resume) the whole pipeline; returns where the report is.

    ``executor`` says where the work runs: this process (default), or a
    :class:`tether.cluster.RayCluster` (training stages as Ray Train runs, sampling, labeling and
    evaluation as Ray tasks over prompt shards). It is not part of the run's config: a run started
    in one place resumes in another, with the same results.
    """
    cfg.validate()
    executor = executor or Local()
    out = Path(cfg.out_dir)
    if not isinstance(executor, Local):  # workers on other nodes: every path they get is absolute
        out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    manifest = Manifest(out / "manifest.json", to_dict(cfg), executor.describe())
    manifest.data["inputs"] = input_sources(cfg)  # each input's source: a path, the built-in task, or none

    # 1. Data: prompts preprocessed and split by user; demonstrations of train/valid users only.
    data = manifest.run(
        "data",
        DataOutputs,
        partial(_stage_data, cfg, out / "data", log),
        {"prompts": cfg.prompts_file, "demonstrations": cfg.demonstrations_file, "pretrain": cfg.pretrain_file},
        log,
    )

    # 2. SFT: the PPO-init model (SFT with pretraining text mixed in).
    sft_cfg = dataclasses.replace(
        cfg.sft,
        train_file=str(data.demos_train),
        valid_file=str(data.demos_valid),
        pretrain_file=str(data.pretrain_train),
        out_dir=str(out / "sft"),
        seed=cfg.seed,
    )
    sft = manifest.run(
        "sft",
        SFTOutputs,
        partial(executor.train, "sft", _train_sft, sft_cfg, log=log),
        {"demonstrations": data.demos_train, "base": cfg.sft.model.name_or_path},
        log,
    )
    policy, policy_name = sft.policy, "sft"

    all_labels: list[LabelOutputs] = []
    for r in range(1, cfg.rounds + 1):
        rdir = out / f"round-{r}"
        # 3. K responses per prompt from the current best policy.
        samples = manifest.run(
            f"round-{r}/sample",
            SampleOutputs,
            partial(_stage_sample, cfg, data.prompts_train, policy, policy_name, rdir, r, log, executor),
            {"policy": policy, "policy_name": policy_name},
            log,
        )
        # 4. Comparisons: the simulated panel's training labelers (plus held-out ones for evaluation only).
        labels = manifest.run(
            f"round-{r}/label",
            LabelOutputs,
            partial(_stage_label, cfg, samples, rdir, r, log, executor),
            {"samples": samples.samples},
            log,
        )
        all_labels.append(labels)
        # 5. The reward model on all comparisons so far, initialised from SFT.
        rm = manifest.run(
            f"round-{r}/rm",
            RMOutputs,
            partial(_stage_rm, cfg, sft.policy, list(all_labels), data, rdir, log, executor, name=f"round-{r}/rm"),
            {"comparisons": [lab.comparisons for lab in all_labels], "init": sft.policy},
            log,
        )
        # 6. PPO-ptx against that RM (and plain PPO, gamma = 0, in the last round for the comparison).
        variants = ["ppo_ptx"] + (["ppo"] if r == cfg.rounds and cfg.run_ppo_baseline else [])
        trained = {}
        for variant in variants:
            trained[variant] = manifest.run(
                f"round-{r}/{variant}",
                PPOOutputs,
                partial(_stage_ppo, cfg, variant, sft.policy, rm.reward_model, data, rdir, log, executor, r=r),
                {"init": sft.policy, "reference": sft.policy, "reward_model": rm.reward_model},
                log,
            )
        policy, policy_name = trained["ppo_ptx"].policy, f"ppo_ptx@round-{r}"

    # 7. Evaluation on held-out users' prompts by held-out labelers, and the report.
    policies, reward_model, _ = run_eval_policies(cfg, manifest)
    ev = manifest.run(
        "eval",
        EvalOutputs,
        partial(evaluate_run, cfg, manifest, out / "eval", out / "report", log, executor=executor),
        {"policies": policies, "reward_model": reward_model, "prompts": cfg.eval.prompts_file or data.prompts_test},
        log,
    )
    return RunResult(out_dir=out, report=ev.report, evaluation=ev, manifest=manifest.data)


# --------------------------------------------------------------------------------------------
# Stages. Each returns its typed record (above) for the manifest. A
# training stage prepares its inputs here and trains in ``_train_*``, which ``executor.train`` calls
# on every rank (module-level functions: Ray pickles them by name); sampling and labeling cut their
# list into ``executor.shards`` and run ``_*_shard`` on each.


def _stage_data(cfg: RunConfig, ddir: Path, log: Log) -> DataOutputs:
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
        f"test {len(splits['test'])} (split by {result.report.split_by}; "
        f"{sum(result.report.removed.values())} removed by preprocessing)"
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
    return DataOutputs(
        prompts_train=write_records(ddir / "prompts_train.jsonl", splits["train"]),
        prompts_valid=write_records(ddir / "prompts_valid.jsonl", splits["valid"]),
        prompts_test=write_records(ddir / "prompts_test.jsonl", splits["test"]),
        demos_train=write_records(ddir / "demonstrations_train.jsonl", demo_split["train"]),
        demos_valid=write_records(ddir / "demonstrations_valid.jsonl", demo_split["valid"] or demo_split["train"][:8]),
        pretrain_train=write_records(ddir / "pretrain_train.jsonl", pretrain),
        pretrain_heldout=write_records(ddir / "pretrain_heldout.jsonl", heldout),
        preprocess_report=dataclasses.asdict(result.report),
    )


def _train_sft(cfg: SFTConfig, log: Log) -> SFTOutputs:
    res = train_sft(cfg, show_samples=0, log=log)
    return SFTOutputs(
        policy=res.final_dir.parent / res.final_dir.resolve().name,  # the epoch directory `final` links to
        selected_epoch=res.selected_epoch,
        valid_loss_before=res.valid_loss_before,
        valid_loss_after=res.valid_loss_after,
    )


def _stage_sample(
    cfg: RunConfig, prompts_path: Path, policy: Path, policy_name: str, rdir: Path, r: int, log: Log, executor: Executor
) -> SampleOutputs:
    prompts = read_records(prompts_path, "prompt")
    rng = random.Random(cfg.seed * 1000 + r)  # a fresh draw of prompts each round
    chosen = rng.sample(prompts, min(cfg.rm_prompts_per_round, len(prompts)))
    calls = [
        partial(_sample_shard, cfg, policy, policy_name, chosen[a:b], a, r) for a, b in executor.shards(len(chosen))
    ]
    samples = [s for shard in executor.map(calls, f"round-{r}/sample") for s in shard]
    path = write_records(rdir / "samples.jsonl", samples)
    log(f"sample: {len(samples)} prompts x {cfg.k} responses from {policy_name}")
    return SampleOutputs(samples=path, policy=policy, policy_name=policy_name)


def _sample_shard(
    cfg: RunConfig, policy: Path, policy_name: str, prompts: list, first_index: int, r: int
) -> list[Sample]:
    """K responses to each of ``prompts`` (items ``first_index …`` of the round's prompt list)."""
    model, tokenizer = load_causal_lm(str(policy))
    with autocast(cfg.ppo.policy, next(model.parameters()).device):
        return sample_k(
            model,
            tokenizer,
            prompts,
            cfg.k,
            policy_name=policy_name,
            max_new_tokens=cfg.ppo.max_new_tokens,
            temperature=1.0,
            seed=cfg.seed + r,
            first_index=first_index,
            batch_size=cfg.sample_batch_size,
        )


def _stage_label(
    cfg: RunConfig, samples: SampleOutputs, rdir: Path, r: int, log: Log, executor: Executor
) -> LabelOutputs:
    """Rank the samples with the simulated panel.

    A slice of prompts (``heldout_labeler_prompts``) is the RM's validation set: each of its
    samples is ranked by two training labelers (for inter-labeler agreement) and by every held-out
    labeler (never trained on: the paper's held-out labelers, who measure whether the RM
    generalises to people it never saw). The rest is ranked by
    ``labelers_per_sample`` training labelers and is what the RM trains on.
    """
    items = read_records(samples.samples, "sample")
    n_valid = min(cfg.heldout_labeler_prompts, len(items) // 2)
    valid_items, train_items = items[:n_valid], items[n_valid:]
    jobs = {  # name: (samples, training labelers per sample, all held-out labelers instead, seed)
        "train": (train_items, cfg.labelers_per_sample, False, cfg.seed + r),
        "overlap": (valid_items, 2, False, cfg.seed + 100 + r),
        "heldout": (valid_items, 0, True, cfg.seed + 200 + r),
    }
    calls, names = [], []
    for name, (its, per_sample, all_heldout, seed) in jobs.items():
        for a, b in executor.shards(len(its)):
            calls.append(partial(_label_shard, its[a:b], a, per_sample, all_heldout, seed))
            names.append(name)
    done = executor.map(calls, f"round-{r}/label")
    train, overlap, heldout = ([c for n, shard in zip(names, done, strict=True) if n == k for c in shard] for k in jobs)
    if cfg.comparisons_file and r == 1:  # people's rankings join the first round's training data
        human = read_records(cfg.comparisons_file, "comparison")
        train = train + human
        log(f"label: added {len(human)} comparisons from {cfg.comparisons_file}")
    agreement = pairwise_agreement(overlap)
    path = write_records(rdir / "comparisons_train.jsonl", train)
    vpath = write_records(rdir / "comparisons_valid.jsonl", overlap + heldout)
    dropped = len(train_items) * cfg.labelers_per_sample - len(train)
    log(
        f"label: {len(train)} training comparisons ({dropped} all-tie judgements left out), "
        f"{len(overlap) + len(heldout)} validation; training-labeler {agreement}"
    )
    return LabelOutputs(
        comparisons=path,
        valid_comparisons=vpath,
        labeler_agreement=agreement.rate,
        samples=samples.samples,
        labeled_by="simulated panel",
    )


def _label_shard(
    samples: list[Sample], first_index: int, per_sample: int, all_heldout: bool, seed: int
) -> list[Comparison]:
    """The simulated panel's rankings of ``samples`` (items ``first_index …`` of the stage's list):
    by ``per_sample`` training labelers each, or (``all_heldout``) by every held-out labeler."""
    panel = Panel()
    if all_heldout:
        pool = panel.heldout_labelers
        return panel.label(samples, len(pool), labelers=pool, seed=seed, first_index=first_index)
    return panel.label(samples, per_sample, seed=seed, first_index=first_index)


def _stage_rm(
    cfg: RunConfig,
    sft_policy: Path,
    rounds: list[LabelOutputs],
    data: DataOutputs,
    rdir: Path,
    log: Log,
    executor: Executor,
    *,
    name: str,
) -> RMOutputs:
    train = [c for lab in rounds for c in read_records(lab.comparisons, "comparison")]
    valid = [c for lab in rounds for c in read_records(lab.valid_comparisons, "comparison")]
    rm_cfg = dataclasses.replace(
        cfg.rm,
        train_file=str(write_records(rdir / "rm_train.jsonl", train)),
        valid_file=str(write_records(rdir / "rm_valid.jsonl", valid)),
        demonstrations_file=str(data.demos_train),
        out_dir=str(rdir / "rm"),
        seed=cfg.seed,
        heldout_panel_labelers=True,
        model=dataclasses.replace(cfg.rm.model, name_or_path=str(sft_policy)),
    )
    return executor.train(name, _train_rm, rm_cfg, [lab.comparisons for lab in rounds], log=log)


def _train_rm(rm_cfg: RMConfig, trained_on: list[Path], log: Log) -> RMOutputs:
    res = train_reward_model(rm_cfg, panel_heldout_labelers=[lab.id for lab in Panel().heldout_labelers], log=log)
    ev = res.eval_after
    return RMOutputs(
        reward_model=Path(res.final_dir),
        trained_on=trained_on,
        accuracy=ev.overall.accuracy,
        train_labeler_accuracy=ev.train_labelers.accuracy,
        heldout_labeler_accuracy=ev.heldout_labelers.accuracy,
        labeler_agreement=ev.labeler_agreement.get("rate"),
        bias=res.normalization.bias,
        gain=res.normalization.gain,
    )


def _stage_ppo(
    cfg: RunConfig,
    variant: str,
    sft_policy: Path,
    reward_model: Path,
    data: DataOutputs,
    rdir: Path,
    log: Log,
    executor: Executor,
    *,
    r: int,
) -> PPOOutputs:
    curve = cfg.curve_every if variant == "ppo_ptx" and r == cfg.rounds else 0
    ppo_cfg = dataclasses.replace(
        cfg.ppo,
        reward_model=str(reward_model),
        prompts_file=str(data.prompts_train),
        pretrain_file=str(data.pretrain_train),
        out_dir=str(rdir / variant),
        seed=cfg.seed,
        ptx_coef=cfg.ppo.ptx_coef if variant == "ppo_ptx" else 0.0,
        keep_policy_every=curve or cfg.ppo.keep_policy_every,
        policy=dataclasses.replace(cfg.ppo.policy, name_or_path=str(sft_policy)),
    )
    out = executor.train(f"round-{r}/{variant}", _train_ppo, ppo_cfg, curve, rdir / variant, log=log)
    missing = [str(p) for p in out.checkpoints.values() if not (p / "config.json").exists()]
    if missing:  # the manifest must not promise the evaluation a model that is not there
        raise FileNotFoundError(f"round-{r}/{variant}: the checkpoints {missing} (run.curve_every) were not written")
    return out


def _train_ppo(ppo_cfg: PPOConfig, curve: int, out_dir: Path, log: Log) -> PPOOutputs:
    res = train_ppo(ppo_cfg, log=log)
    out = PPOOutputs(policy=Path(res.policy_dir), ptx_coef=ppo_cfg.ptx_coef)
    if curve:  # checkpoints along the way, by episodes trained (the final one is the policy itself)
        its = range(curve, ppo_cfg.iterations, curve)
        out.checkpoints = {str(it * ppo_cfg.batch_size): out_dir / f"iter-{it}" for it in its}
        out.episodes = ppo_cfg.iterations * ppo_cfg.batch_size
    return out


def best_of_name(cfg: EvalConfig) -> str:
    """The evaluation's name for the baseline's best-of-N by the final RM (``eval.sft_best_of``)."""
    return f"{cfg.baseline}_bo{cfg.sft_best_of}"


def run_eval_policies(cfg: RunConfig, manifest: Manifest) -> tuple[dict[str, str], str, str]:
    """(policies to evaluate by name, the final reward model, the SFT policy) of a run's manifest."""
    sft = str(manifest.outputs("sft", SFTOutputs).policy)
    last = f"round-{cfg.rounds}"
    policies = {}
    if cfg.eval.base:
        policies["base"] = cfg.sft.model.name_or_path
    policies["sft"] = sft
    if cfg.eval.sft_best_of:
        policies[best_of_name(cfg.eval)] = policies[cfg.eval.baseline]
    if cfg.run_ppo_baseline:
        policies["ppo"] = str(manifest.outputs(f"{last}/ppo", PPOOutputs).policy)
    ptx = manifest.outputs(f"{last}/ppo_ptx", PPOOutputs)
    for episodes, path in ptx.checkpoints.items():  # run.curve_every: the compute curve
        policies[f"{CURVE_PREFIX}{episodes}"] = str(path)
    policies["ppo_ptx"] = str(ptx.policy)
    return policies, str(manifest.outputs(f"{last}/rm", RMOutputs).reward_model), sft


def run_facts(stages: dict[str, Any]) -> dict[str, str]:
    """What the report's "Run facts" table says about a run's stages (from its manifest): the
    split, SFT's held-out loss, each round's RM accuracy against the labelers' own agreement (the
    ceiling a labeler-trained RM can reach), and each stage's seconds."""
    facts: dict[str, str] = {}
    split = stages.get("data", {}).get("outputs", {}).get("preprocess_report", {}).get("split_prompts")
    if split:
        facts["prompts (split by user)"] = " / ".join(f"{k} {v}" for k, v in split.items())
    sft = stages.get("sft", {}).get("outputs") or {}
    if sft.get("valid_loss_after") is not None:
        facts["SFT held-out demonstration loss"] = (
            f"{sft['valid_loss_before']:.3f} → {sft['valid_loss_after']:.3f} (epoch {sft['selected_epoch']} kept)"
        )
    for name, entry in stages.items():
        rm = entry.get("outputs") or {}
        if name.endswith("/rm") and "accuracy" in rm:
            pct = partial(percent, missing="–")
            facts[f"{name.split('/')[0]} reward model, held-out comparisons"] = (
                f"accuracy {pct(rm['accuracy'])} (training labelers {pct(rm.get('train_labeler_accuracy'))}, "
                f"held-out labelers {pct(rm.get('heldout_labeler_accuracy'))}); "
                f"the labelers agree with each other {pct(rm.get('labeler_agreement'))}"
            )
    seconds = {n: e["seconds_last_attempt"] for n, e in stages.items() if e.get("seconds_last_attempt") is not None}
    if seconds:
        facts["stage seconds (last attempt)"] = ", ".join(f"{n} {s:.0f}" for n, s in seconds.items())
    return facts


def run_eval_config(cfg: RunConfig, eval_cfg: EvalConfig | None = None) -> EvalConfig:
    """The run's evaluation settings (or ``eval_cfg``) with its unset length filled in: the
    policies are evaluated at the response length PPO trained them at."""
    eval_cfg = eval_cfg or cfg.eval
    if eval_cfg.max_new_tokens is None:
        eval_cfg = dataclasses.replace(eval_cfg, max_new_tokens=cfg.ppo.max_new_tokens)
    return eval_cfg


def evaluate_run(
    cfg: RunConfig,
    manifest: Manifest,
    eval_dir: Path,
    report_dir: Path,
    log: Log,
    *,
    eval_cfg: EvalConfig | None = None,
    human_comparisons: list[Comparison] | None = None,
    executor: Executor | None = None,
) -> EvalOutputs:
    """Evaluate a finished run's policies on its own test split (users never seen in training)
    and held-out pretraining text; writes ``eval_dir/eval.json`` and ``report_dir/report.html``.

    Used by ``tether run`` (its last stage) and ``tether eval --run DIR`` (re-evaluating a run,
    e.g. with more samples per prompt).
    """
    ecfg = run_eval_config(cfg, eval_cfg)
    data = manifest.outputs("data", DataOutputs)
    policies, reward_model, sft = run_eval_policies(dataclasses.replace(cfg, eval=ecfg), manifest)
    prompts = read_records(ecfg.prompts_file or data.prompts_test, "prompt")[: ecfg.limit or None]
    pretrain = read_records(ecfg.pretrain_file or data.pretrain_heldout, "pretrain")[: ecfg.pretrain_texts or None]
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
        executor=executor,
        keep_dir=eval_dir / "shards",  # an interrupted evaluation resumes from its finished shards
        log=log,
    )
    eval_path = save_eval(report, eval_dir / "eval.json")
    final_episodes = manifest.outputs(f"round-{cfg.rounds}/ppo_ptx", PPOOutputs).episodes
    # run.curve_every: the checkpoints' figures beside eval.json, SFT at 0 episodes, the final policy last.
    curve = compute_curve(report, final_episodes, start="sft")
    curve_path = save_curve(curve, report, eval_dir / "curve.json") if curve else None
    facts = run_facts(manifest.stages)
    path = write_report(report, report_dir, run_dir=manifest.dir, extra=facts, final_episodes=final_episodes)
    return EvalOutputs(
        eval=eval_path,
        report=path,
        curve=curve_path,
        win_rates={p.name: p.win_rate for p in report.policies},
        expected_win_rates={p.name: p.expected_win_rate for p in report.policies},
    )
