"""`nord-node`: the volunteer worker and its tools, thin apps on `nord` (asyncio stays in nord.transport).

__main__   the CLI: join, pull, bootstrap
options    flags from the command line, NORD_* environment variables and a --config file
session    start the peer, find the run, fetch its config, open the replica
worker     the training loop: inner steps, encode, publish, anti-entropy, seals
state      the state directory (identity, replica log, residual, optimizer) written atomically
pull       fetch the latest sealed checkpoint over HTTP or P2P, verified by its hash
bootstrap  a minimal bootstrap peer and authority (local runs, tests)
"""
