"""`pip install .` registers usage-agg with Airflow as a provider."""

from __future__ import annotations


def test_airflow_sees_the_installed_provider():
    from airflow.providers_manager import ProvidersManager

    providers = ProvidersManager().providers
    assert "usage-agg" in providers
    info = providers["usage-agg"]
    assert info.data["operators"][0]["python-modules"] == ["usage_agg.operators"]
