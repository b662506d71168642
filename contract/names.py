"""Names both processes must agree on: files in the data directory and keyring entries."""

# Written by the engine on start (port, token location, pid identity); read by the app to find it.
STATE_FILE = "engine-state.json"
# The API token when no OS keyring is available (mode 0600).
TOKEN_FILE = "engine-api-token"
# Lifetime counters (tokens served, sharing time, ...), kept across engine restarts; only ever grow.
LIFETIME_STATS_FILE = "lifetime-stats.json"
# Stores found damaged and renamed aside (contract/stores.py); the app tells the user about each once.
SET_ASIDE_FILE = "set-aside.json"

KEYRING_SERVICE = "pollinate"
KEYRING_TOKEN_USER = "engine-api-token"  # the engine's API bearer token
KEYRING_HF_USER = "huggingface-token"  # the user's Hugging Face token (gated models)
