"""The README's example must really run."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "consistency_sample(net" in b)
    exec(compile(example, "README.md", "exec"), {})
    assert "torch.Size([1000, 2])" in capsys.readouterr().out
