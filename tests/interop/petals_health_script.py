"""Runs in the Petals venv: Petals' own health view of a swarm (get_remote_module_infos), printed as JSON.

This is what Petals' health monitor and its clients' routing read, so Pollinate's records must parse here.
"""

import argparse
import gc
import json

import hivemind
from petals.utils.dht import get_remote_module_infos


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--dht-prefix", required=True)
    parser.add_argument("--num-blocks", type=int, required=True)
    args = parser.parse_args()

    dht = hivemind.DHT(initial_peers=args.initial_peers, client_mode=True, start=True)
    uids = [f"{args.dht_prefix}.{i}" for i in range(args.num_blocks)]
    infos = get_remote_module_infos(dht, uids, latest=True)
    blocks = []
    for info in infos:
        servers = {}
        for peer_id, server in (info.servers if info is not None else {}).items():
            # start_block/end_block exist only in Petals releases after 2.2.0.
            fields = (
                "throughput",
                "start_block",
                "end_block",
                "torch_dtype",
                "quant_type",
                "cache_tokens_left",
            )
            servers[peer_id.to_base58()] = {"state": server.state.name, "version": server.version}
            servers[peer_id.to_base58()].update({name: getattr(server, name, None) for name in fields})
        blocks.append(servers)
    models = dht.get("_petals.models", latest=True)
    index = {k: v.value for k, v in models.value.items()} if models is not None else {}
    print(json.dumps({"blocks": blocks, "models": index}), flush=True)
    dht.shutdown()


if __name__ == "__main__":
    main()
    # Skip the interpreter's last collections over every torch/transformers object (seconds on 2 cores).
    gc.freeze()
