"""Optimizer parameter groups: weight decay on linear-layer matrices only."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch.nn as nn

from ds_trainer.engine import parameter_groups
from ds_trainer.model import GPT, GPTConfig

TINY = GPTConfig.from_preset("gpt2-tiny")


def group_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """Names of the parameters in the decay and no-decay groups (a tied weight under its first name)."""
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = parameter_groups(model)
    return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}


def linear_weights(model: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_group_options():
    decay, no_decay = parameter_groups(GPT(TINY))
    assert "weight_decay" not in decay  # takes the optimizer's weight decay
    assert no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("tie", [True, False])
def test_every_parameter_exactly_once(tie):
    model = GPT(replace(TINY, tie_embeddings=tie))
    decay, no_decay = parameter_groups(model)
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model.num_parameters()


def test_tied_model_groups():
    model = GPT(TINY)
    decay, no_decay = group_names(model)
    assert decay == linear_weights(model) - {"lm_head.weight"}
    assert len(decay) == 4 * TINY.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert {
        "wte.weight",
        "wpe.weight",
        "ln_f.weight",
        "ln_f.bias",
        "h.0.ln_1.weight",
        "h.0.attn.c_attn.bias",
    } <= no_decay
    assert all(n.endswith("bias") or ".ln_" in f".{n}" or n.startswith("w") for n in no_decay)


def test_untied_head_weight_decays():
    model = GPT(replace(TINY, tie_embeddings=False))
    decay, no_decay = group_names(model)
    assert "lm_head.weight" in decay
    assert decay == linear_weights(model)
    assert "wte.weight" in no_decay


def test_frozen_parameters_are_left_out():
    model = GPT(TINY)
    model.wpe.weight.requires_grad_(False)
    decay, no_decay = parameter_groups(model)
    assert all(p is not model.wpe.weight for p in decay["params"] + no_decay["params"])
