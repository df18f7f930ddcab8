"""A self-contained HTML report with PNG plots: win rates, training curves, alignment tax, samples.

Everything is embedded (plots as base64 PNG), so the file can be mailed or opened offline; the
PNGs are also written next to it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from tether.eval.evaluate import CURVE_PREFIX, CurvePoint, EvalReport, PolicyEval, compute_curve, save_curve
from tether.metrics import read_metrics

COLORS = {"base": "#9e9e9e", "sft": "#5b8def", "ppo": "#f0a340", "ppo_ptx": "#d9534f"}


def _color(name: str) -> str:
    return COLORS.get(name, "#6c757d")


def _figure(*args: Any, **kwargs: Any) -> tuple[Figure, Any]:
    """A new figure on the file-only Agg backend (no display needed; set where figures are made)."""
    matplotlib.use("Agg")
    return plt.subplots(*args, **kwargs)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_curve(points: list[CurvePoint], baseline: str) -> bytes | None:
    """Expected win rate against PPO-ptx episodes, with 95 % intervals: the compute curve."""
    if not points:
        return None
    fig, ax = _figure(figsize=(6, 3.4))
    rows = [
        (p.episodes, p.expected_win_rate, *p.expected_win_ci)
        for p in points
        if p.expected_win_rate is not None and p.expected_win_ci
    ]
    xs, ys, lows, highs = ([row[i] for row in rows] for i in range(4))
    err = [[y - lo for y, lo in zip(ys, lows, strict=True)], [hi - y for y, hi in zip(ys, highs, strict=True)]]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, color=_color("ppo_ptx"), label="expected win rate, 95 % CI")
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.set_xlabel("PPO-ptx episodes (0: SFT, the policy it starts from)")
    ax.set_ylabel(f"expected win rate vs {baseline}")
    ax.set_title("Win rate against compute (held-out labelers, held-out prompts)", fontsize=10)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_win_rates(report: EvalReport) -> bytes:
    """The paper's Figure 1 shape: win rate against the baseline, with 95 % intervals.

    Two bars per policy: the expected win rate (the held-out labelers' noise integrated out) and
    the win rate of their sampled verdicts; both estimate the same quantity.
    """
    pols = [p for p in report.policies if not p.name.startswith(CURVE_PREFIX)]  # the curve has its own plot
    fig, ax = _figure(figsize=(7, 3.8))
    width = 0.38
    for offset, key, label, alpha in (
        (-width / 2, "expected_win", "expected (noise integrated out)", 1.0),
        (width / 2, "win", "sampled verdicts", 0.45),
    ):
        rates = [getattr(p, f"{key}_rate") for p in pols]
        cis = [getattr(p, f"{key}_ci") for p in pols]
        if any(r is None for r in rates):
            continue
        xs = [i + offset for i in range(len(pols))]
        err = [[r - c[0] for r, c in zip(rates, cis, strict=True)], [c[1] - r for r, c in zip(rates, cis, strict=True)]]
        ax.bar(xs, rates, width, yerr=err, capsize=4, color=[_color(p.name) for p in pols], alpha=alpha, label=label)
        for x, r in zip(xs, rates, strict=True):
            ax.text(x, r + 0.03, f"{r:.2f}", ha="center", fontsize=8)
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(pols)), [p.name for p in pols])
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate vs {report.baseline}")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(
        f"Held-out labelers ({', '.join(report.labelers)}), {len(report.prompts)} held-out prompts "
        f"× {report.samples_per_prompt}",
        fontsize=10,
    )
    return _png(fig)


def plot_alignment_tax(report: EvalReport) -> bytes | None:
    pols = [p for p in report.policies if p.pretrain_ppl is not None]
    if not pols:
        return None
    fig, ax = _figure(figsize=(6, 3.2))
    ax.bar([p.name for p in pols], [p.pretrain_ppl for p in pols], color=[_color(p.name) for p in pols])
    ax.set_ylabel("held-out pretraining perplexity")
    ax.set_title("Alignment tax (lower is better)")
    for i, p in enumerate(pols):
        ax.text(i, p.pretrain_ppl, f"{p.pretrain_ppl:.1f}", ha="center", va="bottom", fontsize=9)
    return _png(fig)


def plot_curves(panels: list[tuple[str, list[tuple[str, list[float], list[float]]]]]) -> bytes | None:
    """A grid of small line plots: (title, [(label, xs, ys), ...])."""
    panels = [p for p in panels if any(len(xs) for _, xs, _ in p[1])]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = _figure(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels, strict=False):
        for label, xs, ys in series:
            if xs:
                ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def _series(metrics: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    pts = [(m[x], m[key]) for m in metrics if m.get(key) is not None and x in m]
    return [p[0] for p in pts], [p[1] for p in pts]


def training_panels(run_dir: Path) -> list:
    """Curves from the run directory's stage metrics (whichever stages exist)."""
    panels = []
    sft = read_metrics(run_dir / "sft" / "metrics.jsonl")
    if sft:
        panels.append(("SFT loss", [("train", *_series(sft, "loss")), ("valid", *_series(sft, "valid_loss"))]))
    for rm_metrics in sorted(run_dir.glob("round-*/rm/metrics.jsonl")):
        m = read_metrics(rm_metrics)
        label = rm_metrics.parts[-3]
        panels.append(
            (
                f"RM pairwise accuracy ({label})",
                [
                    ("train batches", *_series(m, "accuracy")),
                    ("validation", *_series(m, "valid_accuracy")),
                    ("held-out labelers", *_series(m, "valid_accuracy_heldout_labelers")),
                ],
            )
        )
    ppo_runs = sorted(run_dir.glob("round-*/ppo*/metrics.jsonl"))
    for key, title in (
        ("score", "PPO: RM score"),
        ("kl", "PPO: KL to SFT"),
        ("response_length", "PPO: response length"),
        ("eos_rate", "PPO: EOS rate"),
        ("ptx_loss", "PPO: pretraining loss"),
    ):
        series = []
        for path in ppo_runs:
            xs, ys = _series(read_metrics(path), key, "step")
            series.append((f"{path.parts[-3]}/{path.parts[-2]}", xs, ys))
        panels.append((title, series))
    return panels


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _fmt(v: float | None, spec: str = ".3f") -> str:
    if v is None:
        return "–"
    text = format(v, spec)
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"


def _curve_html(curve: list[CurvePoint], png: bytes | None) -> str:
    if not curve:
        return ""
    rows = "".join(
        f"<tr><td>{p.episodes}</td><td>{html.escape(p.policy)}</td>"
        f"<td>{_rate(p.expected_win_rate, p.expected_win_ci)}</td><td>{_rate(p.win_rate, p.win_ci)}</td>"
        f"<td>{_fmt(p.rm_score)}</td><td>{_fmt(p.kl_to_ref, '.2f')}</td></tr>"
        for p in curve
    )
    return (
        "<h2>Win rate against compute</h2>"
        + _img(png, "win rate against PPO episodes")
        + "<table><tr><th>PPO-ptx episodes</th><th>policy</th><th>expected win rate [95 % CI]</th>"
        f"<th>sampled win rate [95 % CI]</th><th>RM score</th><th>KL to SFT (nats)</th></tr>{rows}</table>"
    )


def _rate(rate: float | None, ci: tuple[float, float] | None) -> str:
    return f"{rate:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if rate is not None and ci else "–"


def _verdict(policy: PolicyEval, index: int, baseline: str) -> str:
    """The held-out labelers' verdict on one response of ``policy`` against the baseline's."""
    if not policy.preferences:
        return "(baseline)"
    p = policy.preferences[index]
    if p == 0.5:
        return f"tie ({p:.2f})"
    winner = policy.name if p > 0.5 else baseline
    return f"{winner} preferred ({p:.2f} for {policy.name})"


def _own_prompts_note(report: EvalReport) -> str:
    """On prompts of the user's own, a warning above the simulated labelers' figures."""
    if not (report.config or {}).get("prompts_file"):
        return ""
    return (
        '<p class="note"><b>These are your own prompts.</b> The win rates, Likert scores and flags below are '
        "the <b>simulated labelers</b>', whose rubric is written for the built-in task's constraint prompts "
        "and means little on other prompts: read people's rankings (<code>tether eval --human</code>, printed "
        "by the command) and the RM score first.</p>"
    )


def write_report(
    report: EvalReport,
    out_dir: str | Path,
    run_dir: str | Path | None = None,
    extra: dict | None = None,
    n_samples: int = 12,
    final_episodes: int | None = None,
) -> Path:
    """Write report.html (+ PNGs) into out_dir; returns the HTML path.

    ``final_episodes``: the PPO episodes behind the policy named ``ppo_ptx``, the last point of the
    compute curve when PPO-ptx checkpoints (``ppo_ptx@N``) were evaluated too: then the report plots
    it (win_vs_episodes.png) and curve.json holds its figures.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curve = compute_curve(report, final_episodes)
    pngs = {
        "win_rates.png": plot_win_rates(report),
        "win_vs_episodes.png": plot_curve(curve, report.baseline),
        "alignment_tax.png": plot_alignment_tax(report),
        "training_curves.png": plot_curves(training_panels(Path(run_dir))) if run_dir else None,
    }
    for name, data in pngs.items():
        if data is not None:
            (out / name).write_bytes(data)

    rows = _policy_rows(report)
    names = [p.name for p in report.policies]
    show = [n for n in (report.baseline, "ppo_ptx") if n in names] or names[:2]
    sample_rows = _sample_rows(report, show, n_samples)
    best_of_note = _best_of_notes(report)
    extra_html = _facts_html(extra) if extra else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tether report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; width: 100%; }}
th, td {{ border: 1px solid #ddd; padding: 6px 8px; vertical-align: top; text-align: left; font-size: 14px; }}
th {{ background: #f5f5f5; }}
pre {{ white-space: pre-wrap; overflow-wrap: anywhere; margin: 0; font-family: inherit; }}
td.prompt {{ width: 30%; color: #444; overflow-wrap: anywhere; }}
img {{ max-width: 100%; }}
.note {{ color: #555; font-size: 14px; }}
</style></head><body>
<h1>tether: InstructGPT pipeline report</h1>
{_own_prompts_note(report)}
<p class="note">Held-out prompts from users never seen in training; judged by held-out simulated labelers
({html.escape(", ".join(report.labelers))}), whose labels were never trained on. Sampling temperature
{report.temperature}, at most {report.max_new_tokens} new tokens.
Win rates are against <b>{html.escape(report.baseline)}</b>
with 95 % bootstrap intervals over prompts; ties count half; {report.samples_per_prompt} sampled
response(s) per prompt and policy. <b>Expected</b>: each held-out labeler's exact probability of
preferring the policy's response to each of the baseline's responses to the same prompt under the
labeler's own noise model (ties half), averaged; the headline figure. <b>Sampled</b>: the labelers'
noisy verdicts, each response against the baseline's response of the same index (what people would
give); it estimates the same quantity with more noise.</p>
<h2>Win rate against {html.escape(report.baseline)}</h2>
{_img(pngs["win_rates.png"], "win rates")}
<table><tr><th>policy</th><th>expected win rate [95 % CI]</th><th>sampled win rate [95 % CI]</th>
<th>Likert 1-7</th><th>constraints satisfied</th>
<th>fails instruction</th><th>RM score</th><th>KL to SFT (nats)</th><th>length (tokens)</th><th>EOS rate</th>
<th>pretrain ppl</th></tr>{rows}</table>
{best_of_note}
{_curve_html(curve, pngs["win_vs_episodes.png"])}
<h2>Alignment tax</h2>
{_img(pngs["alignment_tax.png"], "alignment tax")}
<h2>Training curves</h2>
{_img(pngs["training_curves.png"], "training curves")}
{extra_html}
<h2>Samples</h2>
<table><tr><th>prompt</th>{"".join(f"<th>{html.escape(n)}</th>" for n in show)}<th>held-out labelers</th></tr>
{"".join(sample_rows)}</table>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    (out / "eval.json").write_text(json.dumps(report.to_json(), indent=1))
    if curve:
        save_curve(curve, report, out / "curve.json")
    return path


def _policy_rows(report: EvalReport) -> str:
    """The headline table's rows, one per policy."""
    return "".join(
        "<tr>"
        + "".join(
            f"<td>{c}</td>"
            for c in (
                f"<b>{html.escape(p.name)}</b>",
                _rate(p.expected_win_rate, p.expected_win_ci),
                _rate(p.win_rate, p.win_ci),
                _fmt(p.likert, ".2f"),
                _fmt(p.flag_rates.get("satisfies_constraint"), ".2f"),
                _fmt(p.flag_rates.get("fails_instruction"), ".2f"),
                _fmt(p.rm_score, ".3f"),
                ("≤ " if p.best_of > 1 and p.kl_to_ref is not None else "") + _fmt(p.kl_to_ref, ".2f"),
                f"{p.length:.1f}",
                f"{p.eos_rate:.2f}",
                _fmt(p.pretrain_ppl, ".2f"),
            )
        )
        + "</tr>"
        for p in report.policies
    )


def _sample_rows(report: EvalReport, show: list[str], n_samples: int) -> list[str]:
    """The first response of each of ``show`` to the first ``n_samples`` prompts, with the held-out
    labelers' verdict on the last of them."""
    rows = []
    challenger = report.by_name(show[-1])
    n_per = report.samples_per_prompt
    for i, prompt in enumerate(report.prompts[:n_samples]):
        cells = [f"<td class=prompt>{html.escape(prompt)}</td>"]
        cells += [f"<td><pre>{html.escape(report.by_name(n).responses[i * n_per])}</pre></td>" for n in show]
        cells.append(f"<td>{html.escape(_verdict(challenger, i * n_per, report.baseline))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return rows


def _best_of_notes(report: EvalReport) -> str:
    return "".join(
        f"<p class=note><b>{html.escape(p.name)}</b> is not a trained policy: each response is the one the "
        f"reward model scores highest among {p.best_of} samples of {html.escape(p.path)}. It shows what the RM "
        f"itself can buy at a KL of at most log {p.best_of} − {p.best_of - 1}/{p.best_of} nats, to set the RL "
        "policies against.</p>"
        for p in report.policies
        if p.best_of > 1
    )


def _facts_html(extra: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in extra.items())
    return "<h2>Run facts</h2><table>" + rows + "</table>"
