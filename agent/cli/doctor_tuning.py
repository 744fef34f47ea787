"""`edgefleet doctor`'s tuning check: what each GGUF model runs with on this machine, and why.

Reads the cache that the agent and `edgefleet tune` write (runtime/tuning/cache.py) and
says, per configured GGUF chat/completion model, the settings chosen, when and for which
machine fingerprint they were measured, which candidates were unsafe here, or that the
model will be measured (again) and why.
"""

from __future__ import annotations

import time
from pathlib import Path

from agent.cli.findings import Finding, Level
from agent.config import AgentConfig
from runtime.bundle import read_bundle
from runtime.errors import RuntimeLayerError


def check_tuning(config: AgentConfig) -> list[Finding]:
    from runtime.tuning.cache import Freshness, cache_state
    from runtime.tuning.fingerprint import machine_parts
    from runtime.tuning.service import tunable

    tuning_dir = Path(config.state_dir) / "tuning"
    off = config.tuning.mode == "off"
    findings = []
    for entry in config.models:
        try:
            bundle = read_bundle(config.bundle_path(entry), name=entry.name)
        except (RuntimeLayerError, OSError):
            continue  # the models check says why
        if not tunable(bundle):
            continue
        check = f"tuning {entry.name}"
        try:
            state = cache_state(tuning_dir, bundle)
        except Exception as exc:  # noqa: BLE001 - llama.cpp cannot load: the llama.cpp check says why
            findings.append(Finding(Level.WARN, check, f"cannot tell: {type(exc).__name__}: {exc}"))
            continue
        when = "at the agent's next start" if not off else "never: [tuning] mode = \"off\""
        fix = f"edgefleet tune {entry.name}"
        if state.freshness is Freshness.UNREADABLE:
            findings.append(Finding(Level.WARN, check, f"cannot use the cached tuning: {state.detail}",
                                    f"remove the file and run {fix}"))
        elif state.freshness is Freshness.MISSING:
            findings.append(Finding(Level.OK, check,
                                    f"not measured on this machine yet: default settings; measured {when}", fix))
        elif state.freshness is Freshness.STALE:
            findings.append(Finding(Level.OK, check,
                                    f"measured for another fingerprint ({state.detail}): default settings until "
                                    f"measured again, {when}", fix))
        else:
            record = state.record or {}
            candidates = [c for c in record.get("candidates") or [] if isinstance(c, dict)]
            unsafe = [str(c.get("label")) for c in candidates if c.get("status") == "unsafe"]
            rejected = [str(c.get("label")) for c in candidates if c.get("status") == "rejected"]
            tuned_at = record.get("tuned_at")
            at = time.strftime("%Y-%m-%d %H:%M", time.localtime(tuned_at if isinstance(tuned_at, (int, float)) else 0))
            choice = state.choice()
            what = choice.settings.describe() if choice else "every candidate failed: default settings"
            notes = "".join([f"; unsafe here: {', '.join(unsafe)}" if unsafe else "",
                             f"; rejected (greedy output did not repeat): {', '.join(rejected)}" if rejected else ""])
            findings.append(Finding(Level.OK if choice else Level.WARN, check,
                                    f"{what} (measured {at} in {float(record.get('took_s') or 0):.0f}s, fingerprint "
                                    f"{str(record.get('fingerprint'))[:16]}: {machine_parts().summary()}){notes}",
                                    fix))
    return findings
