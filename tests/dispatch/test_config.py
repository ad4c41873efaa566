"""Every dorafactors environment variable: defaults, accepted values, and the error for a malformed one."""

from __future__ import annotations

import pytest

import dorafactors
from dorafactors.dispatch import config

TERNARY = {
    "PEFT_DORA_FUSED": config.fused_mode,
    "PEFT_DORA_FUSED_BACKWARD": config.fused_backward_mode,
    "PEFT_FORCE_GATHER": config.force_gather,
}
BOOLEAN = {
    "DORA_AUTOTUNE_COMPREHENSIVE": (config.autotune_comprehensive, False),
    "PEFT_DORA_ALLOW_PARTIAL_GATHER": (config.allow_partial_gather, False),
    "PEFT_DORA_NORM_CACHE": (config.norm_cache_enabled, True),
}
THRESHOLDS = {
    "PEFT_DORA_NORM_CHUNK_MB": config.get_dora_norm_threshold_mb,
    "PEFT_DORA_FWD_CHUNK_MB": config.get_dora_fwd_threshold_mb,
}


@pytest.mark.parametrize("name", sorted(TERNARY))
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("", None),
        ("1", True),
        ("TRUE", True),
        (" on ", True),
        ("yes", True),
        ("0", False),
        ("false", False),
        ("Off", False),
        ("no", False),
        ("auto", None),
        (" AUTO ", None),
    ],
)
def test_ternary(monkeypatch, name, raw, expected):
    if raw is not None:
        monkeypatch.setenv(name, raw)
    config.invalidate_cache()
    assert TERNARY[name]() is expected


@pytest.mark.parametrize("name", sorted(BOOLEAN))
def test_boolean_defaults_and_values(monkeypatch, name):
    reader, default = BOOLEAN[name]
    config.invalidate_cache()
    assert reader() is default
    monkeypatch.setenv(name, "1")
    config.invalidate_cache()
    assert reader() is True
    monkeypatch.setenv(name, "false")
    config.invalidate_cache()
    assert reader() is False


