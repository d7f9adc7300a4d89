"""Unit tests for fleetbus.router.verify and the adapter descriptions (hand-made Screens)."""

from __future__ import annotations

import pytest

from fleetbus.adapters import ADAPTERS, find_markers, get_adapter, marker, names
from fleetbus.adapters.base import Adapter
from fleetbus.router import verify
from fleetbus.router.verify import classify, input_region, typed_text
from fleetbus.transports.base import Screen

MID = "0123456789ab"
MK = marker(MID)
STUB = get_adapter("stub")
SHELL = get_adapter("shell")
PYTHON = get_adapter("python")

STUB_LINE = f"stub> [fleet#{MID} ops -> a] hi"
SHELL_LINE = f"$ echo hi  # [fleet#{MID} ops -> sh0]"
PY_LINE = f">>> print('hi')  # [fleet#{MID} ops -> py0]"


def scr(lines, cursor_y=None, history=(), width=80, height=24, cursor_x=None):
    lines = list(lines)
    if cursor_y is None:
        cursor_y = len(lines) - 1
    if cursor_x is None:
        cursor_x = len(lines[cursor_y]) if 0 <= cursor_y < len(lines) else 0
    return Screen(lines=lines, history=list(history), cursor_x=cursor_x, cursor_y=cursor_y, width=width,
                  height=height)


def padded(lines, height=24):
    """Pad to ``height`` rows like a real capture (rows below the cursor are blank)."""
    return list(lines) + [""] * (height - len(lines))


# --- marker helpers --------------------------------------------------------------------------


def test_marker_format():
    assert MK == "fleet#0123456789ab"


def test_find_markers_in_order():
    text = f"a fleet#{MID} b fleet#ffffffffffff c [fleet#000000000000 x]"
    assert find_markers(text) == [MID, "ffffffffffff", "000000000000"]


@pytest.mark.parametrize(
    "text",
    ["fleet#0123456789a", "fleet#0123456789abc", "fleet#0123456789AB", "fleet#0123456789ag", "fleet0123456789ab",
     ""],
)
def test_find_markers_rejects_non_markers(text):
    assert find_markers(text) == []


# --- classify: stub --------------------------------------------------------------------------


def test_stub_draft_at_cursor_row():
    s = scr(padded(["stub> ", STUB_LINE]), cursor_y=1)
    assert classify(STUB, s, MK) == "draft"


def test_stub_accepted_fresh_prompt_below():
    s = scr(padded([STUB_LINE, "stub> "]), cursor_y=1)
    assert classify(STUB, s, MK) == "accepted"


def test_stub_accepted_with_reply_and_trimmed_prompt():
    # captures trim trailing blanks, so the fresh prompt reads "stub>"
    s = scr(padded(["stub> ", STUB_LINE, "reply #1: got 2 chars in 1 line(s): hi", "stub>"]), cursor_y=3)
    assert classify(STUB, s, MK) == "accepted"


def test_stub_marker_split_across_wrapped_rows_is_draft():
    width = 20
    full = STUB_LINE
    rows = [full[i:i + width] for i in range(0, len(full), width)]
    assert len(rows) >= 2
    # the marker itself is cut by the wrap
    assert not any(MK in r for r in rows)
    s = scr(padded(["stub> ok", "reply #1", *rows]), cursor_y=1 + len(rows), width=width)
    assert classify(STUB, s, MK) == "draft"


def test_marker_split_across_rows_above_input_is_accepted():
    width = 20
    rows = [STUB_LINE[i:i + width] for i in range(0, len(STUB_LINE), width)]
    s = scr(padded([*rows, "reply #1", "stub>"]), cursor_y=len(rows) + 1, width=width)
    assert classify(STUB, s, MK) == "accepted"


def test_blank_screen_is_pending():
    s = scr([""] * 24, cursor_y=0)
    assert classify(STUB, s, MK) == "pending"
    assert classify(SHELL, s, MK) == "pending"
    assert classify(PYTHON, s, MK) == "pending"


def test_empty_lines_list_is_pending():
    s = Screen(lines=[], cursor_y=0)
    assert classify(STUB, s, MK) == "pending"
    assert typed_text(STUB, s) is None  # no prompt seen: nothing may be typed


