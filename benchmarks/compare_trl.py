"""tether against TRL 1.12 on identical work, in one run (not a test: prints figures).

    bash benchmarks/setup_trl.sh                 # once: benchmarks/.venv-trl (TRL, never tether's deps)
    .venv/bin/python benchmarks/compare_trl.py   # ~6 min on a 2-core CPU (--repeats 2: ~11 min)

What both sides run, each stage of each framework in its own subprocess (so that the peak RSS,
read from ``os.wait4`` of that child, is its own):

* the model: a GPT-2 built from a config (vocab 8192, 4 layers, 4 heads, width 256, fp32, no
  dropout), random init with a fixed seed, and a byte-level BPE tokenizer (8192 tokens) trained
  here on the default task's text, with distinct pad and EOS; saved once as an HF directory;
* SFT: the same demonstrations (64 prompt + 63 response tokens + EOS), batch 16, the same steps;
  tether's ``train_sft`` vs TRL's ``SFTTrainer`` (prompt-completion rows, loss on completions);
* RM: rankings of K = 4 responses (64 + 64 tokens each), 8 rankings per optimiser step; tether's
  ``train_reward_model`` takes them as K-wise batches (4 forwards and 6 pairs per ranking), TRL's
  ``RewardTrainer`` the 6 pairs of each as chosen/rejected rows (48 per step, 2 forwards a pair),
  both 32 sequences per forward;
* PPO: 16 prompts × (64 prompt + 64 response) tokens per iteration, 4 PPO epochs × 1 minibatch
  of 16, value model and reward model from the same scalar-head checkpoint, no pretraining mix
  (TRL has none: tether runs plain PPO, ptx_coef 0); tether's ``train_ppo`` vs TRL's
  ``trl.experimental.ppo.PPOTrainer``. Every response is exactly 64 tokens: tether has no option
  to forbid EOS, so in both processes each GPT-2 LM head gets a forward hook that sets the EOS
  logit to -1e9 (effectively -inf; finite so that TRL's p·log p entropy stays 0, not NaN).

tether's side keeps freed memory in the process as the ``tether`` command does
(:mod:`tether.allocator`; ``TETHER_KEEP_FREED_MEMORY=0`` runs it with glibc's default, as TRL runs).

Throughput is timed the same way on both sides: from the end of the first optimiser step (PPO:
iteration) to the end of the last, so loading, warm-up, evaluation and saving are not counted
(tether: each step's metrics record; TRL: ``on_step_end``). SFT counts prompt + response tokens,
RM counts ranked pairs, PPO counts episodes. Both sides use ``torch.set_num_threads(--threads)``
(default 1: on a shared 2-core machine two OpenMP threads are often slower, and one is stable).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_PYTHON = ROOT / "benchmarks" / ".venv-trl" / "bin" / "python"

VOCAB = 8192
PROMPT_TOKENS = 64  # the prompt as the model sees it, "\n" included (no chat template)
RESPONSE_TOKENS = 64  # SFT and RM: 63 text tokens + EOS; PPO: 64 sampled tokens
EOS, PAD, BOS = "<|im_end|>", "<|endoftext|>", "<|im_start|>"
EOS_LOGIT = -1e9
K = 4
SFT_BATCH, RM_RANKINGS, PPO_BATCH, PPO_EPOCHS = 16, 8, 16, 4
SEED = 0
STAGES = ("sft", "rm", "ppo")
UNITS = {"sft": "tokens/s", "rm": "pairs/s", "ppo": "episodes/s"}


# --------------------------------------------------------------------------------------------
# Shared assets (built with the project's venv): the tokenizer, the model, the data.


def build_tokenizer(texts: list[str], out: Path):
    """A byte-level BPE of exactly VOCAB tokens, as a PreTrainedTokenizerFast saved in ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[PAD, EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)  # (the default task's text gives ~7.8k of the 8192)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=BOS)
    # The default task's text may not hold 8192 merges: fill up so that every id the model can
    # sample decodes to something.
    missing = VOCAB - len(fast)
    if missing > 0:
        fast.add_tokens([f"<|unused{i}|>" for i in range(missing)], special_tokens=True)
    assert len(fast) == VOCAB, len(fast)
    fast.save_pretrained(out)
    return fast


