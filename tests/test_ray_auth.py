"""The driver takes the cluster's token-auth mode (pipeline/_internal/ray_auth.py). No Ray
starts here: the cluster's answer is stubbed; tests/test_multinode.py runs the real thing."""
from __future__ import annotations

import os

import pytest

from selfment_dist.pipeline._internal import ray_auth


@pytest.fixture
def auth_env(monkeypatch):
    """RAY_AUTH_MODE restored afterwards, Ray's config never re-read, the probe stubbed."""
    calls = []
    monkeypatch.delenv(ray_auth.AUTH_MODE_ENV, raising=False)
    monkeypatch.setattr(ray_auth, "_set_auth_mode",
                        lambda mode: os.environ.__setitem__(ray_auth.AUTH_MODE_ENV, mode))
    monkeypatch.setattr("ray._private.services.canonicalize_bootstrap_address",
                        lambda addr, temp_dir=None: "10.0.0.1:6379")
    return monkeypatch, calls


def _cluster_checks(monkeypatch, calls, answer):
    def probe(address, timeout_s=ray_auth.PROBE_TIMEOUT_S):
        calls.append(address)
        return answer
    monkeypatch.setattr(ray_auth, "cluster_checks_tokens", probe)


def test_a_token_driver_on_a_cluster_without_token_auth_turns_it_off(auth_env):
    monkeypatch, calls = auth_env
    monkeypatch.setenv(ray_auth.AUTH_MODE_ENV, "token")
    _cluster_checks(monkeypatch, calls, False)
    assert ray_auth.match_cluster_auth("10.0.0.1:6379") is True
    assert os.environ[ray_auth.AUTH_MODE_ENV] == "disabled" and calls == ["10.0.0.1:6379"]


@pytest.mark.parametrize("answer", [True, None])  # the cluster checks tokens; cannot be told
def test_a_token_driver_keeps_token_auth_unless_the_cluster_surely_has_none(auth_env, answer):
    monkeypatch, calls = auth_env
    monkeypatch.setenv(ray_auth.AUTH_MODE_ENV, "token")
    _cluster_checks(monkeypatch, calls, answer)
    assert ray_auth.match_cluster_auth("10.0.0.1:6379") is False
    assert os.environ[ray_auth.AUTH_MODE_ENV] == "token"


def test_no_probe_without_token_mode_or_through_ray_client(auth_env):
    monkeypatch, calls = auth_env
    _cluster_checks(monkeypatch, calls, False)
    # An explicit address with RAY_AUTH_MODE unset: Ray never enables token auth (token file
    # or not), so there is nothing to match.
    assert ray_auth.match_cluster_auth("10.0.0.1:6379") is False
    monkeypatch.setenv(ray_auth.AUTH_MODE_ENV, "disabled")
    assert ray_auth.match_cluster_auth("auto") is False
    monkeypatch.setenv(ray_auth.AUTH_MODE_ENV, "token")
    assert ray_auth.match_cluster_auth("ray://10.0.0.1:10001") is False
    assert calls == []


def test_auto_address_with_a_token_file_counts_as_token_mode(auth_env):
    """Ray's own rule for ``address="auto"`` with RAY_AUTH_MODE unset: a token file enables
    token auth (how a test or user process that found the cluster itself came to run in token
    mode against a cluster started without it)."""
    monkeypatch, calls = auth_env
    monkeypatch.setattr(ray_auth, "_token_available", lambda: True)
    assert ray_auth.driver_uses_token_auth("auto") is True
    assert ray_auth.driver_uses_token_auth("10.0.0.1:6379") is False
    _cluster_checks(monkeypatch, calls, False)
    assert ray_auth.match_cluster_auth("auto") is True
    assert os.environ[ray_auth.AUTH_MODE_ENV] == "disabled"
