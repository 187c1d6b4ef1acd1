"""Shared fixtures and the two test kinds.

* Unit tests (no marker) run by default: `pytest` is the edit-test loop (about a minute on 2 cores).
* `e2e` tests (training / merge subprocesses, the DeepSpeed launcher, the demo: seconds to minutes each) run with
  `pytest --all` (README's test command, scripts/test.sh, CI), with `-m e2e`, or when named by node id.
  scripts/test.sh runs them on two pytest-xdist workers, one test file each at a time (`-n 2 --dist loadfile`): a
  module's world is built once, as in one process; the session-wide directories here once per worker.
* `gpu` tests need CUDA and skip without it (scripts/gpu_checks.sh runs them on a GPU machine).

Builders live in tests/tiny.py (tiny LLMs and teachers, batches, the dense mask reference), tests/vora_world.py
(a trained-looking checkpoint and its merge), tests/train_world.py (the training world and its runs) and
tests/helpers_data.py (tokenizers, images, annotation files, recipes); tests/vllm_engine.py runs vLLM engines and
their transformers reference for the vLLM tests. The directories that every module can share
are built once per session here; what a module's tests write into is built per module there.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny import save_teacher, save_tiny_llm


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", help="also run the end-to-end tests (marker e2e)")


def pytest_collection_modifyitems(config, items):
    # An explicit -m or a test named by node id is a choice the user made: respect it.
    if config.getoption("--all") or config.getoption("markexpr") or any("::" in a for a in config.args):
        return
    e2e = [item for item in items if item.get_closest_marker("e2e")]
    if e2e:
        config.hook.pytest_deselected(items=e2e)
        items[:] = [item for item in items if not item.get_closest_marker("e2e")]
        config._vora_e2e_deselected = len(e2e)


def pytest_terminal_summary(terminalreporter, config):
    n = getattr(config, "_vora_e2e_deselected", 0)
    if n:
        terminalreporter.write_line(f"{n} end-to-end tests deselected (marker e2e): run them with `pytest --all`")


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="session")
def llm_dirs(tmp_path_factory):
    """Tiny random-init LLM checkpoints (tests/tiny.py): {"qwen2", "llama", "llama_tied"} → directory."""
    root = tmp_path_factory.mktemp("tiny_llm")
    return {
        "qwen2": save_tiny_llm(root / "qwen2", arch="qwen2"),
        "llama": save_tiny_llm(root / "llama", arch="llama"),
        "llama_tied": save_tiny_llm(root / "llama_tied", arch="llama", tie=True),
    }


@pytest.fixture(scope="session")
def llm_dir(llm_dirs):
    """The tiny Qwen2 LLM directory."""
    return llm_dirs["qwen2"]


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A tiny CLIP vision teacher (3 blocks, 8×8 images, patch 2) with its preprocessor_config.json."""
    return save_teacher(tmp_path_factory.mktemp("tiny_teacher") / "clip")


@pytest.fixture(scope="session")
def bench_script():
    """``load(name)`` → scripts/NAME.py imported as a module (the benchmarks are scripts, not package modules)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"scripts_{name}", Path(__file__).parents[1] / "scripts" /
                                                      f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session", autouse=True)
def deepspeed_ops(request):
    """DeepSpeed's CPU ops (gloo shared-memory comm, CPU Adam) built before the first test when end-to-end tests
    (the ones that train in subprocesses) are selected, so that no timed subprocess includes a compile.

    scripts/install.sh builds them into .venv/torch_extensions, and then this only loads them (seconds). In an
    environment made otherwise (`pip install -e .[test]`) the first run would compile them — minutes on a busy
    machine — inside a subprocess timeout; here it happens once, untimed, into the cache the subprocesses use.
    """
    if torch.cuda.is_available() or not any(item.get_closest_marker("e2e") for item in request.session.items):
        return  # as scripts/install.sh: on a GPU machine DeepSpeed builds and loads its CUDA ops itself
    from deepspeed.accelerator import get_accelerator  # heavy: only end-to-end runs need it

    for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)
