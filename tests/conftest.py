import os

# Nothing in the test session may wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP's default wait policy makes some 2-thread kernels (index_add_ along dim 0: merge, get_delta_weight)
# stall for ~0.2 s per call when the cores are shared with other processes; passive waiting avoids that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_folder():
    """The real SmolLM2-135M checkpoint folder (peft_alps.demo.builtin_models; built once per machine, then cached)."""
    from peft_alps.demo import builtin_models as models

    return models.load("smollm2-135m")


SUMMARY = pytest.StashKey[list]()  # lines a test leaves for the terminal summary (tests/test_docs_snippets.py)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for line in config.stash.get(SUMMARY, []):
        terminalreporter.write_line(line)
