"""Metrics go to metrics.jsonl always, and to TensorBoard and W&B where report_to asks."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest

from tether.cli import main
from tether.config import PPOConfig, RMConfig, SFTConfig
from tether.metrics import MetricsLogger, read_metrics

RECORDS = [{"step": 1, "loss": 2.5, "lr": 1e-3, "kl_estimator": "k3"}, {"step": 2, "loss": 2.0, "lr": 1e-3}]


@pytest.mark.parametrize(
    ("argv", "module", "command"),
    [
        (["--report-to", "jsonl,wandb"], "wandb", "pip install 'tether[wandb]'"),
        (["--report-to", "tensorboard"], "tensorboard", "pip install tensorboard"),
        (["--tensorboard", "true"], "tensorboard", "pip install tensorboard"),  # the older spelling
    ],
)
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo", "run"])
def test_a_missing_writer_is_an_exit_2_naming_the_pip_command_before_anything_loads(
    tmp_path, capsys, monkeypatch, argv, module, command, stage
):
    import tether.models.loading as loading

    monkeypatch.setitem(sys.modules, module, None)  # not installed
    monkeypatch.setattr(loading, "load_causal_lm", lambda *a, **k: pytest.fail("a model loaded first"))
    if stage == "run":
        argv = [f"--{s}.{a[2:]}" if a.startswith("--") else a for s in ("sft", "rm", "ppo") for a in argv[:2]]
    out = tmp_path / "out"
    assert main([stage, "--preset", "tiny", "--out-dir", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert command in err and "report_to" in err, err
    assert not out.exists()


def test_tensorboard_gets_the_jsonl_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for cfg, run in [(SFTConfig(report_to=("jsonl", "tensorboard")), "a"), (RMConfig(tensorboard=True), "b")]:
        logger = MetricsLogger(tmp_path / run / "metrics.jsonl", cfg)
        for record in RECORDS:
            logger.log(record)
        logger.close()
        assert read_metrics(tmp_path / run / "metrics.jsonl") == RECORDS  # jsonl always
        events = EventAccumulator(str(tmp_path / run / "tensorboard"))
        events.Reload()
        assert sorted(events.Tags()["scalars"]) == ["loss", "lr"]
        assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 2.0)]


class FakeWandb(types.ModuleType):
    """A stand-in ``wandb`` module that records what tether asks of it."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, data, step=None):
        self.logged.append((step, data))

    def finish(self):
        self.finished += 1


@pytest.mark.parametrize("key", ["none", "env", "netrc"])
def test_wandb_logs_the_jsonl_scalars_offline_without_a_key(tmp_path, monkeypatch, key):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc unless the case writes one
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    if key == "env":
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    if key == "netrc":
        (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
        (tmp_path / ".netrc").chmod(0o600)
    cfg = PPOConfig(report_to=("wandb",))
    logger = MetricsLogger(tmp_path / "run" / "metrics.jsonl", cfg)
    for record in RECORDS:
        logger.log(record)
    logger.close()
    (init,) = fake.inits
    assert init["mode"] == ("offline" if key == "none" else None)
    assert init["dir"] == str(tmp_path / "run") and init["config"]["kl_coef"] == cfg.kl_coef
    assert fake.logged == [(1, {"loss": 2.5, "lr": 1e-3}), (2, {"loss": 2.0, "lr": 1e-3})]
    assert fake.finished == 1
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == RECORDS  # jsonl too
    MetricsLogger(tmp_path / "run" / "metrics.jsonl", cfg).close()  # a resumed stage: the same W&B run
    assert fake.inits[1]["id"] == init["id"] and fake.inits[1]["resume"] == "allow"
