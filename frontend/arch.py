"""DLRM architectures: the reference's flags, the named presets, and inference from weights.

An ``Arch`` holds exactly what facebookresearch/dlrm's command line sets:
``--arch-sparse-feature-size``, ``--arch-embedding-size`` (rows per table),
``--arch-mlp-bot`` (with the dense input width), ``--arch-mlp-top`` (without its input
width, which is derived from the interaction as the reference does),
``--arch-interaction-op`` and ``--arch-interaction-itself``; plus the pooling mode and the
reference's ``--weighted-pooling``; TorchRec's DLRM_DCN cross layers (``interaction_op="dcn"``,
``dcn_layers`` of rank ``dcn_low_rank``: x_{l+1} = x0 * (W_l (V_l x_l) + b_l) + x_l on the
concatenated features); and whether the top MLP ends in the reference's sigmoid
(``output="probability"``) or gives TorchRec's logits (``"logit"``).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from .ops import POOLING_MODES, num_pairs

# dcn: TorchRec's DLRM_DCN low-rank cross layers; projection: DLRM_Projection's two branches
INTERACTIONS = ("dot", "cat", "dcn", "projection")
WEIGHTED_POOLING = (None, "fixed", "learned")
OUTPUTS = ("probability", "logit")   # the reference's sigmoid at the end, or TorchRec's none

# Rows per categorical feature of the Criteo Kaggle set (the reference's processed counts).
KAGGLE_TABLES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
    14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
# Criteo Terabyte counts (day_fea_count of the reference's preprocessing).
TERABYTE_COUNTS = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
)
# MLPerf Inference DLRM-v2 (mlcommons/inference recommendation/dlrm_v2): rows per table and
# the multi-hot bag size of each table's feature (214 indices a sample).
DLRM_V2_TABLES = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10, 2209,
    11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)
DLRM_V2_BAGS = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)


@dataclass(frozen=True)
class Arch:
    """One DLRM architecture, with the reference's flag semantics."""

    sparse_feature_size: int
    embedding_sizes: tuple[int, ...]
    mlp_bot: tuple[int, ...]
    mlp_top: tuple[int, ...]
    interaction_op: str = "dot"
    interaction_itself: bool = False
    pooling: str = "sum"
    weighted_pooling: str | None = None
    output: str = "probability"
    dcn_layers: int = 0       # interaction "dcn": cross layers, each of this low rank
    dcn_low_rank: int = 0
    proj_branch1: tuple[int, ...] = ()   # interaction "projection": its two MLPs' widths
    proj_branch2: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "embedding_sizes", tuple(int(v) for v in self.embedding_sizes))
        object.__setattr__(self, "mlp_bot", tuple(int(v) for v in self.mlp_bot))
        object.__setattr__(self, "mlp_top", tuple(int(v) for v in self.mlp_top))
        for name in ("proj_branch1", "proj_branch2"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        problems = []
        if self.interaction_op not in INTERACTIONS:
            problems.append(f"interaction op {self.interaction_op!r} is not one of {INTERACTIONS}")
        if self.pooling not in POOLING_MODES:
            problems.append(f"pooling {self.pooling!r} is not one of {POOLING_MODES}")
        if self.weighted_pooling not in WEIGHTED_POOLING:
            problems.append(f"weighted pooling {self.weighted_pooling!r} is not one of "
                            f"{WEIGHTED_POOLING}")
        if self.interaction_op == "dcn" and (self.dcn_layers < 1 or self.dcn_low_rank < 1):
            problems.append(f"the dcn interaction needs --dcn-layers and --dcn-low-rank >= 1, "
                            f"got {self.dcn_layers} and {self.dcn_low_rank}")
        if self.interaction_op != "dcn" and (self.dcn_layers or self.dcn_low_rank):
            problems.append("--dcn-layers and --dcn-low-rank need --arch-interaction-op dcn")
        branches = (self.proj_branch1, self.proj_branch2)
        if self.interaction_op == "projection":
            if not all(branches) or any(min(b) < 1 or b[-1] % self.sparse_feature_size
                                        for b in branches):
                problems.append(f"the projection interaction needs --projection-branch1 and "
                                f"--projection-branch2, each ending in a multiple of the "
                                f"sparse feature size {self.sparse_feature_size}, got "
                                f"{list(self.proj_branch1)} and {list(self.proj_branch2)}")
        elif any(branches):
            problems.append("--projection-branch1/2 need --arch-interaction-op projection")
        if self.output not in OUTPUTS:
            problems.append(f"output {self.output!r} is not one of {OUTPUTS}")
        if self.weighted_pooling and self.pooling != "sum":
            problems.append("weighted pooling needs pooling 'sum' (as in torch.nn.EmbeddingBag)")
        if not self.embedding_sizes or min(self.embedding_sizes) < 1:
            problems.append(f"embedding sizes must be >= 1 rows per table, got "
                            f"{list(self.embedding_sizes)}")
        if len(self.mlp_bot) < 2 or min(self.mlp_bot) < 1:
            problems.append(f"bottom MLP needs an input and at least one layer, got "
                            f"{_dashed(self.mlp_bot)}")
        if not self.mlp_top or min(self.mlp_top) < 1 or self.mlp_top[-1] != 1:
            problems.append(f"top MLP must end in 1 output, got {_dashed(self.mlp_top)}")
        if self.sparse_feature_size < 1:
            problems.append(f"sparse feature size must be >= 1, got {self.sparse_feature_size}")
        elif len(self.mlp_bot) >= 2 and self.mlp_bot[-1] != self.sparse_feature_size:
            problems.append(
                f"arch-sparse-feature-size {self.sparse_feature_size} does not match the last "
                f"dim of the bottom MLP {self.mlp_bot[-1]}")
        if problems:
            raise ValueError("invalid DLRM architecture: " + "; ".join(problems))

    @property
    def num_dense(self) -> int:
        return self.mlp_bot[0]

    @property
    def num_tables(self) -> int:
        return len(self.embedding_sizes)

    @property
    def features_width(self) -> int:
        """The width of the concatenated features, the bottom MLP's output first."""
        return (self.num_tables + 1) * self.mlp_bot[-1]

    @property
    def top_input_width(self) -> int:
        """The top MLP's input width, derived from the interaction as the reference does
        (projection: the dense features and the F1 x F2 products of the two branches)."""
        if self.interaction_op == "projection":
            dim = self.sparse_feature_size
            return dim + (self.proj_branch1[-1] // dim) * (self.proj_branch2[-1] // dim)
        return top_input_width(self.num_tables, self.mlp_bot[-1], self.interaction_op,
                               self.interaction_itself)

    @property
    def ln_top(self) -> tuple[int, ...]:
        return (self.top_input_width,) + self.mlp_top

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight of the model by its state_dict name (``dlrmc.frontend.model``'s keys),
        with its float32 shape."""
        shapes = {f"emb_l.{k}.weight": (n, self.sparse_feature_size)
                  for k, n in enumerate(self.embedding_sizes)}
        if self.weighted_pooling == "learned":
            shapes.update({f"v_W_l.{k}": (n,) for k, n in enumerate(self.embedding_sizes)})
        width, rank = self.top_input_width, self.dcn_low_rank
        for layer in range(self.dcn_layers):
            shapes[f"cross_l.W_kernels.{layer}"] = (width, rank)
            shapes[f"cross_l.V_kernels.{layer}"] = (rank, width)
            shapes[f"cross_l.bias.{layer}"] = (width,)
        for prefix, widths in (("bot_l", self.mlp_bot), ("top_l", self.ln_top),
                               ("proj_l1", self.proj_widths(1)), ("proj_l2", self.proj_widths(2))):
            for i in range(len(widths) - 1):
                shapes[f"{prefix}.{2 * i}.weight"] = (widths[i + 1], widths[i])
                shapes[f"{prefix}.{2 * i}.bias"] = (widths[i + 1],)
        return shapes

    def proj_widths(self, branch: int) -> tuple[int, ...]:
        """Projection branch 1 or 2 with its input width: [in, out1, ...] (() if none)."""
        widths = self.proj_branch1 if branch == 1 else self.proj_branch2
        return (self.features_width,) + widths if widths else ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Arch":
        return cls(**d)

    def describe(self) -> str:
        return (f"{self.num_tables} tables ({sum(self.embedding_sizes):,} rows, dim "
                f"{self.sparse_feature_size}), bot {_dashed(self.mlp_bot)}, top "
                f"{_dashed(self.ln_top)}, interaction {self.interaction_op}"
                f"{' (itself)' if self.interaction_itself else ''}"
                f"{f' ({self.dcn_layers} layers of rank {self.dcn_low_rank})' if self.dcn_layers else ''}"
                f"{f' (branches {_dashed(self.proj_branch1)} and {_dashed(self.proj_branch2)})' if self.proj_branch1 else ''}"
                f", pooling {self.pooling}"
                f"{', weighted ' + self.weighted_pooling if self.weighted_pooling else ''}")


def _dashed(values) -> str:
    return "-".join(map(str, values))


def top_input_width(num_tables: int, dense_out: int, op: str, itself: bool) -> int:
    num_fea = num_tables + 1
    if op == "dot":
        return num_pairs(num_fea, itself) + dense_out
    return num_fea * dense_out     # cat, and dcn (whose cross layers keep the width)


PRESETS = {
    "kaggle": Arch(16, KAGGLE_TABLES, (13, 512, 256, 64, 16), (512, 256, 1)),
    # The reference's dlrm_s_criteo_terabyte.sh: --max-ind-range=10000000.
    "terabyte": Arch(64, tuple(min(c, 10_000_000) for c in TERABYTE_COUNTS),
                     (13, 512, 256, 64), (512, 512, 256, 1)),
    # MLPerf training/inference DLRM v1 (Terabyte, --max-ind-range=40000000).
    "mlperf-v1": Arch(128, tuple(min(c, 40_000_000) for c in TERABYTE_COUNTS),
                      (13, 512, 256, 128), (1024, 1024, 512, 256, 1)),
    "tiny": Arch(8, (100, 50, 20, 10), (13, 32, 8), (32, 1)),
    # MLPerf DLRM-v2: TorchRec's DLRM_DCN, logits out (about 125 GB of fp32 tables), and the
    # same structure with every table capped at 200,000 rows, for benchmarks and tests.
    "dlrm-v2": Arch(128, DLRM_V2_TABLES, (13, 512, 256, 128), (1024, 1024, 512, 256, 1),
                    interaction_op="dcn", dcn_layers=3, dcn_low_rank=512, output="logit"),
    "dlrm-v2-small": Arch(128, tuple(min(n, 200_000) for n in DLRM_V2_TABLES),
                          (13, 512, 256, 128), (1024, 1024, 512, 256, 1), interaction_op="dcn",
                          dcn_layers=3, dcn_low_rank=512, output="logit"),
}
# The bag sizes a preset's features have (one-hot where a preset is not listed).
PRESET_BAGS = {"dlrm-v2": DLRM_V2_BAGS, "dlrm-v2-small": DLRM_V2_BAGS}


def parse_dashed(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).split("-"))
    except ValueError:
        raise ValueError(f"{flag} must be dash-separated integers like 13-512-256, got {text!r}")
    return values


def add_arch_args(parser: argparse.ArgumentParser) -> None:
    """The reference's architecture flags plus --preset; all default to 'not given'."""
    g = parser.add_argument_group("model architecture (facebookresearch/dlrm flags)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="a named architecture")
    g.add_argument("--arch-sparse-feature-size", type=int)
    g.add_argument("--arch-embedding-size", help="rows per table, dash-separated")
    g.add_argument("--arch-mlp-bot", help="bottom MLP widths with the dense input, e.g. 13-512-256-64-16")
    g.add_argument("--arch-mlp-top", help="top MLP widths without its input, e.g. 512-256-1")
    g.add_argument("--arch-interaction-op", choices=INTERACTIONS)
    g.add_argument("--arch-interaction-itself", action="store_true", default=None)
    g.add_argument("--pooling", choices=POOLING_MODES)
    g.add_argument("--weighted-pooling", choices=["fixed", "learned"])
    g.add_argument("--dcn-layers", type=int, help="cross layers (--arch-interaction-op dcn)")
    g.add_argument("--dcn-low-rank", type=int, help="their rank (--arch-interaction-op dcn)")
    g.add_argument("--projection-branch1", help="widths of the first projection MLP, e.g. "
                   "512-128 (--arch-interaction-op projection; the last a multiple of the "
                   "sparse feature size)")
    g.add_argument("--projection-branch2", help="widths of the second projection MLP")


_FLAG_FIELDS = {
    "arch_sparse_feature_size": ("sparse_feature_size", int),
    "arch_embedding_size": ("embedding_sizes", lambda v: parse_dashed(v, "--arch-embedding-size")),
    "arch_mlp_bot": ("mlp_bot", lambda v: parse_dashed(v, "--arch-mlp-bot")),
    "arch_mlp_top": ("mlp_top", lambda v: parse_dashed(v, "--arch-mlp-top")),
    "arch_interaction_op": ("interaction_op", str),
    "arch_interaction_itself": ("interaction_itself", bool),
    "pooling": ("pooling", str),
    "weighted_pooling": ("weighted_pooling", str),
    "dcn_layers": ("dcn_layers", int),
    "dcn_low_rank": ("dcn_low_rank", int),
    "projection_branch1": ("proj_branch1", lambda v: parse_dashed(v, "--projection-branch1")),
    "projection_branch2": ("proj_branch2", lambda v: parse_dashed(v, "--projection-branch2")),
}


def flag_name(field: str) -> str:
    """The command-line flag that sets an Arch field."""
    for flag, (f, _) in _FLAG_FIELDS.items():
        if f == field:
            return "--" + flag.replace("_", "-")
    return field


def given_fields(args: argparse.Namespace) -> dict:
    """The Arch fields the user set on the command line (preset excluded)."""
    out = {}
    for flag, (field, conv) in _FLAG_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out[field] = conv(value)
    return out


def arch_from_fields(fields: dict, base: Arch | None = None) -> Arch:
    """Complete ``fields`` from ``base`` (a preset) and validate."""
    if base is not None:
        return dataclasses.replace(base, **fields)
    missing = [f for f in ("sparse_feature_size", "embedding_sizes", "mlp_bot", "mlp_top")
               if f not in fields]
    if missing:
        raise ValueError("incomplete architecture: give --preset or --load-model, or all of "
                         + ", ".join(flag_name(m) for m in missing))
    return Arch(**fields)
