"""Alerting on failure, built on Airflow's notifiers.

``UsageAlertNotifier`` is the DAGs' ``on_failure_callback``. Its channels are read
when it fires:

- the Airflow connection ``usage_agg_alert`` (another id: ``[usage_agg] alert_conn_id``, or
  ``USAGE_AGG_ALERT_CONN_ID`` in env or a Variable, which wins),
  whose **password** holds the webhook URL: Airflow masks connection passwords in
  task logs, so this is where a URL with a token belongs;
- ``USAGE_AGG_ALERT_WEBHOOK`` (env, or else an Airflow Variable of that name): a
  webhook URL too, registered with Airflow's secrets masker as soon as it is read;
- ``USAGE_AGG_ALERT_EMAIL`` (env or Variable): comma-separated addresses, sent with
  the SMTP provider's ``SmtpNotifier`` over Airflow's ``smtp_default`` connection.

Each webhook receives a JSON POST (Slack-compatible ``text``). With no channel, the
alert is one clear log line. A notifier never raises, and never logs a webhook's
URL, path or query (its host alone): they may hold a token.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import urllib.parse
import urllib.request

from airflow.providers.common.compat.sdk import BaseNotifier

from usage_agg import config

log = logging.getLogger(__name__)

WEBHOOK_SETTING = "USAGE_AGG_ALERT_WEBHOOK"
EMAIL_SETTING = "USAGE_AGG_ALERT_EMAIL"
CONN_ID_SETTING = "USAGE_AGG_ALERT_CONN_ID"


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


def _mask(secret: str) -> None:
    """Register ``secret`` with Airflow's secrets masker, so any log line that holds it shows ``***``."""
    try:
        from airflow.providers.common.compat.sdk import mask_secret  # the SDK's on 3.x, core's on 2.x

        mask_secret(secret)
        if secret.strip() != secret:
            mask_secret(secret.strip())
    except Exception as err:  # masking is a safeguard: never a reason to lose the alert
        log.warning("Could not register the alert webhook URL with Airflow's secrets masker (%s)", type(err).__name__)


def alert_conn_id() -> str:
    """``USAGE_AGG_ALERT_CONN_ID`` (env, or else a Variable), else ``[usage_agg] alert_conn_id``."""
    return alert_setting(CONN_ID_SETTING) or config.value("alert_conn_id")


def webhook_from_connection(conn_id: str) -> tuple[str, str] | None:
    """``(source, url)`` from the alert connection's password, or ``None`` when it is not defined."""
    source = f"connection {conn_id!r}"
    try:
        from airflow.providers.common.compat.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
    except Exception as err:
        if type(err).__name__ != "AirflowNotFoundException":
            log.warning("Alert %s could not be read (%s)", source, type(err).__name__)
        return None
    url = conn.password or ""
    if url:
        _mask(url)  # Airflow masks it when it loads the connection; this makes sure
        return source, url
    log.error("Alert %s has no password: put the webhook URL in its password field", source)
    return None


def webhook_from_setting() -> tuple[str, str] | None:
    url = alert_setting(WEBHOOK_SETTING)
    if not url:
        return None
    _mask(url)
    return WEBHOOK_SETTING, url


def describe_data_loss(context, result) -> dict:
    """The alert for a run that found counters reset: Redis lost data (the run itself succeeded)."""
    ti = context.get("task_instance") or context.get("ti")
    dag_id, run_id, task_id = (getattr(ti, name, None) for name in ("dag_id", "run_id", "task_id"))
    text = (
        f"usage-agg: Redis lost data: {result.resets} counter(s) of {result.usage_date} in {result.table} were reset "
        f"(restart, failover, snapshot restore or eviction), seen by {dag_id} run {run_id} task {task_id}. "
        f"What was counted before is kept; growth between the reset and this run may be lost. "
        f"First ones: {result.reset_samples[:5]}"
    )
    return {"text": text, "dag_id": dag_id, "run_id": run_id, "task_id": task_id, "reason": "redis_data_loss"}


def describe_late_run(dag_id: str | None, run_id: str | None, detail: str) -> dict:
    """The alert for a run of the hourly DAG that has not succeeded in time (usage is not landing)."""
    text = (
        f"usage-agg: {dag_id} run {run_id} has not succeeded in time ({detail}): usage is not reaching "
        "PostgreSQL; check the run's tasks, their pool, and the Redis and PostgreSQL connections"
    )
    return {"text": text, "dag_id": dag_id, "run_id": run_id, "task_id": None, "reason": "late_run"}


