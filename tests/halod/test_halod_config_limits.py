"""HaloD configuration limits that protect the control link (docs/operations.md)."""

from __future__ import annotations

import pytest

from halod.config import HaloDConfig
from orbited.core.control import MAX_MESSAGE
from orbited.core.settings import ConfigError


def test_control_max_message_below_what_nodes_send_is_refused() -> None:
    """A node sends hand-off chunks of about 256 KiB and trace replies of up to
    MAX_MESSAGE / 2: a smaller limit would make HaloD abort ordinary messages."""
    HaloDConfig(control_max_message=MAX_MESSAGE).validate()
    HaloDConfig(control_max_message=4 * MAX_MESSAGE).validate()
    with pytest.raises(ConfigError, match=f"control_max_message must be at least {MAX_MESSAGE}"):
        HaloDConfig(control_max_message=MAX_MESSAGE - 1).validate()
