"""One redaction layer masks registered secrets and common token shapes everywhere."""

import logging

from ocbridge.bridge.redact import MASK, RedactingFilter, Redactor


def test_registered_secret_masked_in_nested_data():
    r = Redactor(["canary-token-1234"])
    data = {"a": ["x canary-token-1234 y", {"canary-token-1234": 1}], "n": 5}
    assert r.data(data) == {"a": [f"x {MASK} y", {MASK: 1}], "n": 5}


def test_token_shapes_and_url_credentials():
    r = Redactor()
    text = ("ghp_" + "a" * 36 + " glpat-" + "b" * 20 + " Authorization: Bearer abc.def.ghi123 "
            "https://user:pa55@example.com/x.git https://x-access-token@host/r")
    out = r.text(text)
    assert "aaaa" not in out and "bbbb" not in out and "abc.def" not in out and "pa55" not in out
    assert "https://***@example.com/x.git" in out and "https://***@host/r" in out


def test_remove_unregisters_per_task_secrets():
    r = Redactor()
    r.add("per-task-secret")
    r.add("per-task-secret")
    r.remove("per-task-secret")
    assert MASK in r.text("per-task-secret")
    r.remove("per-task-secret")
    assert r.text("per-task-secret") == "per-task-secret"


def test_logging_filter_redacts_message_args_and_traceback():
    r = Redactor(["s3cr3t-value"])
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "token %s", ("s3cr3t-value",), None)
    try:
        raise ValueError("boom s3cr3t-value")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    RedactingFilter(r).filter(record)
    assert "s3cr3t" not in record.getMessage()
    assert "s3cr3t" not in record.exc_text and "boom" in record.exc_text
