"""The README is the user's manual: its offline Python example runs as written."""

import re
import runpy
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_python_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    (example,) = [b for b in _python_blocks() if "train_bpe_tokenizer" in b]  # the others need the hub
    script = tmp_path / "example.py"
    script.write_text(example)
    monkeypatch.chdir(tmp_path)  # it saves "tiny-model" where it runs
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and all(line.startswith("[") for line in printed)  # one list of texts per describe
    assert (tmp_path / "tiny-model" / "model.safetensors").is_file()
