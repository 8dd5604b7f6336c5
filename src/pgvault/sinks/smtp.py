"""E-mail over SMTP (STARTTLS by default, or implicit TLS, or plain on a trusted relay)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgvault.events import Event, wanted

if TYPE_CHECKING:
    from pgvault.config import EmailSettings


def compose(event: Event, sender: str, to: list[str]) -> object:
    """The message: the headline as subject, every field and the log tail as plain text."""
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["Subject"] = event.headline()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    lines = [event.summary(), ""]
    lines += [f"{key}: {value}" for key, value in event.to_json().items()
              if value not in (None, [], {}) and key != "log_tail"]
    if event.log_tail:
        lines += ["", "Log tail:", *event.log_tail]
    msg.set_content("\n".join(lines) + "\n")
    return msg


class EmailSink:
    """Sends one e-mail per wanted event."""

    name = "email"

    def __init__(self, settings: EmailSettings, events: list[str]) -> None:
        self._settings = settings
        self._events = tuple(events)

    def wants(self, event: Event) -> bool:
        return wanted(self._events, event)

    def send(self, event: Event, timeout: float) -> None:
        import smtplib
        import ssl

        s = self._settings
        smtp: smtplib.SMTP
        if s.security == "ssl":
            smtp = smtplib.SMTP_SSL(s.smtp_host, s.smtp_port, timeout=timeout,
                                    context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=timeout)
        with smtp:
            if s.security == "starttls":
                smtp.starttls(context=ssl.create_default_context())
            if s.username and s.password is not None:
                smtp.login(s.username, s.password.get_secret_value())
            smtp.send_message(compose(event, s.sender, s.to))  # type: ignore[arg-type]
