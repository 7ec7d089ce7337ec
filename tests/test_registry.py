"""The name registries: lookups with did-you-mean errors, and registrations that can be undone."""
from __future__ import annotations

import pytest

from kdlab.registry import Registry, UnknownNameError


def test_unknown_name_lists_names_and_suggests_the_closest():
    reg: Registry[int] = Registry("thing")
    reg.add("resnet8", 1)
    with pytest.raises(UnknownNameError, match="unknown thing 'resnet9'. Did you mean 'resnet8'"):
        reg.get("resnet9")


def test_unregister_removes_and_returns_the_entry():
    reg: Registry[int] = Registry("thing")
    reg.add("a", 1)
    assert reg.unregister("a") == 1
    assert "a" not in reg and len(reg) == 0
    with pytest.raises(UnknownNameError, match="unknown thing 'a'"):
        reg.unregister("a")


def test_registered_lasts_for_the_with_block_only():
    reg: Registry[object] = Registry("thing")
    obj = object()
    with reg.registered("tmp", obj) as got:
        assert got is obj and reg.get("tmp") is obj
        with reg.registered("tmp", obj):  # re-entrant: the inner block leaves it in place
            pass
        assert reg.get("tmp") is obj
    assert "tmp" not in reg


def test_registered_is_undone_when_the_block_fails():
    reg: Registry[int] = Registry("thing")
    with pytest.raises(RuntimeError):
        with reg.registered("tmp", 1):
            raise RuntimeError("test failed inside the block")
    assert "tmp" not in reg


def test_registered_never_replaces_or_removes_an_existing_entry():
    reg: Registry[int] = Registry("thing")
    reg.add("kept", 1)
    with pytest.raises(ValueError, match="registered twice"):
        with reg.registered("kept", 2):
            pass
    assert reg.get("kept") == 1
