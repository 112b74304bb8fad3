"""Helpers of the GUI tests, which drive a real napari viewer (under Xvfb in CI). Every test in
this folder is marked ``gui``."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gui)


@pytest.fixture
def wait_for():
    """``wait_for(qtbot, dock, worker, timeout=60_000)``: wait until the dock has handled the
    worker's result (or error)."""

    def wait(qtbot, dock, worker, timeout=60_000):
        assert worker is not None, f"the step did not start: {dock.status.value}"
        qtbot.waitUntil(lambda: not dock.is_running(worker), timeout=timeout)

    return wait


@pytest.fixture
def notifications():
    """``notifications()``: the messages napari has shown so far."""

    def messages():
        from napari.utils.notifications import notification_manager

        return [str(n.message) for n in notification_manager.records]

    return messages
