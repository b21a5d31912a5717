"""The OR-Set of signed contributions whose replicas converge bit for bit (see docs/design.md).

config       `MergeConfig`: fixed-point scale, clip bound, outer learning rate, robust options
accumulator  exact int64 sums S and counts C per coordinate; W = base + η·S/C
orset        adds, authorised tombstones, equivocation; which contributions are live
messages     signed `Removal` and `Seal`, and the anti-entropy `Delta`
log          snapshot + append-only, checksummed, fsynced log of a replica directory
replica      `Replica`: rounds, the pool, seals and their verification, compaction, anti-entropy
"""

from nord.crdt.accumulator import FixedPointAccumulator
from nord.crdt.config import MergeConfig
from nord.crdt.messages import Delta, Removal, Seal
from nord.crdt.orset import Equivocation
from nord.crdt.replica import Replica

__all__ = ["Delta", "Equivocation", "FixedPointAccumulator", "MergeConfig", "Removal", "Replica", "Seal"]
