"""docs/api.md's example runs as written (with the reference model and both checks in it)."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    namespace = {"WORKDIR": str(tmp_path)}
    exec(compile(code, str(DOC), "exec"), namespace)
    assert (tmp_path / "copy.meta").stat().st_size == 4 << 20
    assert namespace["report"].ok()
