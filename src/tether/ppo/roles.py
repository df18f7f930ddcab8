"""PPO's roles, built once: the one place where the speed features are decided.

:class:`PPORoles` holds the policy, the frozen reference, the value model, the reward model, the
shared frozen trunk (or None), the sampler and the precision. :func:`build_roles` loads the
models and makes every speed decision there, each with its condition and its log line side by
side (:meth:`PPORoles.describe`):

- **the shared trunk**: the bottom blocks every model holds bit for bit, frozen, run once per
  batch (:class:`~tether.models.trunk.SharedTrunk`); found from the weights;
- **the sampling precision**: the policy itself under its autocast, or an inference copy of it in
  ``rollout_dtype`` (:class:`~tether.models.generation.Sampler`);
- **the trunk kept from sampling**: when the sampler runs the trunk's very modules eagerly and
  in the precision scoring runs them in, sampling keeps their output and scoring starts there;
- **the LM head in float32 under autocast**: PPO's old log-probs (scoring, a generation chunk)
  and new ones (the update, a micro-batch) come from batches of other shapes, and a bf16 head
  rounds their logits differently: the ratio at unchanged weights would not be 1.

The trainer then asks the roles for what it needs and never learns which path ran:
:meth:`PPORoles.rollout` (sample and score, step 1), :meth:`PPORoles.score` (a generation into a
:class:`~tether.ppo.rollout.Rollout`) and :meth:`PPORoles.forward` (the update's forward of a
minibatch, with gradients, through the data-parallel wrappers).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.config import PPOConfig
from tether.distributed import Dist, ParallelModel, as_parallel
from tether.models.generation import Generation, Sampler, buffers_fit, decode_responses, sample
from tether.models.heads import apply_normalization, load_scalar_model, score_at_last_token, unwrap
from tether.models.loading import autocast, autocast_dtype, fast_bf16, load_causal_lm
from tether.models.precision import CastCachedLinear
from tether.models.trunk import SharedTrunk, backbone
from tether.ppo.rollout import (
    RewardFn,
    Rollout,
    RolloutTime,
    device_time,
    episode_scores,
    joined,
    logprobs_from_logits,
    reference,
    response_logprobs,
    response_values,
    scores_with_penalty,
    values_from_scalars,
)
from tether.reward.foreign import ForeignReward, reward_for, tokenizer_differences

Inputs = tuple[Tensor, Tensor, Tensor, Tensor]  # query_ids, query_mask, response_ids, response_mask


@dataclass
class PPORoles:
    """The four models of PPO and how they run. Build with :func:`build_roles` (the trainer) or
    directly (tests: no trunk, no capture, the models as they are)."""

    cfg: PPOConfig
    policy: PreTrainedModel
    ref_policy: PreTrainedModel | None  # None: the LoRA policy with its adapters disabled
    value_model: PreTrainedModel
    reward: PreTrainedModel | RewardFn
    tokenizer: PreTrainedTokenizerBase
    sampler: Sampler | None = None  # None: the policy itself
    trunk: SharedTrunk | None = None
    # Sampling, scoring and the update all run under it, so the rollout's log-probs and the
    # update's describe the same distribution.
    precision: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    capture: nn.Module | None = None  # the trunk's last block, hooked while sampling (or None)
    # Every forward with a gradient goes through these (DDP sees it); sampling and scoring use
    # the models themselves. None: one process's.
    policy_par: ParallelModel | None = None
    value_par: ParallelModel | None = None
    notes: list[str] = field(default_factory=list)  # the decisions, as :meth:`describe` says them

    def __post_init__(self) -> None:
        if self.sampler is None:
            self.sampler = Sampler(self.policy)
        self.policy_par = as_parallel(self.policy_par or self.policy)
        self.value_par = as_parallel(self.value_par or self.value_model)

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def describe(self) -> list[str]:
        """One log line per decision taken at set-up, each saying why."""
        return list(self.notes)

    # ---------------------------------------------------------------------------------------
    # Step 1: sample and score

    def sample(
        self,
        prompts: Sequence[str],
        generator: torch.Generator | Sequence[torch.Generator],
        *,
        keep_trunk: bool = True,
    ) -> Generation:
        """One response per prompt, as the rollout samples them (temperature, lengths, precision);
        ``generator``: one stream, or one per prompt. Keeps the trunk's output for :meth:`score`
        when decided so (``keep_trunk`` False: never, e.g. for samples only read as text)."""
        assert self.sampler is not None
        with self.precision:
            return sample(
                self.sampler,
                self.tokenizer,
                prompts,
                max_new_tokens=self.cfg.max_new_tokens,
                temperature=self.cfg.temperature,
                generator=generator,
                max_prompt_length=self.cfg.max_prompt_length,
                capture=self.capture if keep_trunk else None,
            )

    @torch.no_grad()
    def score(self, gen: Generation, prompts: Sequence[str]) -> Rollout:
        """Step 1b: score sampled episodes with every model, in eval mode.

        The policy and the reference go through the same forward procedure on the same ids, so
        when their weights are equal their log-probs are bitwise equal and the KL is exactly 0.
        With a shared trunk its output is the one sampling kept (``gen.hidden``) or else computed
        once here, and it is kept in the rollout for the update.
        """
        for model in (self.policy, self.ref_policy, self.value_model, self.reward):
            if isinstance(model, nn.Module):
                model.eval()  # dropout off in every model: RL must score what it sampled
        inputs: Inputs = (gen.query_ids, gen.query_mask, gen.response_ids, gen.response_mask)
        hidden = None
        with self.precision:
            if self.trunk is not None:
                hidden = gen.hidden if gen.hidden is not None else self.trunk.hidden(*joined(*inputs))
            ref_model, ref_context = reference(self.policy, self.ref_policy)
            with ref_context:
                ref_logprobs, _ = self._logprobs(ref_model, inputs, hidden)
            logprobs, entropy = self._logprobs(self.policy, inputs, hidden, with_entropy=True)
            values = self._values(self.value_model, inputs, hidden)
            scores = self._scores(gen, prompts, hidden)
        assert entropy is not None
        return Rollout(
            *inputs,
            sample_logprobs=gen.logprobs.float(),
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            entropy=entropy,
            scores=scores,
            finished=gen.finished,
            trunk_hidden=hidden,
        )

    def rollout(
        self, prompts: Sequence[str], generator: torch.Generator | Sequence[torch.Generator]
    ) -> tuple[Rollout, RolloutTime]:
        """Step 1 of an iteration: one sampled response per prompt, scored by every model.

        The prompts go in chunks of ``generation_batch_size``: each chunk is sampled
        (:meth:`sample`, drawing from ``generator``, or from each prompt's own generator when it
        is a list), then scored (:meth:`score`) before the next one is sampled, so no more than a
        chunk's activations are alive at once. Returns the ``B = len(prompts)`` episodes and the
        time spent sampling and scoring.
        """
        size = self.cfg.generation_batch_size
        parts: list[Rollout] = []
        timing = RolloutTime()
        for s in range(0, len(prompts), size):
            chunk = list(prompts[s : s + size])
            streams = generator[s : s + len(chunk)] if isinstance(generator, Sequence) else generator
            t0 = device_time(self.device)
            gen = self.sample(chunk, streams)
            t1 = device_time(self.device)
            parts.append(self.score(gen, chunk))
            timing.generation += t1 - t0
            timing.scoring += device_time(self.device) - t1
        return Rollout.cat(parts, self.tokenizer.pad_token_id), timing

    # ---------------------------------------------------------------------------------------
    # Step 4: the update's forward

    def forward(self, episodes: Rollout) -> tuple[Tensor, Tensor]:
        """The update's forward of a (micro-)batch: ``(logprobs [B, R], values [B, R])`` of the
        current policy and value model, differentiable, through the data-parallel wrappers;
        from the rollout's kept trunk output when there is one."""
        assert self.policy_par is not None and self.value_par is not None
        with self.precision:
            logprobs, _ = self.policy_par.run(self._logprobs, episodes.inputs, episodes.trunk_hidden)
            values = self.value_par.run(self._values, episodes.inputs, episodes.trunk_hidden)
        return logprobs, values

    # The one place the trunk forks a forward: with its output ``hidden`` only the model's own
    # blocks run (the same computation as the full forward), else the model runs whole.

    def _logprobs(
        self, model: PreTrainedModel, inputs: Inputs, hidden: Tensor | None, *, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        temperature = self.cfg.temperature
        if hidden is None or self.trunk is None:
            return response_logprobs(model, *inputs, temperature, with_entropy=with_entropy)
        _, mask = joined(*inputs)
        logits = self.trunk.logits(model, hidden, mask, inputs[2].shape[1] + 1)[:, :-1]
        return logprobs_from_logits(logits, inputs[2], inputs[3], temperature, with_entropy=with_entropy)

    def _values(self, model: PreTrainedModel, inputs: Inputs, hidden: Tensor | None) -> Tensor:
        if hidden is None or self.trunk is None:
            return response_values(model, *inputs)
        _, mask = joined(*inputs)
        per_token = apply_normalization(model, self.trunk.scalars(model, hidden, mask))
        return values_from_scalars(per_token, inputs[0].shape[1], inputs[3])

    def _scores(self, gen: Generation, prompts: Sequence[str], hidden: Tensor | None) -> Tensor:
        penalty = self.cfg.missing_eos_penalty
        if not isinstance(self.reward, nn.Module):
            return episode_scores(gen, prompts, decode_responses(self.tokenizer, gen), self.reward, penalty)
        if hidden is None or self.trunk is None:
            return episode_scores(gen, prompts, [], self.reward, penalty)
        self.reward.eval()
        _, mask = joined(gen.query_ids, gen.query_mask, gen.response_ids, gen.response_mask)
        raw = score_at_last_token(self.reward, self.trunk.scalars(self.reward, hidden, mask), mask)
        return scores_with_penalty(raw, gen, penalty)


# -------------------------------------------------------------------------------------------
# Building the roles: each decision with its condition and its log line


def build_roles(cfg: PPOConfig, reward_fn: RewardFn | None = None, d: Dist | None = None) -> PPORoles:
    """Load the four models and decide how they run (see the module docstring); ``d``: the
    data-parallel group (None: one process). Nothing is logged here: :meth:`PPORoles.describe`
    says what was decided."""
    notes: list[str] = []
    policy, ref_policy, value_model, reward, tokenizer = _load_models(cfg, reward_fn, notes)
    device = next(policy.parameters()).device
    trunk = _share_trunk(cfg, [policy, ref_policy, value_model, reward], notes)
    d = d or Dist()
    policy_par = ParallelModel(policy, cfg.policy.parallel, d)
    value_par = ParallelModel(value_model, cfg.policy.parallel, d)
    sampler = Sampler(policy, _sampling_dtype(cfg, device, notes), compile=cfg.rollout_compile)
    precision = autocast(cfg.policy, device)
    roles = PPORoles(
        cfg, policy, ref_policy, value_model, reward, tokenizer, sampler, trunk, precision, None,
        policy_par, value_par, notes,
    )  # fmt: skip
    if trunk is not None:  # found from the weights; kept only where its path is the models' own forward
        roles.trunk = _exact_trunk(roles, notes)
    roles.capture = _sampling_capture(sampler, roles.trunk, precision, device, notes)
    # After the sampler: a low-precision copy keeps its own head (it samples without autocast).
    _float32_heads([policy, ref_policy], precision, device, notes)
    return roles


def _load_models(
    cfg: PPOConfig, reward_fn: RewardFn | None, notes: list[str]
) -> tuple[
    PreTrainedModel, PreTrainedModel | None, PreTrainedModel, PreTrainedModel | RewardFn, PreTrainedTokenizerBase
]:
    """(policy, ref_policy or None, value_model, reward, tokenizer), on cfg.policy.device."""
    policy, tokenizer = load_causal_lm(cfg.policy, trainable=True)
    if cfg.policy.residual_dropout > 0:
        notes.append(
            f"ppo: policy.residual_dropout={cfg.policy.residual_dropout} has no effect: every "
            "model runs in eval mode (dropout off) in RL"
        )
    # The reference is a frozen copy of the initial policy; under LoRA it is the same network
    # with its adapters disabled (no second copy).
    ref_policy = None
    if not cfg.policy.lora.enabled:
        ref_policy = copy.deepcopy(policy).requires_grad_(False)
    if reward_fn is not None:
        reward: PreTrainedModel | RewardFn = reward_fn
    elif cfg.reward_model:
        rm, rm_tokenizer = load_scalar_model(cfg.reward_model)
        reward = reward_for(rm, rm_tokenizer, tokenizer, cfg.reward_model, notes, cfg.demonstrations_file)
        if isinstance(reward, ForeignReward):
            notes.append("ppo: the reward model reads its own tokens: it runs whole, in no shared trunk")
    else:
        raise ValueError("ppo needs reward_model (a reward model directory) or a reward function")
    rm_init = cfg.reward_model if not isinstance(reward, ForeignReward) else None
    value_init = cfg.value_model or rm_init or cfg.policy.name_or_path
    if isinstance(reward, ForeignReward) and not cfg.value_model:
        notes.append(
            f"ppo: the value model starts from the policy's SFT checkpoint {cfg.policy.name_or_path} with a "
            "fresh scalar head: a reward model with another tokenizer cannot be the critic"
        )
    elif not (cfg.value_model or cfg.reward_model):
        notes.append(
            "ppo: no reward model to initialise the value model from; using the policy "
            "checkpoint with a fresh scalar head"
        )
    # The value model is trained like the policy (dtype, device, LoRA, trainable layers).
    value_cfg = dataclasses.replace(cfg.policy, name_or_path=value_init)
    value_model, value_tokenizer = load_scalar_model(value_cfg, trainable=True)
    check_same_tokenizer(tokenizer, value_tokenizer, "value model")
    device = next(policy.parameters()).device
    for model in (policy, ref_policy, value_model, reward):
        if isinstance(model, nn.Module):
            model.to(device).eval()
    return policy, ref_policy, value_model, reward, tokenizer


def check_same_tokenizer(policy_tok: PreTrainedTokenizerBase, other_tok: PreTrainedTokenizerBase, what: str) -> None:
    """Raise unless ``other_tok`` has the policy's vocabulary and special tokens.

    PPO feeds the sampled token ids straight to the reward and value models; a different
    tokenizer would read them as other words, and score text the policy never wrote.
    """
    problems = tokenizer_differences(policy_tok, other_tok)
    if problems:
        raise ValueError(
            f"the {what}'s tokenizer differs from the policy's: {'; '.join(problems)}. PPO scores "
            "the policy's token ids directly, so both must share one tokenizer (train the reward "
            "model from the same SFT model)."
        )


def _share_trunk(cfg: PPOConfig, models: Sequence[object], notes: list[str]) -> SharedTrunk | None:
    """The frozen bottom blocks the roles share bit for bit (``cfg.share_trunk``), or None."""
    if not cfg.share_trunk:
        notes.append("ppo: share_trunk = false: each model runs whole")
        return None
    roles = [m for m in models if isinstance(m, nn.Module)]
    trunk = SharedTrunk.detect(roles)
    # (Only a shared trunk implies a `.layers` list: GPT-2 keeps its blocks in `.h`.)
    notes.append(
        f"ppo: the {len(roles)} models share {trunk.depth} of {len(backbone(roles[0]).layers)} blocks "
        "bit for bit (frozen): computed once per batch"
        if trunk
        else "ppo: the models share no frozen block; each runs whole"
    )
    return trunk


def _exact_trunk(roles: PPORoles, notes: list[str]) -> SharedTrunk | None:
    """The roles' trunk if it gives what each model's own forward gives on a probe batch, else None.

    Running a model's top blocks on the trunk's output skips whatever its own forward does
    around the blocks (Gemma's embedding scale and logit soft-capping, Granite's multipliers):
    the probe compares log-probs, values and scores both ways, in float32, on two sequences (one
    left-padded) longer than any sliding window in the configs, and turns the sharing off with
    the reason when they differ.
    """
    models = [m for m in (roles.policy, roles.ref_policy, roles.value_model, roles.reward) if isinstance(m, nn.Module)]
    window = max(int(getattr(unwrap(m).config, "sliding_window", None) or 0) for m in models)
    width = max(8, window + 4)
    device, vocab = roles.device, int(unwrap(roles.policy).config.vocab_size)
    probe = torch.Generator().manual_seed(0)  # CPU: draws the probe's token ids there
    ids = torch.randint(vocab, (2, 2 * width), generator=probe).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded prompt
    inputs: Inputs = (ids[:, :width], mask[:, :width], ids[:, width:], mask[:, width:])
    gen = Generation(*inputs, logprobs=torch.zeros_like(inputs[2], dtype=torch.float32), finished=mask[:, -1].bool())
    with torch.no_grad():
        hidden = roles.trunk.hidden(*joined(*inputs)) if roles.trunk is not None else None
        pairs = {
            "policy's log-probs": [roles._logprobs(roles.policy, inputs, h)[0] for h in (None, hidden)],
            "value model's values": [roles._values(roles.value_model, inputs, h) for h in (None, hidden)],
        }
        if isinstance(roles.reward, nn.Module):  # (a reward function never sees the trunk)
            pairs["reward model's scores"] = [roles._scores(gen, ["", ""], h) for h in (None, hidden)]
    for what, (whole, shared) in pairs.items():
        gap = float((whole - shared).abs().max())
        if not gap <= 1e-4 * (1.0 + float(whole.abs().max())):
            notes.append(
                f"ppo: the shared trunk is off: the {what} through it differ from the model's own forward "
                f"by {gap:.2g} (a probe of {2 * width} tokens)"
            )
            return None
    return roles.trunk


def _sampling_dtype(cfg: PPOConfig, device: torch.device, notes: list[str]) -> str | None:
    """What the rollouts' :class:`Sampler` gets for ``cfg.rollout_dtype``.

    'auto' becomes None (the policy itself, under its autocast) when the policy already runs
    under a bfloat16 autocast on hardware with native bf16: its frozen weights' casts are cached
    (:mod:`tether.models.precision`), so a bf16 copy would be no faster, would cost memory and
    a sync after every step, and would keep sampling from handing the shared trunk's output to
    scoring. Otherwise ``cfg.rollout_dtype`` as it is.
    """
    if cfg.rollout_dtype == "auto" and autocast_dtype(cfg.policy, device) == "bfloat16" and fast_bf16(device):
        notes.append("ppo: rollouts sample the policy itself under its bf16 autocast (rollout_dtype auto, native bf16)")
        return None
    return cfg.rollout_dtype


def sampling_dtype(cfg: PPOConfig, device: torch.device) -> str | None:
    """The sampling dtype :func:`build_roles` chooses for ``cfg`` on ``device`` (benchmarks print it)."""
    return _sampling_dtype(cfg, device, [])


def _sampling_capture(
    sampler: Sampler,
    trunk: SharedTrunk | None,
    precision: contextlib.AbstractContextManager,
    device: torch.device,
    notes: list[str],
) -> nn.Module | None:
    """The block to hook while sampling so that scoring skips the shared trunk, or None.

    Only when the sampler runs the trunk's very modules eagerly and in the precision scoring runs
    them in: not a low-precision copy (its output is not the trunk's), not a fixed sampling dtype
    that turns scoring's autocast off, not compiled decode steps (hooks may not fire there), and
    only with the KV buffers (the loop that knows where each position's output goes).
    """
    if trunk is None:
        return None
    with precision:  # asked of torch, inside the very context scoring runs in
        under_autocast = torch.is_autocast_enabled(device.type)
    why = None
    if sampler.is_copy:
        why = "a low-precision copy"
    elif sampler.compiled:
        why = "compiled decode"
    elif under_autocast and sampler.dtype is not None:
        why = f"sampled in {sampler.dtype}, scored under autocast"
    elif not buffers_fit(sampler.module.config):
        why = "the model's attention keeps HF's own KV cache (sliding window or the like)"
    block = trunk.last_block(sampler.module) if why is None else None
    if block is None:
        why = why or "the sampled model does not run the trunk's own modules"
        notes.append(f"ppo: the shared blocks run again in scoring (sampling keeps no output of theirs: {why})")
    else:
        notes.append("ppo: sampling keeps the shared blocks' output for scoring (no second pass through them)")
    return block


class Float32Head(nn.Linear):
    """An LM head that computes its logits in float32 under autocast (weights and input cast up).

    Outside autocast, on float32 weights and input, it is the plain ``nn.Linear`` op for op.
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Linear's own name
        with torch.autocast(input.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(input.float(), self.weight.float(), bias)


def _float32_heads(
    models: Sequence[PreTrainedModel | None],
    precision: contextlib.AbstractContextManager,
    device: torch.device,
    notes: list[str],
) -> None:
    """Under an autocast, make the models' LM heads :class:`Float32Head` s (in place).

    The old log-probs come from scoring (a generation chunk, padded to its longest), the new ones
    from the update's micro-batches (other rows, other padding): under bf16 the two logits of a
    token then round differently (1 bf16 ulp of a logit of 8 is 0.03 nats) and the PPO ratio at
    unchanged weights is not 1. In float32 only the blocks' round-off is left.
    """
    with precision:
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    if dtype is None:
        return
    for model in models:
        head = None if model is None else unwrap(model).get_output_embeddings()
        if isinstance(head, nn.Linear) and type(head) in (nn.Linear, CastCachedLinear):
            head.__class__ = Float32Head
    notes.append(
        f"ppo: the LM head computes its logits in float32 under the {dtype} autocast (old and new log-probs agree)"
    )


def plain_roles(
    cfg: PPOConfig,
    policy: PreTrainedModel,
    value_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    ref_policy: PreTrainedModel | None = None,
    reward: PreTrainedModel | RewardFn | None = None,
) -> PPORoles:
    """Roles of models already loaded, each run whole in one process (tests, tools): the
    reference defaults to the policy, the reward to a constant 0."""
    ref = policy if ref_policy is None else ref_policy
    return PPORoles(cfg, policy, ref, value_model, _no_reward if reward is None else reward, tokenizer)


def _no_reward(prompts: list[str], responses: list[str]) -> Tensor:
    return torch.zeros(len(responses))