@pytest.mark.parametrize("name", sorted(TERNARY) + sorted(BOOLEAN))
@pytest.mark.parametrize("raw", ["maybe", "2", "ture", "1.0", "enable"])
def test_malformed_switch_raises_naming_variable_and_values(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    config.invalidate_cache()
    reader = TERNARY.get(name) or BOOLEAN[name][0]
    with pytest.raises(ValueError, match=name) as err:
        reader()
    assert "1/true/yes/on" in str(err.value) and "0/false/no/off" in str(err.value)
    assert ("auto" in str(err.value)) == (name in TERNARY)  # offered only where it is a value
    with pytest.raises(ValueError, match=name):  # not cached: raises on every use until fixed
        reader()


@pytest.mark.parametrize("name", sorted(BOOLEAN))
def test_auto_is_a_value_of_the_ternary_switches_only(monkeypatch, name):
    """``auto`` names the default of ``PEFT_DORA_FUSED``, ``PEFT_DORA_FUSED_BACKWARD`` and ``PEFT_FORCE_GATHER``
    (``test_ternary``); a plain on/off switch has no auto and says so."""
    monkeypatch.setenv(name, "auto")
    config.invalidate_cache()
    with pytest.raises(ValueError, match=name) as err:
        BOOLEAN[name][0]()
    assert "1/true/yes/on" in str(err.value)


@pytest.mark.parametrize("name", sorted(THRESHOLDS))
@pytest.mark.parametrize("raw", ["abc", "8", "15", "65537", "-1", "16.5", "0x20", "1e3"])
def test_malformed_threshold_raises(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    config.invalidate_cache()
    with pytest.raises(ValueError, match=name) as err:
        THRESHOLDS[name]()
    assert "16" in str(err.value) and "65536" in str(err.value)


@pytest.mark.parametrize("name", sorted(THRESHOLDS))
def test_threshold_values(monkeypatch, name):
    config.invalidate_cache()
    assert THRESHOLDS[name]() == 256
    for value in ("16", "65536", " 1024 "):
        monkeypatch.setenv(name, value)
        config.invalidate_cache()
        assert THRESHOLDS[name]() == int(value)


def test_values_are_read_once_until_invalidated(monkeypatch):
    monkeypatch.setenv("PEFT_DORA_NORM_CHUNK_MB", "64")
    config.invalidate_cache()
    assert config.get_dora_norm_threshold_mb() == 64
    monkeypatch.setenv("PEFT_DORA_NORM_CHUNK_MB", "128")
    assert config.get_dora_norm_threshold_mb() == 64  # cached
    config.invalidate_cache()
    assert config.get_dora_norm_threshold_mb() == 128


@pytest.mark.parametrize(
    ("setter", "getter", "getter_bytes", "env"),
    [
        (
            dorafactors.set_dora_norm_threshold_mb,
            dorafactors.get_dora_norm_threshold_mb,
            dorafactors.get_dora_norm_threshold_bytes,
            "PEFT_DORA_NORM_CHUNK_MB",
        ),
        (
            dorafactors.set_dora_fwd_threshold_mb,
            dorafactors.get_dora_fwd_threshold_mb,
            dorafactors.get_dora_fwd_threshold_bytes,
            "PEFT_DORA_FWD_CHUNK_MB",
        ),
    ],
)
def test_setters(monkeypatch, setter, getter, getter_bytes, env):
    monkeypatch.delenv(env, raising=False)
    setter(48)
    assert getter() == 48 and getter_bytes() == 48 * 1024 * 1024
    import os

    assert os.environ[env] == "48"  # inherited by subprocesses (dataloader workers, launchers)
    for bad in (15, 65537, 0, -4, 16.0, "32", True, None):
        with pytest.raises(ValueError, match="mb must"):
            setter(bad)
    assert getter() == 48  # a rejected value changes nothing


def test_patch_validates_environment(monkeypatch):
    monkeypatch.setenv("PEFT_DORA_FUSED", "maybe")
    config.invalidate_cache()
    with pytest.raises(ValueError, match="PEFT_DORA_FUSED"):
        dorafactors.patch()
    assert not dorafactors.is_patched()


@pytest.mark.parametrize(
    ("raw", "mode"),
    [
        (None, "on"),
        ("", "on"),
        ("1", "on"),
        ("on", "on"),
        ("0", "off"),
        ("No", "off"),
        ("verify", "verify"),
        (" VERIFY ", "verify"),
        ("Verify", "verify"),
    ],
)
def test_norm_cache_modes(monkeypatch, raw, mode):
    """``PEFT_DORA_NORM_CACHE``: a boolean, or ``verify`` (cache on, every served value recomputed and checked)."""
    if raw is not None:
        monkeypatch.setenv("PEFT_DORA_NORM_CACHE", raw)
    config.invalidate_cache()
    assert config.norm_cache_mode() == mode
    assert config.norm_cache_enabled() is (mode != "off")
    assert config.norm_cache_verify() is (mode == "verify")


@pytest.mark.parametrize("raw", ["verfy", "verify=1", "check", "2"])
def test_malformed_norm_cache_value_names_every_accepted_value(monkeypatch, raw):
    monkeypatch.setenv("PEFT_DORA_NORM_CACHE", raw)
    config.invalidate_cache()
    for reader in (config.norm_cache_mode, config.norm_cache_enabled, config.norm_cache_verify):
        with pytest.raises(ValueError, match="PEFT_DORA_NORM_CACHE") as err:
            reader()
        assert "1/true/yes/on" in str(err.value) and "0/false/no/off" in str(err.value)
        assert "'verify'" in str(err.value)
    with pytest.raises(ValueError, match="PEFT_DORA_NORM_CACHE"):
        dorafactors.patch()  # patch() validates every variable up front


def test_cache_settings_follow_their_variables(monkeypatch):
    """The combined read of the hot path (``cache_settings``) is each variable's own value, and is reset with
    each of them: by ``invalidate_cache`` and by the norm-budget setter."""
    monkeypatch.setenv("PEFT_DORA_NORM_CACHE", "verify")
    monkeypatch.setenv("PEFT_DORA_FUSED", "0")
    monkeypatch.setenv("PEFT_DORA_NORM_CHUNK_MB", "64")
    config.invalidate_cache()
    assert config.cache_settings() == ("verify", 64, False)
    assert config.cache_settings() == (
        config.norm_cache_mode(),
        config.get_dora_norm_threshold_mb(),
        config.fused_mode(),
    )
    monkeypatch.setenv("PEFT_DORA_FUSED", "1")
    assert config.cache_settings().fused is False  # read once, like every variable
    config.invalidate_cache()
    assert config.cache_settings().fused is True
    dorafactors.set_dora_norm_threshold_mb(96)
    assert config.cache_settings().norm_chunk_mb == 96
    monkeypatch.setenv("PEFT_DORA_NORM_CACHE", "sometimes")
    config.invalidate_cache()
    with pytest.raises(ValueError, match="PEFT_DORA_NORM_CACHE"):
        config.cache_settings()
    monkeypatch.delenv("PEFT_DORA_NORM_CACHE")
    config.invalidate_cache()
