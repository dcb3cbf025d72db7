"""LoGraConfig: validation, serialisation, fingerprints; layer selection errors name the pattern."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch
from models import build_model
from torch import nn

import logra
from logra.errors import CaptureError, ConfigError, LograError


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k_in": 0}, "k_in=0"),
        ({"k_out": -3}, "k_out=-3"),
        ({"k_in": 2.5}, "k_in=2.5"),
        ({"k_out": "64"}, "k_out='64'"),
        ({"k_in": True}, "k_in=True"),
        ({"init": "gauss"}, "init='gauss'.*'gaussian'"),
        ({"dtype": "int8"}, "dtype='int8'.*'bfloat16'"),
        ({"loss_reduction": "avg"}, "loss_reduction='avg'"),
        ({"nonfinite": "ignore"}, "nonfinite='ignore'"),
        ({"seed": "0"}, "seed='0'"),
        ({"seed": 1.0}, "seed=1.0"),
        ({"modules": ["*mlp*", 3]}, "modules="),
        ({"modules": 5}, "modules=5"),
        ({"modules": []}, "selects nothing"),
        ({"exclude": [None]}, "exclude="),
        ({"layer_k": {"fc1": 3}}, "'fc1'"),
        ({"layer_k": {"fc1": (0, 4)}}, r"layer_k\['fc1'\]\[0\]=0"),
        ({"layer_k": {3: (1, 1)}}, "entry 3"),
        ({"layer_k": [("fc1", (1, 1))]}, "layer_k="),
        ({"init": "pca"}, "pca_statistics"),
    ],
)
def test_invalid_values_raise_config_error_naming_the_value(kwargs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        logra.LoGraConfig(**kwargs)


def test_strings_become_enums_and_tuples() -> None:
    cfg = logra.LoGraConfig(init="orthogonal", dtype="bfloat16", loss_reduction="mean", modules="*mlp*", exclude=["x"])
    assert cfg.init is logra.ProjectionInit.ORTHOGONAL and cfg.dtype is logra.StorageDtype.BFLOAT16
    assert cfg.loss_reduction is logra.LossReduction.MEAN
    assert cfg.modules == ("*mlp*",) and cfg.exclude == ("x",)
    assert logra.LoGraConfig(layer_k={"a": [1, 2]}).layer_k == {"a": (1, 2)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]
    assert issubclass(ConfigError, LograError) and issubclass(ConfigError, ValueError)


def test_k_for_uses_the_first_matching_override() -> None:
    cfg = logra.LoGraConfig(k_in=8, k_out=6, layer_k={"*.mlp.*": (2, 3), "*mlp*": (4, 5)})
    assert cfg.k_for("h.0.mlp.c_fc") == (2, 3)
    assert cfg.k_for("mlp_head") == (4, 5)
    assert cfg.k_for("attn") == (8, 6)


CONFIGS = [
    logra.LoGraConfig(),
    logra.LoGraConfig(k_in=3, k_out=9, init="rademacher", seed=42, modules=["*mlp*", "lm_head"], exclude=["*.1.*"],
                      layer_k={"*c_fc": (2, 7)}, dtype="float16", include_bias=True, loss_reduction="mean",
                      nonfinite="skip"),
    logra.LoGraConfig(init="pca", pca_statistics="runs/pca"),
]  # fmt: skip


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "everything", "pca"])
def test_to_dict_from_dict_round_trip_through_json(cfg: logra.LoGraConfig) -> None:
    data = json.loads(json.dumps(cfg.to_dict()))
    back = logra.LoGraConfig.from_dict(data)
    assert back == cfg and back.fingerprint() == cfg.fingerprint() and back.to_dict() == cfg.to_dict()


def test_input_projections_are_shared_by_default_and_from_dict_keeps_the_field_default() -> None:
    """No migration default: a dict without the field reads as the field's own default."""
    data = logra.LoGraConfig().to_dict()
    del data["share_input_projection"]
    assert logra.LoGraConfig.from_dict(data).share_input_projection is True
    assert logra.LoGraConfig().share_input_projection is True
    assert logra.LoGraConfig.from_dict({**data, "share_input_projection": False}).share_input_projection is False
    with pytest.raises(ConfigError, match="share_input_projection"):
        logra.LoGraConfig(share_input_projection=1)  # type: ignore[arg-type]


