import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture
def record_interfaces():
    """Make a DNC model keep every interface its memory computes, each field's gradient kept."""

    def install(model):
        calls, interface = [], model.memory.interface

        def recording(h):
            iface = interface(h)
            for value in iface:
                if value is not None:
                    value.retain_grad()
            calls.append(iface)
            return iface

        model.memory.interface = recording
        return calls

    return install
