"""Evaluation (InstructGPT §4): is the aligned model preferred, and what did it cost?

For every policy on held-out prompts (from users never seen in training): its responses are
judged by the **held-out** labelers of the panel (win rate against a baseline with a 95 %
bootstrap interval, Likert 1-7, metadata flag rates), scored by the reward model, measured for
length, EOS rate and KL to the reference (SFT) policy, and its alignment tax is measured as
perplexity on held-out pretraining text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.cluster import Executor, Local
from tether.config import Autocast, EvalConfig, ModelConfig, to_dict
from tether.data.formats import Comparison, PretrainText, Prompt
from tether.labelers.panel import Panel
from tether.models.generation import Generation, buffers_fit, decode_responses, row_generators, sample
from tether.models.heads import load_scalar_model, score_at_last_token
from tether.models.lm_batch import encode_pretrain, evaluate_loss
from tether.models.loading import autocast, load_causal_lm, resolve_device
from tether.models.trunk import SharedTrunk
from tether.ppo.rollout import episode_scores, joined, logprobs_from_logits, response_logprobs
from tether.reward.foreign import ForeignReward, reward_for

# The evaluation's name of a PPO-ptx checkpoint after N episodes (``run.curve_every``): ppo_ptx@N.
CURVE_PREFIX = "ppo_ptx@"


@dataclass
class PolicyEval:
    name: str
    path: str
    responses: list[str]  # samples_per_prompt per prompt, prompt-major (prompt i: i*n .. i*n+n-1)
    win_rate: float | None = None  # vs the baseline, sampled verdicts of held-out labelers; ties count half
    win_ci: tuple[float, float] | None = None  # 95 % bootstrap interval over prompts
    # The same win rate with the held-out labelers' noise integrated out exactly (every policy ×
    # baseline response pair of a prompt): the headline figure for the simulated panel.
    expected_win_rate: float | None = None
    expected_win_ci: tuple[float, float] | None = None
    likert: float = float("nan")  # mean 1-7 from held-out labelers
    flag_rates: dict[str, float] = field(default_factory=dict)
    rm_score: float | None = None  # mean normalised RM score
    kl_to_ref: float | None = None  # mean over responses of Σ_t log π − log π_ref (temperature 1 samples)
    length: float = 0.0  # mean response tokens
    eos_rate: float = 0.0  # fraction of responses that ended with EOS
    pretrain_ppl: float | None = None  # held-out pretraining perplexity (alignment tax)
    human_win_rate: float | None = None  # from people's rankings, when given
    human_n: int = 0
    preferences: list[float] | None = None  # per response: held-out labelers' mean preference over the baseline's
    expected_preferences: list[float] | None = None  # per response: the same, noise integrated out
    best_of: int = 1  # > 1: each response is the RM's pick of this many samples (kl_to_ref is then a bound)


@dataclass
class EvalReport:
    baseline: str
    prompts: list[str]
    labelers: list[str]
    policies: list[PolicyEval]
    temperature: float
    max_new_tokens: int
    samples_per_prompt: int = 1
    config: dict | None = None  # the EvalConfig used, as a dict

    def by_name(self, name: str) -> PolicyEval:
        return next(p for p in self.policies if p.name == name)

    def to_json(self) -> dict:
        return asdict(self)


def best_of_n_kl_bound(n: int) -> float:
    """Upper bound on KL(best-of-n ‖ π) for a policy's best-of-n by any scorer: log n − (n − 1)/n nats.

    The usual analytic figure for best-of-n sampling (Stiennon et al. 2020; shown to be an upper
    bound by Beirami et al. 2024): best-of-n cannot be scored token by token like a policy.
    """
    return math.log(n) - (n - 1) / n


def pretrain_perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[PretrainText], max_length: int = 256
) -> float:
    """exp(mean NLL per token) on plain text: the alignment-tax measure (the document-end token
    appended to each text is not scored)."""

    examples = [encode_pretrain(tokenizer, t.text, max_length, score_document_end=False) for t in texts]
    return math.exp(evaluate_loss(model, examples, tokenizer.pad_token_id))


def human_win_rate(comparisons: Sequence[Comparison], policy: str, baseline: str) -> tuple[float | None, int]:
    """Win rate of ``policy`` over ``baseline`` from people's rankings (responses tagged with policies)."""
    outcomes = []
    for c in comparisons:
        if not c.policies:
            continue
        for i, pi in enumerate(c.policies):
            for j, pj in enumerate(c.policies):
                if pi == policy and pj == baseline:
                    ri, rj = c.ranking[i], c.ranking[j]
                    outcomes.append(1.0 if ri < rj else 0.0 if ri > rj else 0.5)
    return (float(np.mean(outcomes)) if outcomes else None), len(outcomes)


