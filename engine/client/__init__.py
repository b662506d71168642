"""The swarm client: route choice, bans, inference sessions with failover, generation, remote autograd.

Layers, bottom up: `routing` (pure route choice) and `bans` (backoff) -> `protocol` (Petals 2.x wire
format, single-server calls) -> `sequence_manager` (live swarm view) -> `inference_session` and
`remote_sequential` (fault-tolerant multi-server passes) -> `generation` and `model` (the facade) -> `cli`.
Import the submodules directly; this package imports nothing so that `import engine.client` stays cheap.
"""
