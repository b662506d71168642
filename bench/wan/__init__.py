"""A WAN emulator for the benches: TCP relays that add one-way delay, jitter and a bandwidth cap."""
