import io

from mtl_plugin.utils.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_a_few_plain_lines_not_redraws():
    log = io.StringIO()
    for _ in progress_bar(range(5000), desc="steps", file=log):
        pass
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # The first state and the last (throttled: no line per step), each a whole line.
    assert 1 <= len(lines) <= 3 and "5000/5000" in lines[-1] and lines[-1].startswith("steps")


def test_a_new_postfix_waits_for_the_next_paced_line():
    log = io.StringIO()
    bar = progress_bar(range(1000), desc="meta-train", file=log)
    for step in bar:
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
    assert len(log.getvalue().splitlines()) <= 3


def test_a_terminal_keeps_the_live_bar():
    terminal = Terminal()
    for _ in progress_bar(range(50), desc="steps", file=terminal, mininterval=0, miniters=1):
        pass
    assert terminal.getvalue().count("\r") > 10


def test_a_disabled_bar_prints_nothing():
    log = io.StringIO()
    for _ in progress_bar(range(10), file=log, disable=True):
        pass
    assert log.getvalue() == ""
