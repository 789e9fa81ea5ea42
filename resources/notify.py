"""``Notifier``: where failure alerts and refused promotions go.

Every alert is written as a JSON record under ``$RLHF_HOME/alerts/`` (the embedded default, and
an audit trail everywhere). A Slack incoming webhook and e-mail (SMTP) are added by naming the
environment variables that hold their secrets: the resource config holds variable *names*,
never the webhook URL or a password, so nothing secret reaches the Launchpad, the run config or
the logs. A channel that fails to deliver is logged as such and the file record still exists.
"""

from __future__ import annotations

import json
import logging
import os
import smtplib
import time
import urllib.request
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from resources import settings
from resources.redact import redact_text

log = logging.getLogger(__name__)


def alerts_dir() -> Path:
    return settings.rlhf_home() / "alerts"


class Notifier(dg.ConfigurableResource):
    """File records always; Slack and e-mail when their environment variables are set."""

    slack_webhook_env: str = Field(default="RLHF_SLACK_WEBHOOK_URL", description="Environment variable "
                                   "holding a Slack incoming-webhook URL; unset or empty: no Slack message.")
    smtp_host_env: str = Field(default="RLHF_SMTP_HOST", description="Environment variable with the SMTP "
                               "host (host or host:port); unset: no e-mail.")
    smtp_user_env: str = Field(default="RLHF_SMTP_USER", description="Environment variable with the SMTP user.")
    smtp_password_env: str = Field(default="RLHF_SMTP_PASSWORD", description="Environment variable with the "
                                   "SMTP password.")
    email_to: list[str] = Field(default_factory=list, description="Recipients of alert e-mails.")
    email_from: str = Field(default="rlhf-pipeline@localhost", description="Sender of alert e-mails.")
    timeout_seconds: float = Field(default=10.0, description="Per-channel delivery timeout.")

    def notify(self, kind: str, message: str, details: dict[str, Any] | None = None) -> Path:
        """Record the alert, then deliver it to every configured channel; returns the record path."""
        record = {"kind": kind, "message": message, "details": details or {},
                  "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "delivered": {}}
        for channel, send in (("slack", self._slack), ("email", self._email)):
            try:
                if send(kind, message):
                    record["delivered"][channel] = "sent"
            except Exception as exc:  # a broken channel must not hide the alert
                # an error may quote the webhook URL or the password it was given: mask them
                error = redact_text(f"{type(exc).__name__}: {exc}", self._secrets())
                record["delivered"][channel] = f"failed: {error}"
                log.warning(f"alert channel {channel} failed: {error}")
        out = alerts_dir() / f"{time.strftime('%Y%m%dT%H%M%S')}-{kind}-{uuid.uuid4().hex[:8]}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2, default=str))
        return out

    def _secrets(self) -> tuple[str, ...]:
        return tuple(os.environ.get(name, "") for name in (self.slack_webhook_env, self.smtp_password_env))

    def _slack(self, kind: str, message: str) -> bool:
        url = os.environ.get(self.slack_webhook_env, "")
        if not url:
            return False
        body = json.dumps({"text": f"[rlhf {kind}] {message}"}).encode()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_seconds) as resp:  # noqa: S310 (operator's URL)
            if resp.status >= 300:
                raise RuntimeError(f"Slack webhook answered HTTP {resp.status}")
        return True

    def _email(self, kind: str, message: str) -> bool:
        host = os.environ.get(self.smtp_host_env, "")
        if not host or not self.email_to:
            return False
        name, _, port = host.partition(":")
        msg = EmailMessage()
        msg["Subject"], msg["From"], msg["To"] = f"[rlhf {kind}]", self.email_from, ", ".join(self.email_to)
        msg.set_content(message)
        with smtplib.SMTP(name, int(port or 587), timeout=self.timeout_seconds) as smtp:
            user = os.environ.get(self.smtp_user_env, "")
            if user:
                smtp.starttls()
                smtp.login(user, os.environ.get(self.smtp_password_env, ""))
            smtp.send_message(msg)
        return True
