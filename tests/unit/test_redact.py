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


def test_split_stream_holds_back_only_what_may_begin_a_secret():
    r = Redactor(["hunter2-very-secret"])
    assert r.longest_secret == len("hunter2-very-secret")
    assert r.split_stream("hello hunt") == ("hello ", "hunt")
    assert r.split_stream("hello") == ("hello", "")
    assert r.split_stream("a hunter2-very-secret b") == ("a hunter2-very-secret b", "")
    assert r.split_stream("hunter2-very-secre") == ("", "hunter2-very-secre")
    assert Redactor().split_stream("anything at all h") == ("anything at all h", "")


def test_split_stream_holds_a_token_shape_still_running():
    token = "ghp_" + "a" * 30
    ready, held = Redactor().split_stream(f"use {token}")
    assert (ready, held) == ("use ", token)
    ready, held = Redactor().split_stream(f"use {token} now")
    assert held == "" and MASK in Redactor().text(ready)


def test_joined_pieces_never_show_a_secret_wherever_the_stream_is_cut():
    secret = "s3cr3t-token-value"
    r = Redactor([secret])
    text = f"one {secret} two {secret}{secret} three {secret[:5]}"
    for size in range(1, 12):
        published, pending = [], ""
        for start in range(0, len(text), size):
            ready, pending = r.split_stream(pending + text[start:start + size])
            published.append(r.text(ready))
        published.append(r.text(pending))
        out = "".join(published)
        assert secret not in out and out == r.text(text), size
