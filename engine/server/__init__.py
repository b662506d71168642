"""The block server: hosts a span of a model's blocks for the swarm, in the Petals 2.2 wire format.

Layers, one module each: config (ServerConfig) -> protocol (reading/writing Petals requests) -> compute
(forward, backward, inference steps), task_pool (the one compute loop) and memory_cache (the KV-cache
budget) -> handler (TransformerConnectionHandler, the rpc_* methods) -> block_host (BlockHost, lifecycle).
"""