@dataclass
class PolicyShard:
    """One policy's responses to a shard of the evaluation prompts, one entry per response
    (``kls`` and ``scores`` empty when not measured)."""

    responses: list[str]
    lengths: list[int]  # tokens
    eos: list[bool]  # ended with EOS
    kls: list[float]  # Σ_t log π − log π_ref
    scores: list[float]  # normalised RM score
    judgements: list  # Judgement per (response, held-out labeler), response-major


def _files_stamp(path: str | None) -> list[Any]:
    """What identifies a model directory's contents cheaply: each file's name, size and mtime."""
    if path is None or not Path(path).is_dir():
        return [path]
    return [path] + [
        (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(path).iterdir()) if f.is_file()
    ]


def shard_key(stamp: dict[str, Any], texts: Sequence[str], first: int) -> str:
    """A fingerprint of one evaluation shard: what its policy's shards share (``stamp``: the models'
    paths with their files' sizes and times, the settings, the judges) and its own texts and first
    index."""
    what = {**stamp, "texts": list(texts), "first": first}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _kept_shard(path: str, call: Callable[[], PolicyShard]) -> PolicyShard:
    """Run a shard and keep its result at ``path`` (atomically), so a rerun does not redo it.

    Best effort: a Ray worker on a node that does not share the run's directory cannot write
    there, and then the shard is simply not kept (a rerun redoes it)."""
    result = call()
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            pickle.dump(result, f)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
    return result


