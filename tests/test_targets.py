"""Target strings in the tvmc form, tags and the host default; unknown names are errors."""

from __future__ import annotations

import pytest

from dlrmc.targets import TargetError, parse_target


@pytest.mark.parametrize("text,kind,attrs", [
    ("llvm -mcpu=skylake-avx512 -mattr=+avx512f,+avx512bw -num-cores=2", "llvm",
     {"mcpu": "skylake-avx512", "mattr": ["+avx512f", "+avx512bw"], "num-cores": 2}),
    ("llvm -mcpu=haswell", "llvm", {"mcpu": "haswell"}),
    ("llvm -mtriple=aarch64-linux-gnu -mcpu=neoverse-n1 -mattr=+neon", "llvm",
     {"mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1", "mattr": ["+neon"]}),
    ("llvm -mtriple=aarch64-linux-gnu -mcpu=neoverse-v1 -mattr=+neon,+sve", "llvm",
     {"mcpu": "neoverse-v1", "mattr": ["+neon", "+sve"]}),
    ("cuda -arch=sm_90", "cuda", {"arch": "sm_90", "max_shared_memory_per_block": 49152,
                                  "max_threads_per_block": 1024}),
    ("cuda -arch=sm_80 -max_shared_memory_per_block=1000", "cuda",
     {"arch": "sm_80", "max_shared_memory_per_block": 1000, "registers_per_block": 65536}),
    ("nvidia/nvidia-h100", "cuda", {"arch": "sm_90a"}),
    ("llvm", "llvm", {}),
    ('{"kind": "llvm", "mcpu": "znver4", "mattr": ["+avx512f"], "num-cores": 2}', "llvm",
     {"mcpu": "znver4", "mattr": ["+avx512f"], "num-cores": 2}),
    ('{"kind": "cuda", "arch": "sm_90"}', "cuda", {"arch": "sm_90", "registers_per_block": 65536}),
])
def test_valid_targets(text, kind, attrs):
    t = parse_target(text)
    assert t.kind.name == kind
    for k, v in attrs.items():
        got = t.attrs[k]
        assert (list(got) if isinstance(v, list) else got) == v


def test_host_default_names_this_cpu():
    from tvm.target import codegen

    for text in (None, "", "host"):
        t = parse_target(text)
        assert t.kind.name == "llvm" and t.attrs["mcpu"] == codegen.llvm_get_system_cpu()


@pytest.mark.parametrize("text,message", [
    ("llvm -mcpu=skylake-avx513", r"unknown -mcpu 'skylake-avx513'.*did you mean skylake-avx512"),
    ("llvm -mattr=+avx513f", r"unknown -mattr feature '\+avx513f'.*avx512f"),
    ("llvm -mattr=avx512f", r"unknown -mattr feature 'avx512f'.*written \+name"),
    ("llvm -mtriple=aarch64-linux-gnu -mcpu=skylake", r"unknown -mcpu 'skylake' for aarch64"),
    ("llvm -mtriple=foo64-linux-gnu", r"unknown -mtriple architecture 'foo64'"),
    ("llvm -frobnicate=1", r"unknown option -frobnicate for target kind llvm; valid: .*-mcpu"),
    ("llvm -num-cores=two", r"-num-cores takes an integer"),
    ("lvm -mcpu=haswell", r"unknown target kind 'lvm' \(did you mean llvm\?\)"),
    ("opencl", r"unknown target kind 'opencl'"),
    ("cuda -arch=90", r"-arch must look like sm_80"),
    ("nvidia/nvidia-h1000", r"unknown target tag 'nvidia/nvidia-h1000'.*nvidia/nvidia-h100"),
    ("llvm mcpu=haswell", r"options are -key=value"),
    ('{"kind": "llvm", "mcpu": "skylake-avx513"}', r"unknown -mcpu 'skylake-avx513'"),
    ('{"kind": "llvm", "host": {"kind": "llvm"}}', r"JSON target key 'host'"),
    ('{"mcpu": "znver4"}', r'a JSON target must be an object with a "kind"'),
    ('{"kind": llvm}', r"cannot parse target .* as JSON"),
])
def test_invalid_targets_are_named(text, message):
    with pytest.raises(TargetError, match=message):
        parse_target(text)


@pytest.mark.parametrize("text,lanes,mr,nr", [
    ("llvm -mcpu=skylake-avx512", 16, 6, 32),
    ("llvm -mcpu=haswell", 8, 6, 16),
    ("llvm -mcpu=skylake-avx512 -mattr=-avx512f", 8, 6, 16),
    ("llvm -mtriple=aarch64-linux-gnu -mcpu=neoverse-n1 -mattr=+neon", 4, 6, 16),
    ("llvm", 4, 4, 8),
])
def test_knobs_follow_the_target_not_the_host(text, lanes, mr, nr):
    from dlrmc.targets.knobs import cpu_knobs

    k = cpu_knobs(parse_target(text))
    assert (k.lanes, k.mr, k.nr) == (lanes, mr, nr)
