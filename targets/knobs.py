"""Per-target knobs our schedules read: data, not code (one kernel, many targets).

The vector width comes from the target's CPU features as LLVM resolves them (``-mcpu`` plus
``-mattr``), not from the machine we compile on.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.target import Target, codegen


DOT_ISA = {"bf16": "avx512bf16", "int8": "avx512vnni"}   # what a dense kind's dot needs


@dataclass(frozen=True)
class CpuKnobs:
    """Register-blocking parameters for one CPU target."""

    lanes: int           # float32 lanes of one vector register
    mr: int              # rows of a GEMM micro-tile
    nr: int              # columns of a GEMM micro-tile (a multiple of ``lanes``)
    registers: int = 16  # vector registers (what bounds a micro-tile: MR*NR/lanes accumulators)
    parallel_min_macs: int = 1 << 20   # a call's multiply-adds below which it runs on one
    #                                    thread (~5 us on a core: not worth waking the pool)
    parallel_min_bytes: int = 1 << 18  # a dense layer's weight size from which a batch under
    #                                    one micro-tile runs on every core (it streams the
    #                                    weights; Kaggle at B=1: 29.5 -> 23.3 us on 2 cores)
    features: frozenset = frozenset()  # the target's CPU features (LLVM's names)

    def has_dot(self, kind: str, nr: int) -> bool:
        """Whether the dense kernel of ``kind`` may use the target's dot-product instruction
        (AVX-512 BF16 ``vdpbf16ps`` for bf16, AVX-512 VNNI ``vpdpbusd`` for int8)."""
        return DOT_ISA.get(kind) in self.features and nr % 16 == 0

    def mr_choices(self, nr: int) -> list[int]:
        """Micro-tile heights whose accumulators, panel loads and broadcast fit the registers."""
        vecs = max(nr // self.lanes, 1)
        return [m for m in (4, 6, 8, 12) if m * vecs + vecs + 1 <= self.registers]

    def mr_for_batch(self, nr: int, batch: int, mr: int) -> int:
        """A static batch's micro-tile height: ``mr``, unless it leaves rows over and a taller
        tile the registers hold divides the batch (then the shortest such). Left-over rows
        run one at a time; a taller tile loads each weight panel for more rows. On AVX-512
        the buckets 64, 512 and 2048 get MR=8 for the default 6."""
        taller = [m for m in self.mr_choices(nr) if m > mr and batch % m == 0]
        return taller[0] if batch % mr and taller else mr

    @property
    def name(self) -> str:
        return {16: "avx512", 8: "avx2"}.get(self.lanes, "neon" if self.nr == 4 * self.lanes
                                              else "sse")


def cpu_knobs(target: Target) -> CpuKnobs:
    """Knobs for an llvm target: AVX-512 (32 zmm), AVX2 (16 ymm), NEON (32 q), else SSE."""
    feats = frozenset(str(f) for f in codegen.llvm_get_cpu_features(target))
    if "avx512f" in feats:   # 12 acc + 2 panel + 1 broadcast of 32 zmm
        return CpuKnobs(lanes=16, mr=6, nr=32, registers=32, features=feats)
    if "avx2" in feats or "avx" in feats:
        return CpuKnobs(lanes=8, mr=6, nr=16, features=feats)     # 12 + 2 + 1 of 16 ymm
    if "neon" in feats:   # 24 + 4 + 1 of 32 q registers
        return CpuKnobs(lanes=4, mr=6, nr=16, registers=32, features=feats)
    return CpuKnobs(lanes=4, mr=4, nr=8, features=feats)          # 8 + 2 + 1 of 16 xmm