def test_marker_absent_is_pending():
    s = scr(padded(["stub> ", "reply #1: got 5 chars", "stub> "]), cursor_y=2)
    assert classify(STUB, s, MK) == "pending"


def test_other_marker_is_not_ours():
    other = STUB_LINE.replace(MID, "ffffffffffff")
    s = scr(padded([other, "stub> "]), cursor_y=1)
    assert classify(STUB, s, MK) == "pending"


def test_changing_clock_never_accepts():
    for t in ("12:00:01", "12:00:02", "12:00:03"):
        s = scr(padded([f"status bar  {t}  ⠋ working", "stub> "]), cursor_y=1)
        assert classify(STUB, s, MK) == "pending"
    # a clock that changes while our text is still a draft does not turn it into acceptance
    for t in ("12:00:04", "12:00:05"):
        s = scr(padded([f"clock {t}", STUB_LINE]), cursor_y=1)
        assert classify(STUB, s, MK) == "draft"


def test_marker_only_in_history_is_accepted():
    history = ["stub> ", STUB_LINE, "reply #1: got 2 chars in 1 line(s): hi"]
    lines = padded([f"output {i}" for i in range(23)] + ["stub> "])
    s = scr(lines, cursor_y=23, history=history)
    assert classify(STUB, s, MK) == "accepted"


def test_blank_visible_screen_with_marker_in_history():
    s = scr([""] * 24, cursor_y=0, history=["stub> ", STUB_LINE])
    # an agent TUI (prefix marker) must show its input line before a marker above it counts
    assert classify(STUB, s, MK) == "pending"
    sh = scr([""] * 24, cursor_y=0, history=["$ ", SHELL_LINE])
    assert classify(SHELL, sh, MK) == "accepted", "a shell running the command shows no prompt"


def test_draft_wins_when_marker_also_above():
    # the marker appears above (an earlier echo) and is also sitting in the input line
    s = scr(padded([f"echoed {MK}", STUB_LINE]), cursor_y=1)
    assert classify(STUB, s, MK) == "draft"


def test_cursor_past_last_row_is_clamped():
    s = Screen(lines=[STUB_LINE, "stub> "], cursor_y=40)
    assert classify(STUB, s, MK) == "accepted"


def test_input_region_joins_wrapped_rows_without_separator():
    w = 10
    s = scr(padded(["old", "stub> abcd", "efghijklmn", "opq"]), cursor_y=3, width=w)
    assert input_region(STUB, s) == (1, "stub> abcdefghijklmnopq", True)


def test_input_region_does_not_cross_unwrapped_rows():
    # rows above that did not fill the width are output, not part of the input line
    s = scr(padded(["stub> abc", "def", "ghi"]), cursor_y=2)
    assert input_region(STUB, s) == (2, "ghi", False)


def test_input_region_without_prompt_is_cursor_row():
    s = scr(padded(["something", "else"]), cursor_y=1)
    assert input_region(STUB, s) == (1, "else", False)


def test_input_region_looks_at_most_max_rows_up():
    n = verify.MAX_INPUT_ROWS
    w = 8
    lines = ["stub> st"] + ["x" * w for _ in range(n)]  # every row full: one long wrapped input
    s = Screen(lines=lines, cursor_y=len(lines) - 1, height=len(lines), width=w)
    _, _, at_prompt = input_region(STUB, s)
    assert not at_prompt  # prompt row is more than MAX_INPUT_ROWS rows up: out of reach
    lines = ["stub> st"] + ["x" * w for _ in range(n - 1)]
    s = Screen(lines=lines, cursor_y=len(lines) - 1, height=len(lines), width=w)
    assert input_region(STUB, s)[0] == 0


def test_submitted_and_still_running_is_not_draft():
    line = f"$ sleep 30  # [fleet#{MID} ops -> sh0]"
    s = scr(padded(["$ ", line, ""]), cursor_y=2, width=80)
    assert classify(SHELL, s, MK) != "draft"


# --- classify: shell and python --------------------------------------------------------------