def cut_texts(tokenizer, source: list[str], n_tokens: int, count: int, suffix: str, rng: random.Random) -> list[str]:
    """``count`` texts t whose ``t + suffix`` is exactly ``n_tokens`` tokens, cut from ``source``.

    A BPE cut does not always re-encode to the same count; such cuts are skipped.
    """
    ids = tokenizer("\n".join(source), add_special_tokens=False).input_ids
    want = n_tokens - len(tokenizer(suffix, add_special_tokens=False).input_ids) if suffix else n_tokens
    out: list[str] = []
    while len(out) < count:
        start = rng.randrange(0, len(ids) - want)
        text = tokenizer.decode(ids[start : start + want]).replace("\n", " ").strip()
        if "<|" not in text and len(tokenizer(text + suffix, add_special_tokens=False).input_ids) == n_tokens:
            out.append(text)
    return out


def build_assets(work: Path, args) -> dict:
    """The model directories and data files both sides train on; returns their paths."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from tether.data.task import build_default_task

    task = build_default_task()
    corpus = (
        [p.text for p in task.prompts]
        + [d.prompt + "\n" + d.response for d in task.demonstrations]
        + [t.text for t in task.pretrain_train]
    )
    model_dir = work / "gpt2"
    tokenizer = build_tokenizer(corpus, model_dir)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=512,
        n_embd=256,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(model_dir)
    # The RM / value-model initialisation both PPOs use: the same trunk, a seeded scalar head.
    torch.manual_seed(SEED + 1)
    rm = GPT2ForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm_dir = work / "rm"
    rm.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)

    rng = random.Random(SEED)
    prompt_src = [p.text for p in task.prompts] + [d.prompt for d in task.demonstrations]
    response_src = [d.response for d in task.demonstrations] + [t.text for t in task.pretrain_train]
    n_sft = SFT_BATCH * (args.sft_steps + 1) + 4  # + 4 validation demonstrations (tether needs some)
    n_rm = RM_RANKINGS * (args.rm_steps + 1) + 4
    # Prompts end in "\n" as the model sees them (no chat template); responses get EOS appended.
    prompts = cut_texts(tokenizer, prompt_src, PROMPT_TOKENS, n_sft + n_rm + PPO_BATCH, "\n", rng)
    responses = cut_texts(tokenizer, response_src, RESPONSE_TOKENS, n_sft + K * n_rm, EOS, rng)
    sft_rows = [{"prompt": p, "response": r} for p, r in zip(prompts[:n_sft], responses[:n_sft], strict=True)]
    rm_rows = []
    for i in range(n_rm):
        ranking = list(range(1, K + 1))
        rng.shuffle(ranking)
        rm_rows.append(
            {
                "prompt": prompts[n_sft + i],
                "responses": responses[n_sft + K * i : n_sft + K * (i + 1)],
                "ranking": ranking,
                "labeler_id": "L0",
            }
        )
    ppo_prompts = [{"id": f"p{i}", "text": p, "user_id": "u0"} for i, p in enumerate(prompts[n_sft + n_rm :])]
    files = {
        "sft_train": sft_rows[:-4],
        "sft_valid": sft_rows[-4:],
        "rm_train": rm_rows[:-4],
        "rm_valid": rm_rows[-4:],
        "ppo_prompts": ppo_prompts,
    }
    paths = {"model": str(model_dir), "rm": str(rm_dir)}
    for name, rows in files.items():
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = str(path)
    # The prompts' token ids exactly as tether encodes them, for TRL's PPO dataset.
    from tether.models.generation import encode_prompts

    ids, mask = encode_prompts(tokenizer, [p["text"] for p in ppo_prompts])
    assert ids.shape == (PPO_BATCH, PROMPT_TOKENS) and bool(mask.all()), ids.shape
    (work / "ppo_prompt_ids.json").write_text(json.dumps(ids.tolist()))
    paths["ppo_prompt_ids"] = str(work / "ppo_prompt_ids.json")
    return paths


# --------------------------------------------------------------------------------------------
# Both sides: EOS suppression, step clocks.


def suppress_eos_in_gpt2(eos_token_id: int) -> None:
    """Every GPT-2 LM head built from here on gives EOS the logit EOS_LOGIT (a forward hook)."""
    import torch
    from transformers import GPT2LMHeadModel

    init = GPT2LMHeadModel.__init__

    def hook(_module, _inputs, logits):
        index = torch.tensor([eos_token_id], device=logits.device)
        return logits.index_fill(-1, index, EOS_LOGIT)

    def patched_init(self, config, *a, **kw):
        init(self, config, *a, **kw)
        self.lm_head.register_forward_hook(hook)

    GPT2LMHeadModel.__init__ = patched_init


def rate(step_ends: list[float], per_step: float) -> tuple[float, int, float]:
    """(units/s, steps timed, seconds) from the end of the first step to the end of the last."""
    if len(step_ends) < 2:
        raise RuntimeError(f"need at least 2 steps to time, got {len(step_ends)}")
    seconds = step_ends[-1] - step_ends[0]
    steps = len(step_ends) - 1
    return per_step * steps / seconds, steps, seconds


# --------------------------------------------------------------------------------------------
# tether's side (the project's venv, this checkout's src/ first on the path).


def run_tether(stage: str, paths: dict, work: Path, args) -> dict:
    from tether import metrics
    from tether.config import PPOConfig, RMConfig, SFTConfig, resolve

    ends: list[float] = []
    key = {"sft": "tokens_per_s", "rm": "comparisons_per_s", "ppo": "episodes_per_s"}[stage]
    log_record = metrics.MetricsLogger.log

    def timed_log(self, record):  # a step's record is written right after its optimiser step
        if key in record:
            ends.append(time.perf_counter())
        return log_record(self, record)

    metrics.MetricsLogger.log = timed_log
    quiet = {"log": lambda _: None}
    out = str(work / f"tether-{stage}")
    model = {"model.name_or_path": paths["model"], "model.device": "cpu"}
    if stage == "sft":
        from tether.sft.train import train_sft

        cfg = resolve(
            SFTConfig,
            "sft",
            overrides={
                **model,
                "train_file": paths["sft_train"],
                "valid_file": paths["sft_valid"],
                "epochs": 1,
                "batch_size": SFT_BATCH,
                "micro_batch_size": SFT_BATCH,
                "max_length": 256,
                "select_by": "last",
                "save_every_steps": 10**6,
                "out_dir": out,
            },
        )
        train_sft(cfg, **quiet)
        return {"per_step": SFT_BATCH * (PROMPT_TOKENS + RESPONSE_TOKENS), "ends": ends}
    if stage == "rm":
        from tether.reward.train import train_reward_model

        cfg = resolve(
            RMConfig,
            "rm",
            overrides={
                **model,
                "train_file": paths["rm_train"],
                "valid_file": paths["rm_valid"],
                "demonstrations_file": paths["sft_valid"],
                "batch_size": RM_RANKINGS,
                "micro_batch_size": RM_RANKINGS,
                "max_length": 256,
                "loss": "kwise",
                "save_every_steps": 10**6,
                "out_dir": out,
            },
        )
        train_reward_model(cfg, **quiet)
        return {"per_step": RM_RANKINGS * K * (K - 1) // 2, "ends": ends}
    from transformers import AutoTokenizer

    from tether.ppo.train import train_ppo

    suppress_eos_in_gpt2(AutoTokenizer.from_pretrained(paths["model"]).eos_token_id)
    cfg = resolve(
        PPOConfig,
        "ppo",
        overrides={
            "policy.name_or_path": paths["model"],
            "policy.device": "cpu",
            "reward_model": paths["rm"],
            "prompts_file": paths["ppo_prompts"],
            "batch_size": PPO_BATCH,
            "mini_batch_size": PPO_BATCH,
            "micro_batch_size": PPO_BATCH,
            "generation_batch_size": PPO_BATCH,
            "ppo_epochs": PPO_EPOCHS,
            "max_new_tokens": RESPONSE_TOKENS,
            "max_prompt_length": PROMPT_TOKENS,
            "total_episodes": PPO_BATCH * (args.ppo_iterations + 1),
            "kl_coef": 0.05,
            "ptx_coef": 0.0,
            "optim.warmup_steps": 0,
            "value_optim.warmup_steps": 0,
            "sample_every": 0,
            "save_every": 10**6,
            "out_dir": out,
        },
    )
    result = train_ppo(cfg, **quiet)
    lengths = {m["response_length"] for m in result.metrics}
    assert lengths == {float(RESPONSE_TOKENS)}, f"tether responses not all {RESPONSE_TOKENS} tokens: {lengths}"
    timed = result.metrics[1:]  # tether's own phase split, the warm-up iteration left out
    phases = {k: sum(m[f"time_{k}"] for m in timed) / len(timed) for k in ("generation", "scoring", "update")}
    return {"per_step": PPO_BATCH, "ends": ends, "phases": phases}


# --------------------------------------------------------------------------------------------
# TRL's side (benchmarks/.venv-trl).


def run_trl(stage: str, paths: dict, work: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, _args, _state, control, **_kw):
            ends.append(time.perf_counter())
            return control

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in Path(paths[name]).read_text().splitlines()]

    common = dict(
        output_dir=str(work / f"trl-{stage}"),
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        use_cpu=True,
        seed=SEED,
        dataloader_num_workers=0,
        # TRL's configs default to bf16 autocast; the comparison is fp32 on both sides (and on an
        # AVX2-only CPU bf16 is emulated: TRL's SFT ran ~20x slower with it than tether in fp32).
        bf16=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list(
            [{"prompt": r["prompt"] + "\n", "completion": r["response"]} for r in rows("sft_train")]
        )
        config = SFTConfig(
            per_device_train_batch_size=SFT_BATCH,
            gradient_accumulation_steps=1,
            num_train_epochs=1,
            max_length=256,
            **common,
        )
        model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
        trainer.add_callback(StepClock())
        trainer.train()
        return {"per_step": SFT_BATCH * (PROMPT_TOKENS + RESPONSE_TOKENS), "ends": ends}
    if stage == "rm":
        from trl import RewardConfig, RewardTrainer

        pairs = []
        for r in rows("rm_train"):
            for i in range(K):
                for j in range(K):
                    if r["ranking"][i] < r["ranking"][j]:  # rank 1 is best
                        pairs.append(
                            {"prompt": r["prompt"] + "\n", "chosen": r["responses"][i], "rejected": r["responses"][j]}
                        )
        pairs_per_step = RM_RANKINGS * K * (K - 1) // 2
        micro = RM_RANKINGS * K // 2  # pairs per forward: as many sequences as tether's K-wise micro-batch
        config = RewardConfig(
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=pairs_per_step // micro,
            num_train_epochs=1,
            max_length=256,
            **common,
        )
        model = AutoModelForSequenceClassification.from_pretrained(paths["model"], num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = RewardTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer
        )
        trainer.add_callback(StepClock())
        trainer.train()
        return {"per_step": pairs_per_step, "ends": ends}

    from trl.experimental.ppo import PPOConfig, PPOTrainer

    suppress_eos_in_gpt2(tokenizer.eos_token_id)
    ids = json.loads(Path(paths["ppo_prompt_ids"]).read_text())
    data = Dataset.from_dict({"input_ids": ids})
    config = PPOConfig(
        per_device_train_batch_size=PPO_BATCH,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=PPO_EPOCHS,
        local_rollout_forward_batch_size=PPO_BATCH,
        response_length=RESPONSE_TOKENS,
        total_episodes=PPO_BATCH * (args.ppo_iterations + 1),
        stop_token="eos",
        missing_eos_penalty=1.0,  # TRL subtracts it: tether's default -1.0
        kl_coef=0.05,
        temperature=1.0,
        num_sample_generations=0,
        **common,
    )

    def load(cls, path):
        kw = {"num_labels": 1} if cls is AutoModelForSequenceClassification else {}
        return cls.from_pretrained(path, dtype=torch.float32, **kw)

    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=load(AutoModelForCausalLM, paths["model"]),
        ref_model=load(AutoModelForCausalLM, paths["model"]),
        reward_model=load(AutoModelForSequenceClassification, paths["rm"]),
        value_model=load(AutoModelForSequenceClassification, paths["rm"]),
        train_dataset=data,
        eval_dataset=data,
        callbacks=[StepClock()],
    )
    trainer.train()
    return {"per_step": PPO_BATCH, "ends": ends}


# --------------------------------------------------------------------------------------------
# The driver.


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    paths = json.loads((work / "paths.json").read_text())
    run = run_tether if args.child == "tether" else run_trl
    if args.child == "tether":  # as the `tether` command runs (TETHER_KEEP_FREED_MEMORY=0: glibc's default)
        from tether.allocator import keep_freed_memory

        keep_freed_memory()
    # A fresh run directory: tether would resume a finished run from the previous repeat's state.
    shutil.rmtree(work / f"{args.child}-{args.stage}", ignore_errors=True)
    timing = run(args.stage, paths, work, args)
    per_s, steps, seconds = rate(timing["ends"], timing["per_step"])
    record = {"per_s": per_s, "steps": steps, "seconds": seconds, "versions": versions(args.child)}
    if "phases" in timing:
        record["phases"] = timing["phases"]
    (work / f"{args.child}-{args.stage}.json").write_text(json.dumps(record))


def versions(side: str) -> str:
    import torch
    import transformers

    if side == "trl":
        import trl

        return f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}"
    return f"tether (this checkout), transformers {transformers.__version__}, torch {torch.__version__}"


def spawn(side: str, stage: str, work: Path, args) -> dict:
    """Run one (framework, stage) in a fresh process; its result plus its peak RSS (MiB)."""
    python = str(args.trl_python) if side == "trl" else sys.executable
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = env["HF_DATASETS_OFFLINE"] = "1"
    if side == "tether":  # this checkout's tether, whatever the venv has installed
        env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [python, __file__, "--child", side, "--stage", stage, "--work", str(work), "--threads", str(args.threads)]
    cmd += ["--sft-steps", str(args.sft_steps), "--rm-steps", str(args.rm_steps)]
    cmd += ["--ppo-iterations", str(args.ppo_iterations), "--repeats", str(args.repeats)]
    log = open(work / f"{side}-{stage}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        tail = (work / f"{side}-{stage}.log").read_text()[-3000:]
        raise SystemExit(f"{side} {stage} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads((work / f"{side}-{stage}.json").read_text())
    result["rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    result["wall_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on both sides")
    parser.add_argument("--sft-steps", type=int, default=8, help="timed SFT steps (after one warm-up step)")
    parser.add_argument("--rm-steps", type=int, default=6, help="timed RM steps (after one warm-up step)")
    parser.add_argument("--ppo-iterations", type=int, default=4, help="timed PPO iterations (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side (interleaved); the best is shown")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of sft,rm,ppo")
    parser.add_argument("--trl-python", type=Path, default=TRL_PYTHON, help="the TRL venv's python")
    parser.add_argument("--work", help="keep the models, data and logs here (default: a temp dir)")
    parser.add_argument("--child", choices=["tether", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if not args.trl_python.exists():
        raise SystemExit(f"{args.trl_python} is missing: run `bash benchmarks/setup_trl.sh` first")
    stages = [s for s in args.stages.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="compare-trl-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        paths = build_assets(work, args)
        (work / "paths.json").write_text(json.dumps(paths))
        runs: dict[tuple[str, str], list[dict]] = {}
        for stage in stages:
            for _ in range(args.repeats):  # interleaved, so that both sides see the same load
                for side in ("tether", "trl"):
                    r = spawn(side, stage, work, args)
                    runs.setdefault((side, stage), []).append(r)
                    split = ""
                    if "phases" in r:
                        split = ", " + " / ".join(f"{k} {v:.1f} s" for k, v in r["phases"].items()) + " per iteration"
                    print(
                        f"  {side:6} {stage:3}: {r['per_s']:9.1f} {UNITS[stage]} over {r['steps']} steps "
                        f"({r['seconds']:.1f} s{split}), peak RSS {r['rss_mib']:.0f} MiB, process {r['wall_s']:.0f} s",
                        flush=True,
                    )
        # The best run of each side (the least disturbed by other jobs), the highest peak RSS.
        results = {
            key: {**max(rs, key=lambda r: r["per_s"]), "rss_mib": max(r["rss_mib"] for r in rs)}
            for key, rs in runs.items()
        }
        load_after = Path("/proc/loadavg").read_text().split()[:3]
    print()
    print(
        f"threads {args.threads}; best of {args.repeats} run(s) per side; "
        f"load average before {' '.join(load_before)}, after {' '.join(load_after)}"
    )
    print(f"tether: {results['tether', stages[0]]['versions']}")
    print(f"TRL:    {results['trl', stages[0]]['versions']}")
    print()
    print("| stage | unit | tether | TRL 1.12 | tether / TRL | peak RSS tether | peak RSS TRL | RSS ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for stage in stages:
        a, b = results["tether", stage], results["trl", stage]
        digits = 2 if stage == "ppo" else 1
        print(
            f"| {stage.upper()} | {UNITS[stage]} | {a['per_s']:,.{digits}f} | {b['per_s']:,.{digits}f} | "
            f"{a['per_s'] / b['per_s']:.2f}x | {a['rss_mib']:,.0f} MiB | {b['rss_mib']:,.0f} MiB | "
            f"{a['rss_mib'] / b['rss_mib']:.2f} |"
        )


if __name__ == "__main__":
    main()
