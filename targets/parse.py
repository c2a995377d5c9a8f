"""Target strings in the familiar TVM/tvmc form, which TVM 0.27's ``Target`` no longer accepts.

Accepted: ``llvm -mcpu=skylake-avx512 -mattr=+avx512f,+avx512bw -num-cores=2``,
``llvm -mtriple=aarch64-linux-gnu -mcpu=neoverse-n1 -mattr=+neon``, ``cuda -arch=sm_90``, a tag
name such as ``nvidia/nvidia-h100``, ``host`` (or nothing) for this machine's CPU, and TVM
0.27's own JSON form (``{"kind": "llvm", "mcpu": "znver4", "mattr": ["+avx512f"]}``).
Every key, CPU name and feature is checked against what TVM and its LLVM know, because TVM
itself silently accepts an unknown ``-mcpu``.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import shlex

import tvm
from tvm.target import Target, TargetKind
from tvm.target import codegen

KINDS = ("llvm", "cuda")
HOST_ALIASES = ("", "host", "native")


class TargetError(ValueError):
    """A target string that does not name a valid target."""


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def host_target_string() -> str:
    """The target string for the CPU this process runs on."""
    return f"llvm -mcpu={codegen.llvm_get_system_cpu()} -num-cores={os.cpu_count() or 1}"


def _convert(kind: str, key: str, value: str | None, typ: str):
    if typ.startswith("Array"):
        if not value:
            raise TargetError(f"-{key} needs a comma-separated value")
        return [v for v in value.split(",") if v]
    if typ == "bool":
        if value in (None, "true", "1"):
            return True
        if value in ("false", "0"):
            return False
        raise TargetError(f"-{key} takes true or false, got {value!r}")
    if value is None:
        raise TargetError(f"-{key} needs a value (-{key}=...)")
    if typ == "int":
        try:
            return int(value)
        except ValueError:
            raise TargetError(f"-{key} takes an integer, got {value!r}") from None
    return value


@functools.lru_cache(maxsize=None)
def _known_features(triple: str) -> frozenset[str]:
    """Every feature some CPU of this triple's LLVM backend has."""
    probe = Target({"kind": "llvm", "mtriple": triple})
    feats: set[str] = set()
    for cpu in codegen.llvm_get_cpu_archlist(probe):
        feats |= set(codegen.llvm_get_cpu_features(
            Target({"kind": "llvm", "mtriple": triple, "mcpu": cpu})))
    return frozenset(feats)


def _check_llvm(opts: dict) -> None:
    triple = opts.get("mtriple") or codegen.llvm_get_system_triple()
    arch = triple.split("-")[0]
    backends = list(codegen.llvm_get_targets())
    if arch not in backends:
        raise TargetError(f"unknown -mtriple architecture {arch!r}{_suggest(arch, backends)}; "
                          f"valid: {', '.join(backends)}")
    if "mcpu" in opts and not codegen.llvm_is_valid_cpu(opts["mcpu"], triple):
        cpus = list(codegen.llvm_get_cpu_archlist(Target({"kind": "llvm", "mtriple": triple})))
        raise TargetError(f"unknown -mcpu {opts['mcpu']!r} for {arch}"
                          f"{_suggest(opts['mcpu'], cpus)}; valid: {', '.join(cpus)}")
    features = _known_features(triple)
    for feat in opts.get("mattr", []):
        name = feat[1:]
        if feat[:1] not in "+-" or not feat[1:] or name not in features:
            raise TargetError(
                f"unknown -mattr feature {feat!r} for {arch}{_suggest(name, features)} (features "
                f"are written +name or -name); valid names: {', '.join(sorted(features))}")


# What every CUDA arch since sm_50 allows (a block's threads, registers and static shared
# memory), as TVM's nvidia/* tags state it; dlight reads these.
CUDA_LIMITS = {"max_threads_per_block": 1024, "registers_per_block": 65536,
               "max_shared_memory_per_block": 49152}


