"""tools/scope_colab.ipynb executed end to end on CPU with its smoke parameters (nbclient, a
fresh kernel), as papermill would: an injected cell after the one tagged `parameters`."""

import os
import time

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "tools", "scope_colab.ipynb")


def _inject(nb, params: dict):
    """Inserts a cell tagged `injected-parameters` after the `parameters` cell (papermill's rule)."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and nb.cells[tagged[0]].cell_type == "code"
    assert tagged[0] == min(i for i, c in enumerate(nb.cells) if c.cell_type == "code")  # the first code cell
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, cell)


def _outputs(nb, cell_type="code"):
    return [o for c in nb.cells if c.cell_type == cell_type for o in c.get("outputs", [])]


def test_notebook_parameters_cell_defaults_to_the_full_run():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", [])
    assert "SMOKE = False" in first.source
    assert not _outputs(nb), "commit the notebook without outputs"


@pytest.mark.slow
def test_notebook_smoke_run_shows_a_figure_and_the_table(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    _inject(nb, {"SMOKE": True, "WORKDIR": str(tmp_path / "runs"), "TOY_DIR": str(tmp_path / "toy")})
    # The kernel inherits this environment: one CPU device (the tests' 8 fake devices would only
    # slow the toy down; the mesh code is tested elsewhere).
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", ROOT)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(ROOT, "tools")}}).execute()
    print(f"notebook smoke run: {time.perf_counter() - t0:.0f} s")
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert pngs, "no figure in the outputs"
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("<table" in t and "Avg@2 %" in t and "SCOPE" in t and "OPD" in t for t in tables), tables
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "mesh shape:" in text and "SCOPE: 2 steps" in text and "OPD: 2 steps" in text
    assert "skipped: set CHECKPOINT" in text  # the real-checkpoint section is guarded
    for run in ("scope", "opd"):  # the runs and their TensorBoard events were written where asked
        files = os.listdir(tmp_path / "runs" / run)
        assert "metrics.jsonl" in files and any(f.startswith("events.out.tfevents") for f in files)