async def late_run_alert(context: dict | None = None, **_: object) -> None:
    """Airflow 3 ``DeadlineAlert`` callback (run by the triggerer): a run missed its deadline."""
    import asyncio

    context = context or {}
    run = context.get("dag_run") or {}
    deadline = (context.get("deadline") or {}).get("deadline_time")
    alert = describe_late_run(run.get("dag_id"), run.get("run_id") or run.get("dag_run_id"), f"deadline {deadline}")
    await asyncio.to_thread(UsageAlertNotifier().send, alert, context)


def late_run_sla_miss(dag, task_list, blocking_task_list, slas, blocking_tis) -> None:
    """Airflow 2 ``sla_miss_callback``: tasks of a run missed their SLA."""
    runs = sorted({str(getattr(sla, "execution_date", "")) for sla in slas or ()})
    alert = describe_late_run(getattr(dag, "dag_id", None), ", ".join(runs) or None, f"SLA missed by: {task_list}")
    UsageAlertNotifier().send(alert, {})


class UsageAlertNotifier(BaseNotifier):
    """Send a failure to the configured webhooks and/or e-mail addresses; never raise."""

    template_fields = ()

    def render_template_fields(self, context, jinja_env=None) -> None:
        # Nothing to render. Skipping also spares Airflow 3's dag.test(), whose DAG
        # callback context holds a SerializedDAG without a template environment.
        if self.template_fields:
            super().render_template_fields(context, jinja_env)

    def notify(self, context) -> None:
        self.send(describe_failure(context), context)

    def send(self, alert: dict, context) -> None:
        """Send ``alert`` (its ``text`` and fields) through every configured channel; never raise."""
        try:
            self._send(alert, context)
        except Exception as err:  # a failing alert must not hide, or replace, the failure it reports
            log.error("usage-agg alert could not be sent (%s)", type(err).__name__)

    def _send(self, alert: dict, context) -> None:
        conn_id = alert_conn_id()
        webhooks = [w for w in (webhook_from_connection(conn_id), webhook_from_setting()) if w]
        email = alert_setting(EMAIL_SETTING)
        if not webhooks and not email:
            log.warning(
                "%s (no alert channel configured: define the Airflow connection %r with the webhook URL as its "
                "password, or set %s or %s as env or Airflow Variable)",
                alert["text"],
                conn_id,
                WEBHOOK_SETTING,
                EMAIL_SETTING,
            )
            return
        posted: set[str] = set()
        for source, url in webhooks:
            if url.strip() not in posted:
                posted.add(url.strip())
                self._post(url.strip(), alert, source)
        if email:
            self._mail(email, alert, context)

    @staticmethod
    def _post(url: str, alert: dict, source: str) -> None:
        """POST ``alert`` to ``url``; log the outcome by host (the URL, path and query may hold a token)."""
        try:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname
        except ValueError:  # e.g. an unbalanced IPv6 bracket
            parts, host = None, None
        scheme_ok = parts is not None and parts.scheme in ("http", "https")
        if not scheme_ok or not host:
            problem = "it names no host" if scheme_ok else "it does not start with http:// or https://"
            log.error(
                "Alert not posted: the webhook URL from %s is not usable (%s; the URL itself is not shown, "
                "it may hold a token); alert was: %s",
                source,
                problem,
                alert["text"],
            )
            return
        try:
            request = urllib.request.Request(
                url, data=json.dumps(alert).encode(), headers={"Content-Type": "application/json"}, method="POST"
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                log.info("Alert posted to the webhook at %s from %s (HTTP %s)", host, source, response.status)
        except Exception as err:
            log.error(
                "Alert could not be posted to the webhook at %s from %s: %s; alert was: %s",
                host,
                source,
                _without_url(str(err) or type(err).__name__, url),
                alert["text"],
            )

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


def _without_url(message: str, url: str) -> str:
    """``message`` (an error about ``url``) with the URL, its userinfo, path, query and quoted parts as ``***``."""
    parts = urllib.parse.urlsplit(url)
    secrets = {url, parts.netloc.rpartition("@")[0], parts.path, parts.query, parts.fragment}
    secrets |= {urllib.parse.unquote(s) for s in secrets}
    for secret in sorted((s for s in secrets if len(s) > 1), key=len, reverse=True):
        message = message.replace(secret, "***")
    return re.sub(
        r"'([^']+)'", lambda m: "'***'" if m.group(1) in url and m.group(1) != parts.hostname else m.group(0), message
    )
