"""Limits shared by the API's validation, the engine and the app's controls."""

# Most new tokens one request may ask for (the API's bound; the model's context usually binds first).
MAX_TOKENS_LIMIT = 32768
# Longest context (prompt + new tokens) the engine asks servers for, unless configured otherwise.
DEFAULT_CONTEXT_TOKENS = 2048
MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
SEED_RANGE = 2**63 - 1
# Hosting on the CPU may use at most this share of the RAM available now; the rest stays with the OS, the app
# and the user's other programs. The user's memory share (Settings) is taken of what is left.
CPU_MEMORY_SHARE = 0.8
