"""The README's code examples run as written."""

import ast
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_readme_optax_example_runs(capsys):
    blocks = _python_blocks()
    assert blocks, "README has no python example"
    printed = []
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
        printed.append(capsys.readouterr().out.strip())
    # The optax example prints {kernel: "kappa before -> after"}: every kernel's kappa fell.
    kappas = ast.literal_eval(printed[0])
    assert set(kappas) == {"Conv_0/kernel", "Dense_0/kernel"}
    for change in kappas.values():
        before, after = (float(v) for v in change.split("->"))
        assert 1.0 <= after < before
    # The pruning example: no weight is pruned before the first update.
    assert float(printed[1]) == 0.0
