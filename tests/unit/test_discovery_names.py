"""Service names from how a process was started (issue 13: not every process "python3")."""

import pytest

from agent.discovery import service_from


@pytest.mark.parametrize("argv, expect", [
    (["python3", "shop/app.py", "--port", "8000"], "app"),
    (["/usr/bin/python3.11", "-u", "-X", "dev", "/srv/worker.py"], "worker"),
    (["python3", "-m", "celery", "-A", "proj", "worker"], "celery"),
    (["python", "-mhttp.server"], "http.server"),
    (["python3", "/srv/tool/__main__.py"], "tool"),
    (["/venv/bin/gunicorn", "app:app"], "gunicorn"),
    (["gunicorn: worker [app:app]"], "gunicorn"),
    (["python3", "-c", "import time; time.sleep(9)"], "python3"),
    (["python3"], "python3"),
    ([], "python3"),
])
def test_service_from_command_line(argv, expect):
    assert service_from("python3", argv) == expect


def test_long_names_are_bounded():
    assert len(service_from("python3", ["python3", "x" * 5000 + ".py"])) <= 200
