"""User settings: a frozen, validated record saved as JSON in the config dir; HF token in the keyring."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from app import paths
from contract import KEYRING_HF_USER, KEYRING_SERVICE, MAX_TOKENS_LIMIT, Quant, Swarm
from contract.stores import open_store

log = logging.getLogger(__name__)

SWARMS = tuple(Swarm)
SWARM_LABELS = {
    "local": "Local demo swarm (this computer only)",
    "public": "Public Petals swarm",
    "private": "Private swarm (my own peers)",
}
QUANTS = tuple(Quant)


@dataclass(frozen=True)
class Settings:
    """Everything the user can choose; defaults are the first-run values (sharing off, no autostart)."""

    onboarded: bool = False
    # Which swarm the engine joins; "private" uses initial_peers (multiaddrs).
    swarm: str = "local"
    initial_peers: tuple[str, ...] = ()
    # Fraction of free GPU memory (or RAM without a GPU) that hosting may use.
    memory_fraction: float = 0.5
    quant: str = "auto"
    # Model to host; empty lets the engine choose (the demo model on the local swarm).
    host_model: str = ""
    # Whether sharing was on when the app last ran: it resumes at start only after the user turned it on.
    sharing_enabled: bool = False
    keep_sharing_on_close: bool = False
    autostart: bool = False
    # Hugging Face cache folder for weights; empty keeps the default.
    weights_dir: str = ""
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 256
    system_prompt: str = ""
    # Polite sharing (the engine's /api/policy; README "Polite sharing"). Defaults suit a gaming PC.
    pause_on_fullscreen: bool = True
    exclusive_apps: tuple[str, ...] = ()  # program names; sharing pauses while one runs
    gpu_busy_percent: float = 20.0  # other programs' GPU use that pauses sharing (0: off)
    cpu_busy_percent: float = 0.0  # other programs' CPU use that pauses CPU hosting (0: off)
    pause_when_user_active: bool = False
    user_idle_minutes: float = 5.0
    pause_on_battery: bool = True
    max_gpu_temperature: float = 85.0  # degrees Celsius (0: off)
    schedule: tuple[str, ...] = ()  # "mon-fri 18:00-23:30" ...; empty: any time
    resume_after_seconds: float = 60.0
    max_sessions: int = 0  # inference sessions served at once (0: no limit)
    compute_share: float = 1.0  # share of compute time sharing may use while active (0.05..1)
    extra: dict = field(default_factory=dict, compare=False)

    def validated(self) -> Settings:
        """Return a copy with every field clamped into its valid range."""
        return dataclasses.replace(
            self,
            swarm=self.swarm if self.swarm in SWARMS else "local",
            initial_peers=tuple(str(p).strip() for p in self.initial_peers if str(p).strip()),
            memory_fraction=min(0.95, max(0.05, float(self.memory_fraction))),
            quant=self.quant if self.quant in QUANTS else "auto",
            temperature=min(2.0, max(0.0, float(self.temperature))),
            top_p=min(1.0, max(0.01, float(self.top_p))),
            max_tokens=min(MAX_TOKENS_LIMIT, max(1, int(self.max_tokens))),
            exclusive_apps=tuple(str(a).strip() for a in self.exclusive_apps if str(a).strip()),
            gpu_busy_percent=_off_or(self.gpu_busy_percent, 1.0, 100.0),
            cpu_busy_percent=_off_or(self.cpu_busy_percent, 1.0, 100.0),
            user_idle_minutes=min(1440.0, max(1.0, float(self.user_idle_minutes))),
            max_gpu_temperature=_off_or(self.max_gpu_temperature, 40.0, 110.0),
            schedule=tuple(str(s).strip() for s in self.schedule if str(s).strip()),
            resume_after_seconds=min(3600.0, max(0.0, float(self.resume_after_seconds))),
            max_sessions=min(1000, max(0, int(self.max_sessions))),
            compute_share=min(1.0, max(0.05, float(self.compute_share))),
        )

    def policy(self) -> dict:
        """The body of PUT /api/policy for these settings (0 turns a threshold off)."""
        return dict(
            pause_on_fullscreen=self.pause_on_fullscreen,
            exclusive_apps=list(self.exclusive_apps),
            gpu_busy_percent=self.gpu_busy_percent or None,
            cpu_busy_percent=self.cpu_busy_percent or None,
            pause_when_user_active=self.pause_when_user_active,
            user_idle_seconds=self.user_idle_minutes * 60.0,
            pause_on_battery=self.pause_on_battery,
            max_gpu_temperature=self.max_gpu_temperature or None,
            schedule=list(self.schedule),
            resume_after_seconds=self.resume_after_seconds,
            max_sessions=self.max_sessions or None,
            compute_share=self.compute_share,
        )


POLICY_FIELDS = (
    "pause_on_fullscreen",
    "exclusive_apps",
    "gpu_busy_percent",
    "cpu_busy_percent",
    "pause_when_user_active",
    "user_idle_minutes",
    "pause_on_battery",
    "max_gpu_temperature",
    "schedule",
    "resume_after_seconds",
    "max_sessions",
    "compute_share",
)


def _off_or(value, low: float, high: float) -> float:
    """0 (off) or the value clamped into [low, high]."""
    value = float(value or 0)
    return 0.0 if value <= 0 else min(high, max(low, value))


def settings_file() -> Path:
    return paths.config_dir() / "settings.json"


def load_settings(path: Path | None = None) -> Settings:
    """Read settings (defaults if missing); a damaged file is set aside (contract.stores): defaults then."""
    settings, _aside = open_store(
        path or settings_file(), _read_settings, store="settings", notices=paths.data_dir()
    )
    return settings


def _read_settings(path: Path) -> Settings:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Settings()
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    known = {f.name for f in dataclasses.fields(Settings)} - {"extra"}
    values = {k: v for k, v in raw.items() if k in known}
    for name in ("initial_peers", "exclusive_apps", "schedule"):
        if name in values:
            values[name] = tuple(values[name] or ())
    return Settings(**values).validated()  # TypeError / ValueError: bad values, set aside too


def save_settings(settings: Settings, path: Path | None = None) -> None:
    """Write settings atomically (write beside, then rename)."""
    path = path or settings_file()
    data = dataclasses.asdict(settings.validated())
    data.pop("extra", None)
    for name in ("initial_peers", "exclusive_apps", "schedule"):
        data[name] = list(data[name])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def get_hf_token() -> str | None:
    """The Hugging Face token from the OS keyring, or None (no token, or no usable keyring)."""
    try:
        import keyring

        return keyring.get_password(KEYRING_SERVICE, KEYRING_HF_USER) or None
    except Exception as exc:  # any backend failure means "no token"
        log.info("keyring unavailable: %s", exc)
        return None


def set_hf_token(token: str | None) -> bool:
    """Store (or with None/empty, delete) the Hugging Face token in the keyring; False if no keyring works."""
    try:
        import keyring

        if token:
            keyring.set_password(KEYRING_SERVICE, KEYRING_HF_USER, token)
        else:
            with contextlib.suppress(keyring.errors.PasswordDeleteError):
                keyring.delete_password(KEYRING_SERVICE, KEYRING_HF_USER)
        return True
    except Exception as exc:
        log.warning("cannot store the Hugging Face token in the keyring: %s", exc)
        return False