class _ModelCache:
    """Models kept between the calls of one evaluation in this process, each under the stamp of its
    directory's files, for the roles that use it (the policy, the reference, the reward model):
    the reference and the RM are loaded once for every policy, a policy's perplexity reuses the
    model its responses were sampled from, and the reference is the SFT policy already loaded.
    A model no role uses any more is dropped before the next one loads."""

    def __init__(self) -> None:
        self.models: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}
        self.roles: dict[str, str] = {}  # role -> key of self.models

    def load(self, role: str, path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        scalar = role == "reward_model"
        key = json.dumps([scalar, _files_stamp(path)], default=str)
        self.roles.pop(role, None)
        for unused in set(self.models) - set(self.roles.values()) - {key}:
            del self.models[unused]
        if key not in self.models:
            self.models[key] = load_scalar_model(path) if scalar else load_causal_lm(path)
        self.roles[role] = key
        return self.models[key]

    def clear(self) -> None:
        self.models.clear()
        self.roles.clear()


def _exact_trunk(models: list[PreTrainedModel]) -> SharedTrunk | None:
    """The frozen bottom blocks ``models`` share, where running each model's top on their output
    is that model's own forward (a probe, :meth:`SharedTrunk.differs_from`), else None (said once)."""
    trunk = SharedTrunk.detect(models)
    why = next((w for m in models if trunk is not None and (w := trunk.differs_from(m)) is not None), None)
    if why is not None:
        print(f"eval: the models run whole, not on their shared frozen blocks: {why}", flush=True)
        return None
    return trunk


@dataclass
class _Readers:
    """What a shard measures its sampled responses with, on the sampled ids (prompt ⊕ response):
    the reward model's score and Σ_t log π − log π_ref. The models' shared frozen bottom blocks
    (:class:`SharedTrunk`, read from the weights: with ``trainable_layers`` the policy, the
    reference and the RM hold the base model's bottom blocks bit for bit) run once per batch and
    each model its own top: op for op the full forwards, so the same scores and KL."""

    policy: PreTrainedModel
    ref: PreTrainedModel | None  # None: no KL measured (or the policy is the reference: 0)
    reward_model: PreTrainedModel | ForeignReward | None  # ForeignReward: another tokenizer's RM
    kl_is_zero: bool  # the policy is the reference checkpoint itself

    def __post_init__(self) -> None:
        # Worth it wherever a second model reads the batch (the reference for the KL, the RM for
        # the score): sampling keeps the trunk's output (``capture``), so each reader runs only
        # its own top blocks. A trunk the RM breaks (another architecture) is tried without it.
        self.trunk, self.rm_on_trunk, self.capture = None, False, None
        rm = [self.reward_model] if isinstance(self.reward_model, torch.nn.Module) else []
        readers = [m for m in (self.ref, *rm) if m is not None]
        if readers:
            self.trunk = _exact_trunk([self.policy, *readers])
            self.rm_on_trunk = bool(rm) and self.trunk is not None
            if self.trunk is None and self.ref is not None and rm:
                self.trunk = _exact_trunk([self.policy, self.ref])
        if self.trunk is not None and buffers_fit(self.policy.config):
            self.capture = self.trunk.last_block(self.policy)

    @torch.no_grad()
    def measure(self, gen: Generation, prompts: Sequence[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(RM scores [B] or None, KL [B] or None)`` on the CPU."""
        inputs = (gen.query_ids, gen.query_mask, gen.response_ids, gen.response_mask)
        ids, mask = joined(*inputs)
        hidden = gen.hidden  # the trunk's output as sampling computed it (``capture``), else run here
        if hidden is None and self.trunk is not None:
            hidden = self.trunk.hidden(ids, mask)
        scores = kls = None
        if isinstance(self.reward_model, ForeignReward):  # its own tokens: decoded, re-encoded
            scores = self.reward_model.score(gen, prompts)
        elif self.reward_model is not None:
            if hidden is None or not self.rm_on_trunk:  # the sampled ids, as in PPO; no missing-EOS penalty
                scores = episode_scores(gen, prompts, [], self.reward_model, None).cpu()
            else:
                assert self.trunk is not None
                raw = self.trunk.scalars(self.reward_model, hidden, mask)
                scores = score_at_last_token(self.reward_model, raw, mask).float().cpu()
        if self.kl_is_zero:
            kls = torch.zeros(len(prompts))
        elif self.ref is not None:
            # The policy's log-probs are the ones it sampled with (temperature 1: the KL is only
            # measured there); the reference reads the same ids.
            kls = (gen.logprobs.sum(-1) - self._logprob_sums(self.ref, inputs, hidden)).cpu()
        return scores, kls

    def _logprob_sums(
        self,
        model: PreTrainedModel,
        inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        hidden: torch.Tensor | None,
    ) -> torch.Tensor:
        """Σ_t log p(response token) under ``model`` at temperature 1: ``[B]``."""
        if hidden is None:
            return response_logprobs(model, *inputs, 1.0)[0].sum(-1)
        assert self.trunk is not None
        _, mask = joined(*inputs)
        logits = self.trunk.logits(model, hidden, mask, inputs[2].shape[1] + 1)[:, :-1]
        return logprobs_from_logits(logits, inputs[2], inputs[3], 1.0)[0].sum(-1)


def _shard_readers(
    path: str, cfg: EvalConfig, n_best: int, reward_model: str | None, ref_policy: str | None, cache: _ModelCache
) -> tuple[_Readers, PreTrainedTokenizerBase]:
    """The policy at ``path`` and what measures its responses: the RM, and the reference when the
    KL is measured (temperature 1, one sample per response; the policy itself when it is one)."""
    measure_kl = ref_policy is not None and cfg.temperature == 1.0 and n_best == 1
    kl_is_zero = measure_kl and str(path) == str(ref_policy)
    # The policy last: the one before it, no longer needed, is dropped before it loads.
    ref = cache.load("ref", ref_policy)[0] if measure_kl and not kl_is_zero and ref_policy else None
    rm = cache.load("reward_model", reward_model) if reward_model else None
    policy, tokenizer = cache.load("policy", path)
    notes: list[str] = []  # an RM of another tokenizer scores the decoded responses (reward.foreign)
    reward = reward_for(*rm, tokenizer, reward_model, notes, cfg.demonstrations_file) if rm is not None else None
    for line in notes:
        print(f"eval: {line}", flush=True)
    return _Readers(policy, ref, reward, kl_is_zero), tokenizer


def sample_policy_shard(
    path: str,
    texts: Sequence[str],
    first_index: int,
    cfg: EvalConfig,
    *,
    n_best: int = 1,
    reward_model: str | None = None,
    ref_policy: str | None = None,
    panel: Panel | None = None,
    autocast_dtype: Autocast | None = None,
    progress: Callable[[int], None] | None = None,
    cache: _ModelCache | None = None,
    keep_first: bool = False,
) -> PolicyShard | tuple[PolicyShard, PolicyShard]:
    """A policy's responses to ``texts`` (responses ``first_index …`` of the evaluation, one entry
    per response), measured and judged by the held-out labelers. ``progress(n)`` is called after
    each forward batch with the responses done so far; ``cache`` keeps the models for the next call.

    Candidate c of response i is sampled from a stream seeded by (seed, i, c), and labeler j's
    noise on it by (seed, i, j): the same for every policy (common random numbers), and a shard
    gives exactly what the whole list gives. n_best > 1 keeps each response's top-scored of
    n_best candidates (best-of-n by the reward model); ``keep_first`` also returns candidate 0 of
    each response as a shard of its own: the policy's plain response (the same stream, (seed, i, 0)),
    with its RM score and a KL of 0 when the policy is the reference (else none measured).
    """

    panel = panel or Panel()
    precision = autocast(ModelConfig(autocast=autocast_dtype), resolve_device("auto"))
    readers, tokenizer = _shard_readers(path, cfg, n_best, reward_model, ref_policy, cache or _ModelCache())
    device = next(readers.policy.parameters()).device
    out, first = PolicyShard([], [], [], [], [], []), PolicyShard([], [], [], [], [], [])
    first_kl_zero = ref_policy is not None and cfg.temperature == 1.0 and str(path) == str(ref_policy)
    step = max(1, cfg.batch_size // n_best)  # responses per forward batch of n_best candidates each
    for start in range(0, len(texts), step):
        chunk = texts[start : start + step]
        candidates = [t for t in chunk for _ in range(n_best)]
        rows = [first_index + start + i for i in range(len(chunk))]
        generators = row_generators(cfg.seed, [(i, c) for i in rows for c in range(n_best)], device)
        with precision:
            gen = sample(
                readers.policy,
                tokenizer,
                candidates,
                max_new_tokens=cfg.response_length,
                temperature=cfg.temperature,
                generator=generators,
                capture=readers.capture,
            )
            scores, kls = readers.measure(gen, candidates)
        batch_texts = decode_responses(tokenizer, gen)
        if keep_first:  # candidate 0 of each response: the policy's own sample
            zero = torch.arange(len(chunk)) * n_best
            zero_scores = scores[zero] if scores is not None else None
            zero_kls = torch.zeros(len(chunk)) if first_kl_zero else None
            zero_texts = [batch_texts[i] for i in zero.tolist()]
            _add_rows(first, gen.select(zero.to(gen.response_ids.device)), zero_texts, zero_scores, zero_kls)
        if scores is not None and n_best > 1:  # keep each response's top-scored candidate
            pick = scores.view(-1, n_best).argmax(-1) + torch.arange(len(chunk)) * n_best
            gen, scores = gen.select(pick.to(gen.response_ids.device)), scores[pick]
            batch_texts = [batch_texts[i] for i in pick.tolist()]
        _add_rows(out, gen, batch_texts, scores, kls)
        if progress is not None:
            progress(len(out.responses))
    for shard in (out, first) if keep_first else (out,):
        shard.judgements = [
            panel.judge(lab, t, r, np.random.default_rng([cfg.seed, first_index + i, j]))
            for i, (t, r) in enumerate(zip(texts, shard.responses, strict=True))
            for j, lab in enumerate(panel.heldout_labelers)
        ]
    return (out, first) if keep_first else out


def _add_rows(
    shard: PolicyShard, gen: Generation, texts: list[str], scores: torch.Tensor | None, kls: torch.Tensor | None
) -> None:
    shard.scores += scores.tolist() if scores is not None else []
    shard.kls += kls.tolist() if kls is not None else []
    shard.responses += texts
    shard.lengths += gen.lengths.tolist()
    shard.eos += gen.finished.tolist()


def policy_perplexity(
    path: str, texts: Sequence[PretrainText], autocast_dtype: Autocast | None = None, cache: _ModelCache | None = None
) -> float:
    """A policy's held-out pretraining perplexity (its alignment tax), loading it from ``path``."""
    model, tokenizer = (cache or _ModelCache()).load("policy", path)
    with autocast(ModelConfig(autocast=autocast_dtype), resolve_device("auto")):
        return pretrain_perplexity(model, tokenizer, texts)


@dataclass(frozen=True)
class _Job:
    """One call of an evaluation: a policy's shard of the responses, or its perplexity (``ppl``)."""

    name: str
    first: int  # responses first … last (a perplexity: 0 … 0)
    last: int
    ppl: bool = False
    also: str | None = None  # a best-of-n shard whose candidate 0 is also this policy's responses


def _check_policies(policies: dict[str, str], baseline: str, best_of: dict[str, int], reward_model: str | None) -> None:
    if baseline not in policies:
        raise ValueError(f"baseline {baseline!r} is not among the policies {list(policies)}")
    for name, n in best_of.items():
        if name not in policies:
            raise ValueError(f"best_of names {name!r}, which is not among the policies {list(policies)}")
        if n < 1:
            raise ValueError(f"best_of[{name!r}] must be >= 1, got {n}")
        if n > 1 and not reward_model:
            raise ValueError(f"best_of[{name!r}] = {n} needs a reward model to pick with")


def _plan_jobs(
    policies: dict[str, str], shards: Sequence[tuple[int, int]], taxed: Callable[[str], bool], within: dict[str, str]
) -> list[_Job]:
    """Each policy's shards, then its perplexity when ``taxed(name)``: in this order a process
    running them one after another computes the perplexity with the model it just sampled. A
    policy in ``within`` (name → best-of-n policy) gets its responses from that one's shards."""
    also = {bo: name for name, bo in within.items()}
    return [
        job
        for name in policies
        for job in [
            *(_Job(name, a, b, also=also.get(name)) for a, b in shards if name not in within),
            *([_Job(name, 0, 0, ppl=True)] if taxed(name) else []),
        ]
    ]


def _within_best_of(
    policies: dict[str, str], best_of: dict[str, int], ref_policy: str | None, cfg: EvalConfig
) -> dict[str, str]:
    """Plain policies whose responses are candidate 0 of a best-of-n policy of the same model
    (name → that policy): its shards sample them anyway, from the same streams (seed, i, 0). Only
    where the plain policy's KL is not measured or is 0 (it is the reference): best-of-n measures none."""
    within: dict[str, str] = {}
    for bo, n in best_of.items():
        for name, path in policies.items():
            measured = ref_policy is not None and cfg.temperature == 1.0 and str(path) != str(ref_policy)
            if n > 1 and best_of.get(name, 1) == 1 and path == policies[bo] and not measured and name not in within:
                within[name] = bo
                break
    return within


def _keep_shards(
    jobs: list[_Job], calls: list[Callable[[], Any]], stamps: dict[str, dict[str, Any]], texts: Sequence[str],
    keep_dir: str | Path, log: Callable[[str], None],
) -> dict[int, PolicyShard]:  # fmt: skip
    """The shards an earlier, interrupted evaluation finished (read back, not redone); every other
    shard's call is made to keep its result in ``keep_dir`` under its :func:`shard_key`."""
    Path(keep_dir).mkdir(parents=True, exist_ok=True)
    kept: dict[int, PolicyShard] = {}
    for i, job in enumerate(jobs):
        if job.ppl:
            continue
        stamp = {**stamps[job.name], "also": job.also} if job.also else stamps[job.name]
        shard_file = Path(keep_dir) / f"{shard_key(stamp, texts[job.first : job.last], job.first)}.pkl"
        if shard_file.exists():
            with open(shard_file, "rb") as f:
                kept[i] = pickle.load(f)
            span = f"responses {job.first}-{job.last}"
            log(f"eval: {job.name}: {span} kept from an earlier run of this evaluation ({keep_dir})")
        else:
            calls[i] = functools.partial(_kept_shard, str(shard_file), calls[i])
    return kept


def _run_jobs(
    jobs: list[_Job], calls: list[Callable[[], Any]], kept: dict[int, PolicyShard], executor: Executor,
    progress: _Progress,
) -> list[Any]:  # fmt: skip
    """Every job's result in order: the kept ones as they are, the rest from one map (a cluster
    runs the perplexities beside the sampling shards), with a progress line as each finishes."""
    todo = [i for i in range(len(jobs)) if i not in kept]

    def on_done(j: int) -> None:
        job = jobs[todo[j]]
        if job.ppl:
            progress.perplexity_done(job.name)
        else:
            progress.shard_done(job.name, job.last - job.first)
            if job.also:
                progress.shard_done(job.also, job.last - job.first)

    fresh = iter(executor.map([calls[i] for i in todo], "eval", on_done))
    return [kept[i] if i in kept else next(fresh) for i in range(len(jobs))]


def _policy_eval(
    name: str, path: str, parts: Sequence[PolicyShard], ppl: float | None, n_best: int, kl_bound: bool
) -> PolicyEval:
    """One policy's figures from its shards (in order) and its perplexity."""
    whole = PolicyShard(*([x for part in parts for x in getattr(part, f.name)] for f in fields(PolicyShard)))
    kls = [best_of_n_kl_bound(n_best)] if kl_bound else whole.kls
    flag_names = sorted({k for jd in whole.judgements for k in jd.flags})
    return PolicyEval(
        name=name,
        path=str(path),
        responses=whole.responses,
        likert=float(np.mean([jd.likert for jd in whole.judgements])),
        flag_rates={k: float(np.mean([jd.flags.get(k, False) for jd in whole.judgements])) for k in flag_names},
        rm_score=float(np.mean(whole.scores)) if whole.scores else None,
        kl_to_ref=float(np.mean(kls)) if kls else None,
        length=float(np.mean(whole.lengths)),
        eos_rate=float(np.mean(whole.eos)),
        pretrain_ppl=ppl,  # best-of-n leaves the model as it is: no tax of its own
        best_of=n_best,
    )


def _add_win_rates(
    results: list[PolicyEval], cfg: EvalConfig, panel: Panel, texts: list[str], clusters: list[int],
    human_comparisons: Sequence[Comparison],
) -> None:  # fmt: skip
    """Each policy's sampled and expected win rates against the baseline (and people's, if any)."""
    base = next(r for r in results if r.name == cfg.baseline)
    common: dict[str, Any] = dict(
        labelers=panel.heldout_labelers, seed=cfg.seed, clusters=clusters, n_bootstrap=cfg.n_bootstrap
    )
    for r in results:
        if r.name != cfg.baseline:
            wr = panel.win_rate(texts, r.responses, base.responses, **common)
            r.win_rate, r.win_ci, r.preferences = wr.rate, (wr.ci_low, wr.ci_high), list(wr.preferences)
            ex = panel.expected_win_rate(texts, r.responses, base.responses, **common)
            r.expected_win_rate, r.expected_win_ci = ex.rate, (ex.ci_low, ex.ci_high)
            r.expected_preferences = list(ex.preferences)
        else:
            r.win_rate, r.win_ci = 0.5, (0.5, 0.5)
            r.expected_win_rate, r.expected_win_ci = 0.5, (0.5, 0.5)
        if human_comparisons:
            r.human_win_rate, r.human_n = human_win_rate(human_comparisons, r.name, cfg.baseline)


def evaluate_policies(
    policies: dict[str, str],
    prompts: Sequence[Prompt],
    cfg: EvalConfig | None = None,
    *,
    panel: Panel | None = None,
    reward_model: str | None = None,
    ref_policy: str | None = None,
    pretrain_heldout: Sequence[PretrainText] = (),
    human_comparisons: Sequence[Comparison] = (),
    best_of: dict[str, int] | None = None,
    autocast_dtype: Autocast | None = None,
    executor: Executor | None = None,
    keep_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> EvalReport:
    """Evaluate named policies (name → model dir / 'default' / 'tiny') on held-out prompts.

    Each policy answers every prompt ``cfg.samples_per_prompt`` times; response ``j`` of a prompt
    is judged against the baseline's response ``j`` (sampled verdicts), and every response
    against every baseline response of its prompt with the judges' noise integrated out (the
    expected win rate). Both intervals are bootstrapped over prompts, so more samples narrow them
    by averaging out sampling noise, not by pretending to have more prompts. ``best_of`` (name →
    n) makes a policy best-of-n: each of its responses is the one the reward model scores highest
    among n samples, the RM's own optimisation without any training, at a KL of at most
    log n − (n − 1)/n nats when that policy is the reference. A plain policy of the same model
    (SFT beside SFT best-of-n) is not sampled again: its responses are each best-of-n response's
    candidate 0, drawn from the very stream its own would be. ``autocast_dtype`` ('bfloat16',
    'auto') runs every forward pass under mixed precision; every policy is measured the same way.
    ``executor`` runs the sampling shards and perplexities (default: here, one shard per policy;
    :class:`tether.cluster.RayCluster`: Ray tasks over prompt shards, with the same results).
    ``keep_dir``: each finished shard (a policy's responses, measurements and judgements) is kept
    there under a fingerprint of its call (:func:`shard_key`), so an interrupted evaluation rerun
    with the same models, prompts and settings redoes only the shards that had not finished.
    """
    # 1. Settings and inputs checked; one entry per response (a prompt's samples side by side).
    cfg = cfg or EvalConfig()
    cfg.validate()
    panel = panel or Panel()
    best_of = best_of or {}
    _check_policies(policies, cfg.baseline, best_of, reward_model)
    prompt_texts = [p.text for p in prompts]
    texts = [t for t in prompt_texts for _ in range(cfg.samples_per_prompt)]
    clusters = [i for i in range(len(prompt_texts)) for _ in range(cfg.samples_per_prompt)]
    executor = executor or Local()

    # 2. The jobs: every policy's responses, shard by shard (each response seeded by its own
    # index, so shards on several workers give what one process gives), and its alignment tax
    # (best-of-n leaves the model as it is: no tax of its own).
    within = _within_best_of(policies, best_of, ref_policy, cfg)
    jobs = _plan_jobs(
        policies,
        executor.shards(len(texts)),
        lambda name: bool(pretrain_heldout) and best_of.get(name, 1) == 1,
        within,
    )
    here = isinstance(executor, Local)  # in this process: models kept between calls, a line per batch
    cache = _ModelCache() if here else None
    progress = _Progress(len(texts), log)
    calls: list[Callable[[], Any]] = [
        functools.partial(policy_perplexity, policies[job.name], list(pretrain_heldout), autocast_dtype, cache)
        if job.ppl
        else functools.partial(
            sample_policy_shard,
            policies[job.name],
            texts[job.first : job.last],
            job.first,
            cfg,
            n_best=best_of.get(job.name, 1),
            reward_model=reward_model,
            ref_policy=ref_policy,
            panel=panel,
            autocast_dtype=autocast_dtype,
            progress=functools.partial(progress.partial, job.name, job.last - job.first) if here else None,
            cache=cache,
            keep_first=job.also is not None,
        )
        for job in jobs
    ]
    for name, path in policies.items():
        n_best = best_of.get(name, 1)
        log(
            f"eval: generating with {name} ({path}), {len(texts)} responses"
            + (f", best of {n_best} by the RM" if n_best > 1 else "")
            + (f": candidate 0 of each of {within[name]}'s" if name in within else "")
        )

    # 3. Shards an earlier, interrupted evaluation finished (keep_dir) are read back, not redone.
    kept: dict[int, PolicyShard] = {}
    if keep_dir is not None:
        shared = {
            "cfg": to_dict(cfg),
            "reward_model": _files_stamp(reward_model),
            "ref_policy": _files_stamp(ref_policy),
            "judges": repr(panel.heldout_labelers),
            "autocast": autocast_dtype,
        }
        stamps = {
            name: {**shared, "policy": _files_stamp(path), "n_best": best_of.get(name, 1)}
            for name, path in policies.items()
        }
        kept = _keep_shards(jobs, calls, stamps, texts, keep_dir, log)
    done = _run_jobs(jobs, calls, kept, executor, progress)

    # 4. Each policy's figures from its shards, then its win rates against the baseline.
    results = []
    for name, path in policies.items():
        n_best = best_of.get(name, 1)
        parts = [
            r if job.name == name and not job.also else r[0] if job.name == name else r[1]
            for job, r in zip(jobs, done, strict=True)
            if not job.ppl and name in (job.name, job.also)
        ]
        ppl = next((r for job, r in zip(jobs, done, strict=True) if job.name == name and job.ppl), None)
        kl_bound = n_best > 1 and ref_policy is not None and str(path) == str(ref_policy) and cfg.temperature == 1.0
        results.append(_policy_eval(name, path, parts, ppl, n_best, kl_bound))
    if cache is not None:
        cache.clear()
    _add_win_rates(results, cfg, panel, texts, clusters, human_comparisons)
    return EvalReport(
        baseline=cfg.baseline,
        prompts=prompt_texts,
        labelers=[lab.id for lab in panel.heldout_labelers],
        policies=results,
        temperature=cfg.temperature,
        max_new_tokens=cfg.response_length,
        samples_per_prompt=cfg.samples_per_prompt,
        config=to_dict(cfg),
    )


@dataclass
class CurvePoint:
    """One point of the compute curve: a PPO-ptx policy after ``episodes`` episodes, as evaluated."""

    episodes: int  # PPO-ptx episodes trained; 0 is the SFT policy PPO-ptx starts from
    policy: str  # its name in the evaluation: sft, ppo_ptx@N (a checkpoint), ppo_ptx (the final policy)
    path: str
    expected_win_rate: float | None
    expected_win_ci: tuple[float, float] | None
    win_rate: float | None
    win_ci: tuple[float, float] | None
    rm_score: float | None
    kl_to_ref: float | None
    likert: float
    length: float
    eos_rate: float
    pretrain_ppl: float | None


def compute_curve(report: EvalReport, final_episodes: int | None, start: str = "sft") -> list[CurvePoint]:
    """The compute curve of an evaluation that holds PPO-ptx checkpoints (``ppo_ptx@N``), by episodes.

    Every point is a policy of ``report`` with its figures unchanged: ``start`` (the SFT policy
    PPO-ptx starts from) at 0 episodes, each checkpoint at its N, and the final ``ppo_ptx`` at
    ``final_episodes`` (left out when None). Empty when the report holds no checkpoint.
    """
    points = []
    for p in report.policies:
        if p.name.startswith(CURVE_PREFIX) and p.name[len(CURVE_PREFIX) :].isdigit():
            episodes = int(p.name[len(CURVE_PREFIX) :])
        elif p.name == "ppo_ptx" and final_episodes:
            episodes = final_episodes
        elif p.name == start:
            episodes = 0
        else:
            continue
        figures = {f.name: getattr(p, f.name) for f in fields(CurvePoint) if f.name not in ("episodes", "policy")}
        points.append(CurvePoint(episodes=episodes, policy=p.name, **figures))
    if not any(p.policy.startswith(CURVE_PREFIX) for p in points):
        return []
    return sorted(points, key=lambda p: p.episodes)


def save_curve(points: Sequence[CurvePoint], report: EvalReport, path: str | Path) -> Path:
    """Write ``curve.json``: the points with the evaluation's settings (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = points[0].policy if points else ""
    by_definition = " (the baseline: its win rates are 0.5 by definition)" if start == report.baseline else ""
    data = {
        "x": "PPO-ptx episodes",
        "baseline": report.baseline,
        "prompts": len(report.prompts),
        "samples_per_prompt": report.samples_per_prompt,
        "labelers": report.labelers,
        "note": f"0 episodes is {start}, the policy PPO-ptx starts from{by_definition}; the last point is the "
        "final PPO-ptx policy, the very figures of eval.json's ppo_ptx; intervals are 95 % bootstrap intervals "
        "over prompts",
        "points": [asdict(p) for p in points],
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path


class _Progress:
    """evaluate_policies' progress lines: each policy's responses done out of ``total``, and the
    time since the sampling began. Shards finish in any order on a cluster; ``partial`` reports a
    running shard's responses in this process (added to the policy's finished shards)."""

    def __init__(self, total: int, log: Callable[[str], None]) -> None:
        self.total, self.log = total, log
        self.finished: dict[str, int] = {}
        self.start = time.monotonic()

    def _line(self, what: str) -> None:
        self.log(f"eval: {what} ({time.monotonic() - self.start:.0f} s)")

    def partial(self, name: str, shard_size: int, in_shard: int) -> None:
        if in_shard < shard_size:  # (a finished shard's line comes from shard_done)
            self._line(f"{name}: {self.finished.get(name, 0) + in_shard}/{self.total} responses")

    def shard_done(self, name: str, size: int) -> None:
        self.finished[name] = self.finished.get(name, 0) + size
        n = self.finished[name]
        self._line(f"{name}: {n}/{self.total} responses" + (", done" if n == self.total else ""))

    def perplexity_done(self, name: str) -> None:
        self._line(f"{name}: held-out pretraining perplexity done")


def save_eval(report: EvalReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=1))
    tmp.replace(path)
    return path


def load_eval(path: str | Path) -> EvalReport:
    data = json.loads(Path(path).read_text())
    data["policies"] = [
        PolicyEval(
            **{
                **p,
                **{k: tuple(p[k]) if p.get(k) else None for k in ("win_ci", "expected_win_ci")},
            }
        )
        for p in data["policies"]
    ]
    return EvalReport(**data)
