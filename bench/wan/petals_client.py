"""Timed greedy generations by the published Petals 2.2 client, for bench/wan.py (runs in the Petals venv).

    python bench/wan/petals_client.py MODEL --initial-peers ADDR.. --dht-prefix P --input-ids 1,2,3
        --new-tokens N --repeats R

One warm-up generation, then R timed ones (Petals opens a fresh inference session for each `generate`).
Prints one JSON line: {"runs": [{"ttft": s, "step_s": s, "tokens": [...]}, ...], "speculation": null}.
"""

import json
import time

import torch
from client_args import input_ids, swarm_parser  # this folder (the script's)
from petals import AutoDistributedModelForCausalLM
from petals.client.inference_session import _ServerInferenceSession

# Petals 2.2 closes a server session in __del__ by waiting on its client event loop thread; when the object
# happens to be freed on that very thread, the client deadlocks (seen in about one run in three here).
# Sessions are closed explicitly when each generate ends, so the finaliser has nothing left to do.
_ServerInferenceSession.__del__ = lambda self: None


class TimingStreamer:
    """Notes when each new token arrives (transformers calls put() with the prompt first)."""

    def __init__(self):
        self.times = []
        self.tokens = []
        self.seen_prompt = False

    def put(self, value):
        if self.seen_prompt:
            self.times.append(time.perf_counter())
            self.tokens.append(int(value.reshape(-1)[0]))
        self.seen_prompt = True

    def end(self):
        pass


def main():
    parser = swarm_parser()
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()

    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=args.initial_peers, dht_prefix=args.dht_prefix, torch_dtype=torch.float32
    )
    ids = torch.tensor(input_ids(args))
    model.generation_config.eos_token_id = None  # every row runs all --new-tokens, as ours do
    runs = []
    for run in range(args.repeats + 1):
        streamer = TimingStreamer()
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                max_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                streamer=streamer,
            )
        if run > 0:
            times = streamer.times
            step_s = (times[-1] - times[0]) / max(len(times) - 1, 1)
            runs.append(dict(ttft=times[0] - started, step_s=step_s, tokens=streamer.tokens))
    print(json.dumps(dict(runs=runs, speculation=None)), flush=True)


if __name__ == "__main__":
    main()
