"""SMTP replies: the :class:`SmtpReply` type and the catalogue from DESIGN.md.

Only this module writes reply text. Every reply carries an enhanced status code
(RFC 3463, RFC 2034); refusals name the rule and end with the session reference.
It also rewrites aiosmtpd's built-in replies, some of which lack enhanced codes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from policies.base import Outcome, Verdict


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """One SMTP reply: basic code, enhanced status, text."""

    code: int
    status: str
    text: str

    def render(self, ref: str | None = None) -> str:
        """The reply line, with ``[ref …]`` appended to failures when given."""
        text = self.text
        if ref and self.code >= 400:
            text = f"{text} [ref {ref}]"
        return f"{self.code} {self.status} {text}"

    @property
    def permanent(self) -> bool:
        """True for 5xx."""
        return self.code >= 500


def queued(queue_id: str) -> SmtpReply:
    """The message is durable (DESIGN.md: ``250 2.0.0`` with the queue id)."""
    return SmtpReply(250, "2.0.0", f"Ok: queued as {queue_id}")


SENDER_OK = SmtpReply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = SmtpReply(250, "2.1.5", "Recipient ok")
AUTH_OK = SmtpReply(235, "2.7.0", "Authentication successful")
AUTH_INVALID = SmtpReply(535, "5.7.8", "Authentication credentials invalid")
AUTH_REQUIRED = SmtpReply(
    530, "5.7.0", "Authentication required: log in with AUTH first"
)
AUTH_IN_TRANSACTION = SmtpReply(
    503, "5.5.1", "AUTH is not permitted during a mail transaction"
)
AUTH_MALFORMED = SmtpReply(501, "5.5.2", "Malformed authentication data")
RELAY_DENIED = SmtpReply(
    554, "5.7.1", "Relay access denied: authenticate with AUTH to send mail"
)
TOO_MANY_RECIPIENTS = SmtpReply(452, "4.5.3", "Too many recipients for one message")
SEPARATE_FEEDBACK = SmtpReply(
    452,
    "4.5.3",
    "Feedback for the relay and other mail go in separate transactions; "
    "send this recipient again in a new one",
)
TOO_LARGE = SmtpReply(
    552, "5.3.4", "Message size exceeds the fixed maximum message size"
)
LINE_TOO_LONG = SmtpReply(
    500,
    "5.5.2",
    "Message refused: a line is longer than 998 octets (RFC 5321 4.5.3.1.6)",
)
BARE_LINE_ENDING = SmtpReply(
    550,
    "5.5.2",
    "Message refused: bare CR or LF in message data; use CRLF line endings "
    "(RFC 5321 2.3.8)",
)
NUL_IN_DATA = SmtpReply(550, "5.5.2", "Message refused: NUL byte in message data")
STORAGE_FULL = SmtpReply(452, "4.3.1", "Insufficient system storage, try again later")
STORAGE_UNAVAILABLE = SmtpReply(
    451, "4.3.0", "Message store unavailable, try again later"
)
INTERNAL_ERROR = SmtpReply(451, "4.3.0", "Internal error, try again later")
SHUTTING_DOWN = SmtpReply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_SESSIONS = SmtpReply(421, "4.3.2", "Too many connections, try again later")
ACCOUNT_DISABLED = SmtpReply(550, "5.7.1", "Account disabled")
SPAMTRAP = SmtpReply(
    550,
    "5.7.1",
    "Refused by policy spamtrap: recipient is on the exclusion list (spamtrap)",
)


def bad_address(which: str, reason: str) -> SmtpReply:
    """A MAIL FROM or RCPT TO address that cannot be used."""
    status = "5.1.7" if which == "sender" else "5.1.3"
    return SmtpReply(553, status, f"Invalid {which} address: {reason}")


def malformed_message(reason: str) -> SmtpReply:
    """A message whose header section or MIME structure cannot be trusted."""
    return SmtpReply(550, "5.6.0", f"Message refused: {reason}")


def too_many_copies(recipients: int, budget: int) -> SmtpReply:
    """Per-recipient List-Unsubscribe copies would take too much room."""
    return SmtpReply(
        552,
        "5.3.4",
        f"Message too large for {recipients} recipients: each gets its own copy "
        f"with a personal List-Unsubscribe, {budget // 1024} KiB at most in all; "
        "send fewer recipients per message or add your own List-Unsubscribe",
    )


def policy_refusal(policy: str, verdict: Verdict) -> SmtpReply:
    """A policy's refusal or deferral (DESIGN.md: 550 5.7.1 / 451 4.7.1).

    A check that failed (reason ``policy_error``) answers 451 4.3.0.
    """
    detail = verdict.detail or verdict.reason or "refused"
    if verdict.outcome is Outcome.REFUSE:
        return SmtpReply(550, "5.7.1", f"Refused by policy {policy}: {detail}")
    if verdict.reason == "policy_error":
        return SmtpReply(451, "4.3.0", "Policy check unavailable, try again later")
    return SmtpReply(451, "4.7.1", f"Deferred by policy {policy}: {detail}")


def auth_locked_out(seconds: float) -> SmtpReply:
    """Too many failed logins from this client."""
    return SmtpReply(
        454,
        "4.7.0",
        f"Too many failed authentications from your address; try again in "
        f"{max(1, round(seconds))}s",
    )


# aiosmtpd's own replies, by prefix, and what the relay answers instead.
_BUILTIN: tuple[tuple[str, str], ...] = (
    ("500 Error: bad syntax", "500 5.5.2 Syntax error"),
    ("500 Error: command", "500 5.5.1 Command not recognized"),
    ("500 Command line too long", "500 5.5.6 Command line too long"),
    ("500 Error: strict ASCII mode", "500 5.5.2 Non-ASCII data without SMTPUTF8"),
    ("500 Line too long", LINE_TOO_LONG.render()),
    ("552 Error: Too much mail data", TOO_LARGE.render()),
    ("552 Error: message size exceeds", TOO_LARGE.render()),
    (
        "530 Must issue a STARTTLS command first",
        "530 5.7.0 Must issue a STARTTLS command first",
    ),
    ("554 Command refused due to lack of security", "554 5.7.0 TLS negotiation failed"),
    ("503 Error: send", "503 5.5.1 Send EHLO first"),
    ("503 Error: nested MAIL command", "503 5.5.1 Nested MAIL command"),
    ("503 Error: need MAIL command", "503 5.5.1 Need MAIL command first"),
    ("503 Error: need RCPT command", "503 5.5.1 Need RCPT command first"),
    ("503 Already authenticated", "503 5.5.1 Already authenticated"),
    ("501 Error: SMTPUTF8 disabled", "501 5.5.4 SMTPUTF8 is disabled"),
    ("555 ", "555 5.5.4 Parameters not recognized or not implemented"),
    ("502 EXPN not implemented", "502 5.5.1 EXPN not implemented"),
    (
        "252 Cannot VRFY",
        "252 2.5.0 Cannot VRFY user; send the message and it will be tried",
    ),
    ("250 OK", "250 2.0.0 Ok"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("220 Ready to start TLS", "220 2.0.0 Ready to start TLS"),
    ("454 TLS not available", "454 4.7.0 TLS not available"),
)
_HAS_ENHANCED = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_DEFAULT_STATUS = {
    2: "2.0.0",
    4: "4.0.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    535: "5.7.8",
    538: "5.7.11",
    552: "5.3.4",
    553: "5.1.3",
}


def with_enhanced_code(line: str) -> str:
    """Give an aiosmtpd reply line an enhanced status code if it lacks one.

    Greetings (220), EHLO/HELO lines and continuations (3xx) are left alone by the
    caller; this function only rewrites complete 2xx/4xx/5xx reply lines.
    """
    if len(line) < 3 or not line[:3].isdigit() or line[0] not in "245":
        return line
    if line.startswith("220 ") and not line.startswith("220 Ready to start TLS"):
        return line  # RFC 5321 §4.3.1: the greeting is "220 <domain> ..."
    if _HAS_ENHANCED.match(line):
        return line
    for prefix, replacement in _BUILTIN:
        if line.startswith(prefix):
            return replacement
    code = int(line[:3])
    status = _DEFAULT_STATUS.get(code) or _DEFAULT_STATUS.get(code // 100) or "5.0.0"
    text = line[4:].removeprefix("Error: ") or "Error"
    return f"{code} {status} {text}"


# aiosmtpd's own refusals that no relay hook sees, by prefix, as bounded reasons
# for the protocol-error log line and metric (size and line-length refusals are
# counted with the transaction instead).
_PROTOCOL_ERRORS: tuple[tuple[str, str], ...] = (
    ("500 Error: bad syntax", "syntax_error"),
    ("500 Error: command", "unknown_command"),
    ("500 Command line too long", "command_too_long"),
    ("500 Error: strict ASCII mode", "non_ascii_command"),
    ("501 ", "syntax_error"),
    ("502 5.5.1 Too many unrecognized", "too_many_unknown_commands"),
    ("502 ", "not_implemented"),
    ("503 ", "bad_sequence"),
    ("504 ", "unknown_auth_mechanism"),
    ("530 Must issue a STARTTLS", "starttls_required"),
    ("538 ", "auth_needs_tls"),
    ("554 Command refused due to lack of security", "tls_failed"),
    ("555 ", "bad_parameters"),
    ("421 4.7.0 ", "command_limit"),
)


def protocol_error_reason(line: str) -> str | None:
    """The reason for one of aiosmtpd's own error replies, or ``None``."""
    for prefix, reason in _PROTOCOL_ERRORS:
        if line.startswith(prefix):
            return reason
    return None
