"""Test helpers shared by the test tiers and the benches: servers that always shut down, fakes."""
