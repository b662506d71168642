"""Polite sharing: detectors of the owner's use of the machine, a policy with hysteresis, and the monitor.

Layers: readings.py (the Reading record and the Detector interface) -> one module per detector (cpu, gpu,
foreground + its platform parts, exclusive, idle, battery, schedule) -> policy.py (a pure decision with
hysteresis over readings) -> monitor.py (the thread that reads, decides and pauses or resumes the service).
Nothing here imports torch or hivemind.
"""