def test_shell_draft():
    s = scr(padded(["$ ls", "a b c", SHELL_LINE]), cursor_y=2)
    assert classify(SHELL, s, MK) == "draft"


def test_shell_accepted():
    s = scr(padded([SHELL_LINE, "hi", "$"]), cursor_y=2)
    assert classify(SHELL, s, MK) == "accepted"


def test_shell_pending():
    s = scr(padded(["$ ls", "a b c", "$ "]), cursor_y=2)
    assert classify(SHELL, s, MK) == "pending"


def test_python_draft():
    s = scr(padded([">>> 1+1", "2", PY_LINE]), cursor_y=2)
    assert classify(PYTHON, s, MK) == "draft"


def test_python_accepted():
    s = scr(padded([PY_LINE, "hi", ">>> "]), cursor_y=2)
    assert classify(PYTHON, s, MK) == "accepted"


def test_python_multiline_body_accepted_after_continuation():
    s = scr(padded([">>> for i in range(2):", f"...     print(i)  # [fleet#{MID} ops -> py0]", "... ", "0", "1",
                    ">>>"]), cursor_y=5)
    assert classify(PYTHON, s, MK) == "accepted"


def test_python_multiline_draft_on_continuation_prompt():
    s = scr(padded([">>> for i in range(2):", f"...     print(i)  # [fleet#{MID} ops -> py0]"]), cursor_y=1)
    assert classify(PYTHON, s, MK) == "draft"


def test_no_prompt_found_region_is_cursor_row_only():
    # the stub adapter finds no "stub>" prompt on a shell screen: the input region is the cursor row
    # alone, and for an agent TUI a marker above an unknown input line proves nothing
    s = scr(padded([SHELL_LINE, "hi", "$ "]), cursor_y=2)
    assert input_region(STUB, s) == (2, "$ ", False)
    assert classify(STUB, s, MK) == "pending"


CODEX = get_adapter("codex")


def test_codex_multi_line_draft_is_a_draft_not_accepted():
    # Codex 0.169.0 indents continuation rows by two spaces and word-wraps short of the width
    lines = ["• earlier reply", "", f"› [fleet#{MID} ops -> cx] first line of three", "  second line",
             "  third line", "", "  mock-model default · /tmp/proj"]
    s = scr(lines, cursor_y=4, width=160)
    start, region, at_prompt = input_region(CODEX, s)
    assert (start, at_prompt) == (2, True) and MK in region
    assert classify(CODEX, s, MK) == "draft"
    assert typed_text(CODEX, s).startswith(f"[fleet#{MID}")


def test_continuation_walk_is_used_only_when_it_reaches_the_prompt():
    s = scr(["  indented output", "  more output"], cursor_y=1, width=160)
    assert input_region(CODEX, s) == (1, "  more output", False)


# --- typed_text ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "adapter,line,expected",
    [
        (SHELL, "$ ", ""),
        (SHELL, "$", ""),
        (SHELL, "$ ls -la", "ls -la"),
        (SHELL, "$   spaced   ", "spaced"),
        (STUB, "stub> ", ""),
        (STUB, "stub>", ""),
        (STUB, "stub> half typed", "half typed"),
        (PYTHON, ">>> ", ""),
        (PYTHON, ">>> x = 1", "x = 1"),
        (PYTHON, "... ", ""),
        (PYTHON, "...     pass", "pass"),
    ],
)
def test_typed_text_after_prompt(adapter, line, expected):
    s = scr(padded(["earlier output", line]), cursor_y=1)
    assert typed_text(adapter, s) == expected
    assert adapter.typed_text(line) == expected


def test_typed_text_unknown_screen_is_not_an_empty_input_line():
    s = scr(padded(["Loading model...", "Press any key to continue"]), cursor_y=1)
    assert typed_text(STUB, s) is None
    s = scr(padded(["$ sleep 30", ""]), cursor_y=1)  # shell busy running a program
    assert typed_text(SHELL, s) is None
    assert STUB.typed_text("Welcome!") == "Welcome!"


