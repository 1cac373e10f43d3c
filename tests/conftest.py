import os
import sys

# Triton's interpreter runs the GPU kernels' own source on CPU tensors; it must be chosen before
# dnc_gpt2 defines them (tests/triton_compile_report.py compiles them for a GPU without it)
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for every test: the tensors here are tiny, and on 2 shared cores
    OpenMP threads waiting on each other make a test many times slower (the memory carrying a
    value past distractors, beside a training run: 145 s with 2 threads, 11 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def record_interfaces():
    """Make a DNC model keep every interface its memory computes, each field's gradient kept."""

    def install(model):
        calls, interface = [], model.memory.interface

        def recording(h, context=True):
            iface = interface(h, context)
            for value in iface:
                if value is not None:
                    value.retain_grad()
            calls.append(iface)
            return iface

        model.memory.interface = recording
        return calls

    return install
