"""The demo's held-out split as a local lmms-eval task (examples.demo.export_lmms_task): the parquet holds the
demo's questions, answers and image bytes in the demo's order; outputs appear whole; bad input is refused with a
clear message. Runs without lmms-eval (it only needs datasets); the lmms-eval run is tests/test_lmms_eval.py."""

import pytest
from PIL import Image

from examples.demo import corpus as demo_corpus
from examples.demo import evaluate as demo_eval
from examples.demo.export_lmms_task import ExportError, export_demo_task, main


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    demo_corpus.generate(str(out / "corpus"), n_train=0, n_heldout=3, seed=3, log=lambda m: None)
    return out


def test_export_writes_whole_task_and_refuses_bad_input(demo_out, tmp_path, capsys):
    import datasets

    yaml_path = export_demo_task(demo_out / "corpus", tmp_path / "t", limit=3)
    ds = datasets.load_dataset("parquet", data_files={"test": str(tmp_path / "t" / "vora_demo.parquet")})["test"]
    rows = demo_eval.load_heldout(str(demo_out / "corpus"))[:3]
    assert ds["question"] == [r["question"] for r in rows] and ds["answer"] == [r["answer"] for r in rows]
    assert ds[0]["image"].tobytes() == Image.open(demo_out / "corpus" / rows[0]["image"]).tobytes()
    assert "dataset_path: parquet" in yaml_path.read_text()
    with pytest.raises(ExportError, match="--overwrite"):
        export_demo_task(demo_out, tmp_path / "t")
    (tmp_path / "t" / "keep.txt").write_text("mine")
    export_demo_task(demo_out, tmp_path / "t", overwrite=True)
    assert (tmp_path / "t" / "keep.txt").read_text() == "mine"  # nothing of the user's is deleted
    assert len(datasets.load_dataset("parquet", data_files=str(tmp_path / "t" / "vora_demo.parquet"))["train"]) > 3
    with pytest.raises(ExportError, match="no heldout.jsonl"):
        export_demo_task(tmp_path, tmp_path / "u")
    assert not (tmp_path / "u").exists()
    assert main([str(tmp_path), str(tmp_path / "u")]) == 2
    assert "export_lmms_task: error:" in capsys.readouterr().err and not (tmp_path / "u").exists()
    with pytest.raises(ExportError, match="--limit must be at least 1"):
        export_demo_task(demo_out, tmp_path / "v", limit=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "heldout.jsonl").write_text('{"image": "images/x.png", "attribute": "colour", "answer": "red", '
                                       '"conversations": [{"from": "human", "value": "<image>\\nQ"}]}\n')
    with pytest.raises(ExportError, match="heldout.jsonl:1: image .*x.png does not exist"):
        export_demo_task(bad, tmp_path / "w")