def test_from_dict_refuses_unknown_fields_and_non_dicts() -> None:
    data = logra.LoGraConfig().to_dict()
    with pytest.raises(ConfigError, match="statistic"):
        logra.LoGraConfig.from_dict({**data, "statistic": True})
    with pytest.raises(ConfigError, match="list"):
        logra.LoGraConfig.from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="k_in"):
        logra.LoGraConfig.from_dict({**data, "k_in": "x"})


CHANGES = [
    ("k_in", 3), ("k_out", 3), ("init", "orthogonal"), ("seed", 1), ("modules", ("*",)), ("exclude", ("a",)),
    ("layer_k", {"a": (1, 1)}), ("dtype", "bfloat16"), ("include_bias", True), ("loss_reduction", "mean"),
    ("nonfinite", "skip"), ("share_input_projection", False), ("pca_statistics", "elsewhere"),
    ("optimizer_correction", "0123456789abcdef"),
]  # fmt: skip


def test_every_field_is_covered_by_the_fingerprint_tests() -> None:
    assert {f.name for f in dataclasses.fields(logra.LoGraConfig)} == {name for name, _ in CHANGES}


@pytest.mark.parametrize("name,value", CHANGES, ids=[c[0] for c in CHANGES])
def test_fingerprint_changes_with_every_field(name: str, value) -> None:
    base = logra.LoGraConfig()
    changed = logra.LoGraConfig(**{name: value})
    assert base.fingerprint() == logra.LoGraConfig().fingerprint()
    assert changed.fingerprint() != base.fingerprint()
    storage_only = name in ("dtype", "loss_reduction", "nonfinite")
    assert (changed.projection_fingerprint() == base.projection_fingerprint()) == storage_only


@pytest.mark.subprocess
def test_fingerprint_is_stable_across_processes() -> None:
    code = (
        "import json, sys, logra\n"
        "cfgs = [logra.LoGraConfig.from_dict(d) for d in json.loads(sys.stdin.read())]\n"
        "print(json.dumps([[c.fingerprint(), c.projection_fingerprint()] for c in cfgs]))\n"
    )
    payload = json.dumps([c.to_dict() for c in CONFIGS])
    out = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [[c.fingerprint(), c.projection_fingerprint()] for c in CONFIGS]
    assert len({c.fingerprint() for c in CONFIGS}) == len(CONFIGS)


# ---------------------------------------------------------------- layer selection


class Mixed(nn.Module):
    """A model with unsupported parametrised layers (Embedding, Conv2d) beside Linear ones."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(1, 2, 3)
        self.proj = nn.Linear(4, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.proj(self.embed(ids)))


def test_pattern_matching_nothing_names_the_pattern() -> None:
    with pytest.raises(CaptureError, match=r"'\*attn\*' matches no supported layer.*fc1, fc2, head"):
        logra.GradientLogger(build_model("mlp"), logra.LoGraConfig(modules=["fc*", "*attn*"]))


@pytest.mark.parametrize("pattern,kind", [("embed", "Embedding"), ("conv", "Conv2d"), ("e*", "Embedding")])
def test_pattern_matching_only_unsupported_layers_names_the_pattern(pattern: str, kind: str) -> None:
    model = Mixed()
    with pytest.raises(CaptureError, match=rf"{re.escape(repr(pattern))}.*cannot log.*{kind}"):
        logra.GradientLogger(model, logra.LoGraConfig(modules=[pattern]))
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_selection_order_exclude_and_nothing_left() -> None:
    model = Mixed()
    with logra.GradientLogger(model, logra.LoGraConfig(modules=["out", "proj", "p*"])) as logger:
        assert [layer.name for layer in logger.layers] == ["proj", "out"]  # model order, no repeats
    with logra.GradientLogger(model, logra.LoGraConfig(exclude=["out"])) as logger:
        assert [layer.name for layer in logger.layers] == ["proj"]
    with pytest.raises(CaptureError, match="leave none"):
        logra.GradientLogger(model, logra.LoGraConfig(exclude=["*"]))
    with pytest.raises(CaptureError, match="no layer to log"):
        logra.GradientLogger(nn.Sequential(nn.Conv2d(1, 1, 1)), logra.LoGraConfig())
    with pytest.raises(ConfigError, match="LoGraConfig"):
        logra.GradientLogger(model, {"k_in": 4})  # type: ignore[arg-type]
