"""The OR-Set of signed contributions whose replicas converge bit for bit (see docs/design.md).

config       `MergeConfig`: fixed-point scale, clip bound, outer learning rate, robust options
accumulator  exact int64 sums S and counts C per coordinate; W = base + η·S/C
orset        adds, authorised tombstones, equivocation; which contributions are live
messages     signed `Removal` and `Seal`, and the anti-entropy `Delta`
log          snapshot + append-only, checksummed, fsynced log of a replica directory
base         `Base`: the snapshot a chain starts from (weights + the window of what was folded before)
pool         the open round's pooled contributions and sums; admission's choice
compaction   two-phase compaction: a view under the lock, fold + write outside it, commit under it
chain        seal checks by recomputation and the choice of the best verified seal per round
replica      `Replica`: rounds, seals and their verification (persistence, antientropy: its log,
             snapshots, compaction and restore; digests and deltas for anti-entropy)
"""

from nord.crdt.accumulator import FixedPointAccumulator
from nord.crdt.config import MergeConfig
from nord.crdt.messages import Delta, Removal, Seal
from nord.crdt.orset import Equivocation
from nord.crdt.replica import Replica

__all__ = ["Delta", "Equivocation", "FixedPointAccumulator", "MergeConfig", "Removal", "Replica", "Seal"]
