"""Support staff's path: the Airflow 3 UI's trigger form, in a real headless Chromium.

Debian's ``chromium`` (``/usr/bin/chromium``, or ``USAGE_AGG_CHROMIUM``) driven by
Playwright's Python package; no browser is downloaded. The filled form is kept as
a screenshot in ``build/artifacts/`` (or ``USAGE_AGG_ARTIFACTS``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.system.stack import AIRFLOW_V3, REPO, http
from tests.system.merchant_runs import DAG_ID, MERCHANT, rows, task_states, wait_for_run

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not AIRFLOW_V3, reason="the trigger form under test is Airflow 3's UI"),
]

CHROMIUM = os.environ.get("USAGE_AGG_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("USAGE_AGG_ARTIFACTS", REPO / "build" / "artifacts"))
#: what the form must show for each Param: its section, title, description and input type
FIELDS = {
    "merchant_id": ("Whose usage", "Merchant ID", "The merchant to re-aggregate, exactly as in its Redis keys.", None),
    "date": ("Which days", "Date", "The day to re-aggregate (UTC), or the first day of the range.", "date"),
    "end_date": (
        "Which days", "End date (optional)", "Last day of the range, inclusive; at most 31 days after Date.", "date",
    ),
}  # fmt: skip
#: the boolean Params, shown as switches: section, title, description
SWITCHES = (
    ("How", "Allow decrease", "Redis is the truth: set each total to its Redis value, even lower."),
    ("Whose usage", "All merchants", "Rerun every merchant for these dates (Merchant ID empty)."),
)


@pytest.fixture
def browser_page(stack):
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: apt-get install chromium"
    status, token = http("POST", f"{stack.url}/auth/token", {"username": "admin", "password": stack.password})
    assert status == 201, token
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic",
            ],
        )  # fmt: skip
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        # The token the API server's login would set: the same cookie the UI sends.
        context.add_cookies([{"name": "_token", "value": token["access_token"], "url": stack.url}])
        try:
            yield context.new_page()
        finally:
            browser.close()


def test_the_trigger_form_shows_the_params_and_starts_a_run_that_succeeds(
    stack, merchants, browser_page, query, metadata
):
    page = browser_page
    page.goto(f"{stack.url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger").first.click()
    # the UI names the DAG and its tasks by their display names
    form = page.locator("[role=dialog][data-state=open]").filter(has_text="Trigger Dag - Rerun usage aggregation")
    form.wait_for()

    def open_section(title: str) -> None:
        """The form folds the Params into the DAG's sections, one open at a time."""
        section = form.get_by_role("button", name=title, exact=True)
        if section.get_attribute("aria-expanded") != "true":
            section.click()
        expect(section).to_have_attribute("aria-expanded", "true")

    for name, (section, title, description, input_type) in FIELDS.items():
        open_section(section)
        field = form.locator("[role=group][data-scope=field]", has=page.locator(f"#element_{name}"))
        text = field.inner_text()
        assert title in text and description in text, text
        assert form.locator(f"#element_{name}").get_attribute("type") == input_type
    for section, title, description in SWITCHES:
        open_section(section)
        # the field whose text starts with the title (Merchant ID's description mentions All merchants)
        switch = form.locator("[role=group][data-scope=field]", has_text=re.compile(f"^\\s*{re.escape(title)}"))
        assert description in switch.inner_text()
        assert switch.get_by_role("checkbox").count() == 1

    open_section("Whose usage")
    form.locator("#element_merchant_id").fill(MERCHANT)
    open_section("Which days")
    form.locator("#element_date").fill("2025-11-01")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "trigger-form-filled.png"))
    form.get_by_role("button", name="Trigger").click()

    page.wait_for_url(f"**/dags/{DAG_ID}/runs/**")
    run_id = unquote(page.url.rsplit("/runs/", 1)[1])
    assert wait_for_run(metadata, run_id) == "success", task_states(metadata, run_id)
    assert rows(query, merchants) == {MERCHANT: 500, "globex": 1}

    # The UI shows it too: the run's task instances, each succeeded.
    page.reload()
    for task_name in ("Check the request", "Aggregate a date"):
        row = page.get_by_role("row").filter(has_text=task_name)
        expect(row).to_contain_text("success", ignore_case=True, timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "trigger-form-run-succeeded.png"))
