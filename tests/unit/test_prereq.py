"""The one skip-or-fail policy: a missing prerequisite skips with its reason,
and under CI fails with it."""

from __future__ import annotations

import pytest

from tests.prereq import in_ci, require_module, skip_or_fail


@pytest.mark.parametrize(("value", "ci"), [("true", True), ("1", True), ("YES", True),
                                           ("", False), ("false", False), ("0", False)])
def test_ci_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str,
                                         ci: bool) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci() is ci


def test_outside_ci_a_missing_prerequisite_skips_with_its_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"SKIPPED \(environment\) \[vm\]: no qemu"):
        skip_or_fail("no qemu", what="vm")


def test_in_ci_a_missing_prerequisite_fails_with_its_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="refusing to skip.*: no qemu"):
        skip_or_fail("no qemu")


def test_a_missing_module_is_a_missing_prerequisite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no_such_module_here.*pip install it"):
        require_module("no_such_module_here", "pip install it")
    assert require_module("json", "stdlib").dumps([]) == "[]"
