"""What loads without torch: reading a config, a sweep, the records, the report and the UI, and the
CLI refusing a bad config, all in a process where importing torch fails. And the names a config
may choose (distnet.choices) are exactly those the torch code implements (distnet.registry)."""

import subprocess
import sys

from distnet import choices, registry

BLOCK_TORCH = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError(f"{name}: torch is not to be imported here")

sys.meta_path.insert(0, Block())
"""

TORCH_FREE = ["config", "choices", "schema", "outcome", "sweep", "tracking", "cellrecords", "cellindex", "steptable", "ui",
              "report", "isometry", "meanfield", "data", "download", "lanes", "cli", "frames", "space"]


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=120)


def test_config_sweep_records_report_ui_and_cli_load_without_torch(tmp_path):
    imports = "\n".join(f"import distnet.{m}" for m in TORCH_FREE)
    proc = run_blocked(imports + "\nassert 'torch' not in sys.modules\nprint('loaded')")
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-3000:]
    # A bad config is refused with its field before anything heavy is imported.
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {sizes: [784, 10], activation: swish}\n")
    proc = run_blocked(f"from distnet import cli\nsys.exit(cli.main(['train', {str(bad)!r}]))")
    assert proc.returncode == 2 and "model.activation" in proc.stderr and "leaky_relu" in proc.stderr, proc.stderr[-3000:]
    # The block is real: importing the model is refused.
    proc = run_blocked("import distnet.model")
    assert proc.returncode == 1 and "torch is not to be imported here" in proc.stderr


def test_every_choice_has_its_code_and_every_code_its_choice():
    assert list(registry.INITS) == list(choices.INITS)
    assert list(registry.ACTIVATIONS) == list(choices.ACTIVATIONS)
    assert list(registry.LOSSES) == list(choices.LOSSES)
