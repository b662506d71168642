"""Interop on real weights: the published Petals 2.2 client reads the prepared SmolLM2 checkpoint and
generates through two Pollinate servers hosting it, with the tokens local transformers gives.

The Pollinate servers are not told the DHT prefix: they must announce under the `dht_prefix` stored in the
folder's config.json. They are started on a link with another name, so a server that derived the prefix from
the folder name would announce elsewhere and the client would find no servers. The Petals client is given
the prefix: Petals 2.2 passes `dht_prefix=None` on to the config for a local folder, which overrides the
stored value (read in petals/models/llama/config.py; measured: "Could not find dht_prefix in config").
"""

from __future__ import annotations

import json
import subprocess

import pytest
from interop_swarm import base_env, petals_generate, pollinate_server

from engine.smollm2 import SMOLLM2_DHT_PREFIX

pytestmark = [pytest.mark.slow, pytest.mark.interop, pytest.mark.timeout(600)]

MAX_NEW_TOKENS = 8
QUESTION = "What is the capital of France?"


def _chat_prompt(path) -> tuple[str, list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def _local_reference(path, prompt: list[int]) -> tuple[list[int], list[float]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        logits = model(torch.tensor([prompt])).logits[0, -1]
    return output[0].tolist(), logits.tolist()


def test_petals_reads_the_prepared_tokenizer(petals_python, smollm2_checkpoint, tmp_path):
    text, ids = _chat_prompt(smollm2_checkpoint)
    script = (
        "import json, sys; from transformers import AutoTokenizer; "
        "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "print(json.dumps(t(sys.argv[2], add_special_tokens=False)['input_ids']))"
    )
    done = subprocess.run(
        [str(petals_python), "-c", script, str(smollm2_checkpoint), text],
        capture_output=True,
        text=True,
        env=base_env(tmp_path),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ids


def test_petals_client_through_pollinate_servers_hosting_smollm2(petals_python, smollm2_checkpoint, tmp_path):
    import torch

    _text, prompt = _chat_prompt(smollm2_checkpoint)
    expected_ids, expected_logits = _local_reference(smollm2_checkpoint, prompt)
    folder = tmp_path / "served-under-another-name"
    folder.symlink_to(smollm2_checkpoint, target_is_directory=True)
    opts = dict(home=tmp_path, dht_prefix=None)
    with pollinate_server(folder, (0, 15), log=tmp_path / "server-a.log", **opts) as first:
        peers = first.multiaddrs
        with pollinate_server(folder, (15, 30), log=tmp_path / "server-b.log", initial_peers=peers, **opts):
            result = petals_generate(
                petals_python, smollm2_checkpoint, peers, prompt, MAX_NEW_TOKENS,
                log=tmp_path / "client.log", home=tmp_path, dht_prefix=SMOLLM2_DHT_PREFIX,
            )  # fmt: skip
    assert result["output_ids"] == expected_ids
    torch.testing.assert_close(
        torch.tensor(result["last_logits"]), torch.tensor(expected_logits), atol=2e-3, rtol=2e-3
    )
