"""Alerting on failure, built on Airflow's notifiers.

``UsageAlertNotifier`` is the DAGs' ``on_failure_callback``. Its channels are read
when it fires, from the environment or else an Airflow Variable of the same name:

- ``USAGE_AGG_ALERT_WEBHOOK``: a URL that receives a JSON POST (Slack-compatible ``text``);
- ``USAGE_AGG_ALERT_EMAIL``: comma-separated addresses, sent with the SMTP provider's
  ``SmtpNotifier`` over Airflow's ``smtp_default`` connection.

With neither set, the alert is one clear log line; a notifier never raises.
"""

from __future__ import annotations

import html
import json
import logging
import os
import urllib.parse
import urllib.request

from airflow.providers.common.compat.sdk import BaseNotifier

log = logging.getLogger(__name__)

WEBHOOK_SETTING = "USAGE_AGG_ALERT_WEBHOOK"
EMAIL_SETTING = "USAGE_AGG_ALERT_EMAIL"


def alert_setting(name: str) -> str | None:
    value = os.environ.get(name)
    if value:
        return value
    try:
        from airflow.providers.common.compat.sdk import Variable

        return Variable.get(name, None) or None  # positional: "default" (3.x) is "default_var" in 2.x
    except Exception:  # no metadata DB or API reachable: treat as not configured
        return None


def describe_failure(context) -> dict:
    dag_run = context.get("dag_run")
    ti = context.get("task_instance") or context.get("ti")
    dag_id = getattr(dag_run, "dag_id", None) or getattr(ti, "dag_id", None)
    run_id = getattr(dag_run, "run_id", None) or getattr(ti, "run_id", None)
    task_id = getattr(ti, "task_id", None)
    reason = context.get("exception") or context.get("reason") or "failed"
    text = f"usage-agg: {dag_id} run {run_id} failed" + (f" at task {task_id}" if task_id else "") + f": {reason}"
    return {"text": text, "dag_id": dag_id, "run_id": run_id, "task_id": task_id, "reason": str(reason)}


class UsageAlertNotifier(BaseNotifier):
    """Send a failure to the configured webhook and/or e-mail addresses."""

    template_fields = ()

    def render_template_fields(self, context, jinja_env=None) -> None:
        # Nothing to render. Skipping also spares Airflow 3's dag.test(), whose DAG
        # callback context holds a SerializedDAG without a template environment.
        if self.template_fields:
            super().render_template_fields(context, jinja_env)

    def notify(self, context) -> None:
        alert = describe_failure(context)
        webhook, email = alert_setting(WEBHOOK_SETTING), alert_setting(EMAIL_SETTING)
        if not webhook and not email:
            log.warning(
                "%s (no alert channel configured: set %s or %s as env or Airflow Variable)",
                alert["text"],
                WEBHOOK_SETTING,
                EMAIL_SETTING,
            )
            return
        if webhook:
            self._post(webhook, alert)
        if email:
            self._mail(email, alert, context)

    @staticmethod
    def _post(url: str, alert: dict) -> None:
        host = urllib.parse.urlsplit(url).hostname  # the URL itself may hold a token: never logged
        request = urllib.request.Request(
            url, data=json.dumps(alert).encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                log.info("Alert posted to webhook at %s (HTTP %s)", host, response.status)
        except Exception as err:
            log.error("Alert could not be posted to the webhook at %s: %s; alert was: %s", host, err, alert["text"])

    @staticmethod
    def _mail(addresses: str, alert: dict, context) -> None:
        try:
            from airflow.providers.smtp.notifications.smtp import SmtpNotifier

            SmtpNotifier(
                to=[a.strip() for a in addresses.split(",") if a.strip()],
                subject=alert["text"][:200],
                html_content=f"<pre>{html.escape(alert['text'])}</pre>",
            ).notify(context)
        except Exception as err:
            log.error("Alert e-mail could not be sent: %s; alert was: %s", err, alert["text"])
