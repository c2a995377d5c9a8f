"""Architectures from the reference's flags and presets."""

from __future__ import annotations

import argparse

import pytest

from dlrmc.frontend.arch import PRESETS, Arch, add_arch_args, arch_from_fields, given_fields
from dlrmc.frontend.model import DLRM


def _args(*argv):
    p = argparse.ArgumentParser()
    add_arch_args(p)
    return p.parse_args(list(argv))


def test_kaggle_preset_is_the_criteo_kaggle_model():
    k = PRESETS["kaggle"]
    assert k.num_tables == 26 and k.sparse_feature_size == 16 and k.num_dense == 13
    assert sum(k.embedding_sizes) == 33_762_577
    assert k.mlp_bot == (13, 512, 256, 64, 16)
    assert k.ln_top == (27 * 26 // 2 + 16, 512, 256, 1) == (367, 512, 256, 1)


def test_reference_flags_and_derived_top_width():
    a = arch_from_fields(given_fields(_args(
        "--arch-sparse-feature-size", "2", "--arch-embedding-size", "4-3-2",
        "--arch-mlp-bot", "4-3-2", "--arch-mlp-top", "4-2-1")))
    assert a.ln_top == (3 * 4 // 2 + 2, 4, 2, 1)
    a = arch_from_fields(given_fields(_args("--preset", "tiny", "--arch-interaction-op", "cat")),
                         PRESETS["tiny"])
    assert a.ln_top[0] == (4 + 1) * 8
    a = arch_from_fields(given_fields(_args("--arch-interaction-itself")), PRESETS["tiny"])
    assert a.ln_top[0] == 5 * 6 // 2 + 8


def test_model_layer_shapes_follow_the_arch():
    a = Arch(3, (5, 6), (4, 7, 3), (9, 1), interaction_op="cat")
    sd = DLRM(a).state_dict()
    assert tuple(sd["top_l.0.weight"].shape) == (9, 9) and tuple(sd["bot_l.2.weight"].shape) == (3, 7)
    assert tuple(sd["emb_l.1.weight"].shape) == (6, 3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(interaction_op="sum"), "interaction op 'sum'"),
    (dict(pooling="median"), "pooling 'median'"),
    (dict(pooling="max", weighted_pooling="learned"), "weighted pooling needs pooling 'sum'"),
    (dict(embedding_sizes=(3, 0)), "embedding sizes"),
    (dict(mlp_top=(4, 2)), "top MLP must end in 1"),
    (dict(sparse_feature_size=5), "does not match the last dim"),
])
def test_invalid_architectures(kwargs, message):
    base = dict(sparse_feature_size=4, embedding_sizes=(3, 4), mlp_bot=(2, 4), mlp_top=(3, 1))
    with pytest.raises(ValueError, match=message):
        Arch(**{**base, **kwargs})
