"""The swarm layer: Petals 2.x DHT records, announcing, discovery, block selection and swarm presets.

Import the submodules directly (``engine.swarm.records`` etc.): records, keys, snapshot, block_selection and
presets are pure; announce, discovery and dht_node talk to a hivemind DHT.
"""