def test_typed_text_spans_wrapped_rows():
    s = scr(padded(["$ echo aaaaaaaaaa", "bbbbbbbbbb"]), cursor_y=1, width=17)
    assert typed_text(SHELL, s) == "echo aaaaaaaaaabbbbbbbbbb"


def test_typed_text_uses_nearest_prompt():
    s = scr(padded(["$ old command", "output", "$ new"]), cursor_y=2)
    assert typed_text(SHELL, s) == "new"


# --- Adapter.frame ---------------------------------------------------------------------------


def test_frame_prefix_style():
    assert STUB.frame("hi", MID, "ops", "a") == f"[fleet#{MID} ops -> a] hi"
    assert STUB.frame("line1\nline2", MID, "bob", "coder0") == f"[fleet#{MID} bob -> coder0] line1\nline2"


def test_frame_comment_style_single_line():
    assert SHELL.frame("echo hi", MID, "ops", "sh0") == f"echo hi  # [fleet#{MID} ops -> sh0]"
    assert PYTHON.frame("print(1)", MID, "ops", "py0") == f"print(1)  # [fleet#{MID} ops -> py0]"


def test_frame_comment_style_multiline_tags_last_line():
    out = SHELL.frame("cd /tmp\nls\n\n", MID, "ops", "sh0")
    lines = out.split("\n")
    assert lines == ["cd /tmp", f"ls  # [fleet#{MID} ops -> sh0]"]
    assert MK not in "\n".join(lines[:-1])


def test_framed_text_contains_exactly_one_marker():
    for a in ADAPTERS.values():
        text = a.frame("some body\nwith two lines", MID, "ops", "x")
        assert find_markers(text) == [MID]


def test_frame_round_trips_through_classify():
    for a, prompt in ((STUB, "stub> "), (SHELL, "$ "), (PYTHON, ">>> ")):
        typed = prompt + a.frame("hello", MID, "ops", "s")
        assert classify(a, scr(padded([typed]), cursor_y=0), MK) == "draft"
        assert classify(a, scr(padded([typed, "out", prompt.rstrip()]), cursor_y=2), MK) == "accepted"


# --- is_expected_command ---------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["python", "python3", "python3.11", "python3.12", "fleet-stub"])
def test_stub_expected_commands(cmd):
    assert STUB.is_expected_command(cmd)


@pytest.mark.parametrize("cmd", ["bash", "zsh", "node", "Python", "ipython", "python2", "", None])
def test_stub_unexpected_commands(cmd):
    assert not STUB.is_expected_command(cmd)


def test_shell_expected_commands():
    assert SHELL.is_expected_command("bash")
    for cmd in ("zsh", "sh", "bash5", "python3", "-bash", "", None):
        assert not SHELL.is_expected_command(cmd), cmd


def test_python_expected_commands():
    for cmd in ("python", "python3", "python3.11"):
        assert PYTHON.is_expected_command(cmd)
    assert not PYTHON.is_expected_command("bash")


def test_base_adapter_without_patterns_expects_nothing():
    a = Adapter(name="x", command=("x",))
    assert not a.is_expected_command("x")
    assert a.typed_text("  anything  ") == "anything"


# --- registry --------------------------------------------------------------------------------


def test_registry_names_sorted():
    assert names() == ["claude", "codex", "gemini", "opencode", "pi", "python", "shell", "stub"]


def test_get_adapter_unknown_lists_known():
    with pytest.raises(KeyError) as ei:
        get_adapter("emacs")
    assert "'emacs'" in str(ei.value) and "claude, codex, gemini, opencode, pi, python, shell, stub" in str(ei.value)


def test_adapter_properties():
    assert STUB.has_hook and not SHELL.has_hook and not PYTHON.has_hook
    assert STUB.marker_style == "prefix"
    assert SHELL.marker_style == "comment" and PYTHON.marker_style == "comment"
    assert SHELL.env["PS1"] == "$ "


# --- queued / busy / collapsed paste (adapter indicators) --------------------------------------

CLAUDE = get_adapter("claude")
RULE = "─" * 80


