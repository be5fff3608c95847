"""The shipped alerting rules (docs/prometheus/alerts.yml), checked and unit-tested by Debian's promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ruamel.yaml import YAML

from tests.conftest import missing

RULES = Path(__file__).resolve().parents[2] / "docs" / "prometheus"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        missing("promtool is missing: `scripts/services.sh start prometheus` installs Debian's prometheus")
    return found


def run(*args: str, cwd: Path = RULES) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_rules_are_valid() -> None:
    """`promtool check rules` accepts every rule."""
    result = run("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_every_rule_fires_as_its_unit_tests_say() -> None:
    """`promtool test rules` passes: each alert fires on its series (parked, stuck, outbox age, lag growing, dead
    letters, restarts, store and broker down) and stays silent where it should."""
    result = run("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    """No alert ships without a promtool test case that expects it to fire."""
    yaml = YAML(typ="safe")
    alerts = {rule["alert"] for group in yaml.load(RULES / "alerts.yml")["groups"] for rule in group["rules"]}
    fired = {case["alertname"] for test in yaml.load(RULES / "alerts.test.yml")["tests"]
             for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert alerts == fired


def test_the_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The same tests fail on a rules file whose parked threshold was raised: they assert, not just run."""
    broken = (RULES / "alerts.yml").read_text().replace("max(sagas_parked_sagas) > 0", "max(sagas_parked_sagas) > 1")
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(RULES / "alerts.test.yml", tmp_path / "alerts.test.yml")
    result = run("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "SagasParked" in result.stdout + result.stderr