def _check_cuda(opts: dict) -> None:
    if "arch" in opts and not re.fullmatch(r"sm_\d{2,3}[af]?", opts["arch"]):
        raise TargetError(f"-arch must look like sm_80 or sm_90a, got {opts['arch']!r}")


def _from_json(text: str) -> str:
    """TVM 0.27's own JSON form (``{"kind": "llvm", "mcpu": "znver4"}``) as a target string,
    so it gets the same checks."""
    import json

    try:
        spec = json.loads(text)
    except ValueError as e:
        raise TargetError(f"cannot parse target {text!r} as JSON: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        raise TargetError(f"a JSON target must be an object with a \"kind\", got {text!r}")
    words = [spec.pop("kind")]
    for key, value in spec.items():
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        elif not isinstance(value, (str, int)):
            raise TargetError(f"JSON target key {key!r}: {json.dumps(value)} is not a string, "
                              "number, boolean or list of strings")
        words.append(shlex.quote(f"-{key}={value}"))
    return " ".join(words)


def parse_target(text: str | None) -> Target:
    """Parse a target string (see the module docstring) into a validated ``tvm.target.Target``."""
    text = (text or "").strip()
    if text.startswith("{"):
        text = _from_json(text)
    if text in HOST_ALIASES:
        text = host_target_string()
    if "/" in text and " " not in text:
        tags = list(tvm.target.list_tags())
        if text not in tags:
            raise TargetError(f"unknown target tag {text!r}{_suggest(text, tags)}; valid tags: "
                              f"{', '.join(sorted(tags))}")
        return Target(text)
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise TargetError(f"cannot parse target {text!r}: {e}") from None
    kind, rest = words[0], words[1:]
    if kind not in KINDS:
        raise TargetError(f"unknown target kind {kind!r}{_suggest(kind, KINDS)}; dlrmc builds for "
                          f"{', '.join(KINDS)} (or a tag such as nvidia/nvidia-h100)")
    schema = dict(TargetKind.options_from_name(kind))
    settable = {k: v for k, v in schema.items() if k not in ("kind", "tag", "host", "from_device",
                                                               "target_device_type")}
    opts: dict = {}
    for word in rest:
        m = re.fullmatch(r"--?([A-Za-z][\w-]*)(?:=(.*))?", word)
        if not m:
            raise TargetError(f"cannot read {word!r} in target {text!r}: options are -key=value")
        key, value = m.group(1), m.group(2)
        if key not in settable:
            raise TargetError(f"unknown option -{key} for target kind {kind}"
                              f"{_suggest(key, settable)}; valid: "
                              f"{', '.join('-' + k for k in settable)}")
        opts[key] = _convert(kind, key, value, str(settable[key]))
    if kind == "llvm":
        _check_llvm(opts)
    else:
        _check_cuda(opts)
        opts = {**CUDA_LIMITS, **opts}
        opts.setdefault("arch", "sm_50")
        opts["host"] = {"kind": "llvm"}
    try:
        return Target({"kind": kind, **opts})
    except Exception as e:  # noqa: BLE001 - TVM's own rejection, reworded
        raise TargetError(f"TVM rejects target {text!r}: {e}") from None


def target_text(target: Target) -> str:
    """The target in the familiar string form, for people (``llvm -mcpu=znver4 -num-cores=2``)."""
    words = [target.kind.name]
    for key in ("mtriple", "mcpu", "mattr", "arch", "num-cores"):
        value = target.attrs.get(key)
        if not isinstance(value, (str, int)) and value is not None:
            value = ",".join(str(v) for v in value)     # mattr: an array
        if value not in (None, ""):
            words.append(f"-{key}={value}")
    return " ".join(words)


def resolved(target: Target) -> dict:
    """The target's full attribute set, JSON-ready (for the manifest)."""
    import json

    return json.loads(str(target))