def test_claude_queued_indicator_outside_input_region_is_queued():
    lines = [f"❯ [fleet#{'f' * 12} ops -> cc] SLOW first", "✻ Working… (esc to interrupt)",
             f"  ❯ [fleet#{MID} ops -> cc] typed while busy", RULE, "❯\u00a0Press up to edit queued messages", RULE]
    s = scr(lines, cursor_y=4)
    assert classify(CLAUDE, s, MK) == "queued"
    assert verify.is_queued(CLAUDE, s) and verify.is_busy(CLAUDE, s)


def test_claude_a_taken_message_is_accepted_while_another_waits_in_the_queue():
    # issue 14: with two queued, the first is taken (it moves into the transcript) while the
    # second still waits; the queue indicator alone must not keep the first "queued"
    other = "fedcba987654"
    lines = [f"❯ [fleet#{'f' * 12} ops -> cc] SLOW first", "⏺ done", f"❯ [fleet#{MID} ops -> cc] second",
             "✻ Working… (esc to interrupt)", f"  ❯ [fleet#{other} ops -> cc] third", RULE,
             "❯\u00a0Press up to edit queued messages", RULE]
    s = scr(lines, cursor_y=6)
    assert classify(CLAUDE, s, MK) == "accepted"
    assert classify(CLAUDE, s, marker(other)) == "queued"


def stub_screen(rows):
    return scr(padded(rows, 12), cursor_y=len(rows) - 1, width=60, height=12)


def test_stub_queue_area_tells_queued_from_taken():
    # the stub's screen as captured from tmux (60x12) during a turn, then after the first reply;
    # the submitted line stays above the queue area, so only the queue area tells
    a, b, c = "aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"
    during = ["fleetbus stub agent (slot ?, session 377744bd)", f"stub> [fleet#{a} ops -> a] first",
              f"stub> [fleet#{b} ops -> a] second one is a bit long", "er than the width of the pane so it wraps ok",
              f"stub> [fleet#{c} ops -> a] third", f"(queued) [fleet#{b} ops -> a] second one is a bit",
              f"(queued) [fleet#{c} ops -> a] third", "stub> "]
    s = stub_screen(during)
    assert [classify(STUB, s, marker(x)) for x in (a, b, c)] == ["accepted", "queued", "queued"]
    after = during[:5] + [f"reply #1: got 35 chars in 1 line(s): [fleet#{a} ops", " -> a] first",
                          f"(queued) [fleet#{c} ops -> a] third", "stub> "]
    s = stub_screen(after)
    assert [classify(STUB, s, marker(x)) for x in (a, b, c)] == ["accepted", "accepted", "queued"]


def test_a_queued_message_whose_row_is_not_shown_stays_queued():
    # a queue area that shows other prompts (or a cut preview) and no sign of this one: queued,
    # never accepted (issue 14: a queued prompt must not be journaled accepted)
    s = stub_screen(["stub> hello", f"(queued) [fleet#{'c' * 12} ops -> a] third", "stub> "])
    assert classify(STUB, s, MK) == "queued"


def test_queue_words_in_the_input_line_are_not_queued():
    s = scr([RULE, "❯   ❯ not a queue row", RULE], cursor_y=1)
    assert not verify.is_queued(CLAUDE, s)


def test_collapsed_paste_placeholder_in_input_is_draft():
    s = scr(["hello", RULE, "❯\u00a0[Pasted text #1 +79 lines]", RULE], cursor_y=2)
    assert classify(CLAUDE, s, MK) == "draft"


def test_no_indicators_for_adapters_without_them():
    s = scr(["  ❯ x", "stub> "], cursor_y=1)
    assert not verify.is_queued(STUB, s) and not verify.is_busy(STUB, s)


def test_gemini_enter_turned_newline_is_a_draft():
    # Gemini CLI 0.61.0: an Enter within its paste window becomes a newline; the cursor sits on
    # the empty second row of the draft
    gem = get_adapter("gemini")
    lines = ["✦ earlier reply", "", f" > [fleet#{MID} ops -> gm] SLOW first turn", "", "   workspace (/dir)"]
    s = scr(lines, cursor_y=3, width=160, cursor_x=3)
    assert classify(gem, s, MK) == "draft"
