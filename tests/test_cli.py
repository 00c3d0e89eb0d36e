"""The command line's logging: the package's messages reach the user on stderr, at the chosen level."""

import os
import subprocess
import sys

LOG_SOME = ("import logging, sys; from tldr_tasks import cli; cli.configure_logging(); "
            "logging.getLogger('tldr_tasks.stages.train_captioner').info('resumed from ckpt at step 4'); "
            "logging.getLogger('tldr_tasks.stages.caption').debug('one batch'); "
            "logging.getLogger('some_library').info('library chatter'); print('stdout stays clean')")


def run(code: str, level: str) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh process (logging is set up once per process) at TLDR_LOG_LEVEL=level."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TLDR_LOG_LEVEL": level}, check=False)


def test_the_package_logs_at_info_to_stderr_and_libraries_only_warnings():
    done = run(LOG_SOME, level="INFO")
    assert done.returncode == 0, done.stderr
    assert "INFO tldr_tasks.stages.train_captioner: resumed from ckpt at step 4" in done.stderr
    assert "one batch" not in done.stderr and "library chatter" not in done.stderr
    assert done.stdout == "stdout stays clean\n"  # the summary line Airflow reads stays last on stdout


def test_the_log_level_comes_from_the_environment():
    assert "DEBUG tldr_tasks.stages.caption: one batch" in run(LOG_SOME, level="debug").stderr
    assert "resumed from" not in run(LOG_SOME, level="WARNING").stderr


def test_an_unknown_log_level_is_a_user_error():
    done = run("import sys; from tldr_tasks import cli; sys.exit(cli.main(['stages']))", level="chatty")
    assert done.returncode == 2 and done.stderr.startswith("error: TLDR_LOG_LEVEL=CHATTY is not a logging level")
