"""The benchmark scripts refuse a device or engine this machine does not have with one argparse error line, before
they build anything: not torch's RuntimeError from the first ``.to("cuda")``, and not bench_serve's engines failing
one by one in child processes after minutes of building a 0.5B model on the CPU."""

import importlib.util

import pytest
import torch


def refusal(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("script, argv", [
    ("bench_train", ["--shape", "tiny"]),
    ("bench_packing", []),
    ("bench_infer", []),
])
@pytest.mark.parametrize("device, needle", [
    ("cuda", "--device 'cuda': torch sees no CUDA GPU here"),
    ("gpu", "--device 'gpu' is not a device"),
])
def test_a_device_torch_does_not_have_is_one_line(capsys, no_gpu, bench_script, script, argv, device, needle):
    line = refusal(capsys, bench_script(script).main, [*argv, "--device", device])
    assert ": error: " in line and needle in line, line  # argparse names the program from sys.argv


def test_bench_serve_needs_a_gpu_and_vllm_before_building(capsys, no_gpu, monkeypatch, bench_script):
    bench = bench_script("bench_serve")
    monkeypatch.setattr(bench, "build", lambda *a: pytest.fail("built models before checking the machine"))
    line = refusal(capsys, bench.main, [])
    assert "needs a CUDA GPU (torch sees none here)" in line and "--shape tiny --skip-vllm" in line, line
    # with a GPU but without vLLM in this Python
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    line = refusal(capsys, bench.main, [])
    assert "vLLM is not installed in" in line and "--skip-vllm" in line, line
